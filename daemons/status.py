"""What `theychat status` shows: one row per daemon the tree should have (`tree`), from
the daemon's own answer on its control socket and from what its supervisor says of it.
The soak and the benchmarks read the same rows in-process.
"""

from __future__ import annotations

from typing import Any

from theychat.daemons import control, ops, procs
from theychat.daemons.config import Config
from theychat.daemons.errors import ControlError
from theychat.daemons.paths import StatePaths
from theychat.daemons.tree import ROOT, DaemonId, every_daemon


def live_daemons(paths: StatePaths) -> dict[str, procs.PidRecord]:
    """Every daemon of this state directory whose pid file names a live process."""
    found = {}
    for pidfile in sorted(paths.run.glob("*.pid")):
        rec = procs.read_pidfile(pidfile)
        if rec is not None and rec.alive():
            found[pidfile.stem] = rec
    return found


def query(paths: StatePaths, name: str, timeout: float = 0.5) -> dict[str, Any] | None:
    """A daemon's `status` reply, or None if it does not answer in time."""
    try:
        return control.check(control.request_sync(paths.control(name), ops.Status().message(),
                                                  timeout))
    except ControlError:
        return None


def gather(cfg: Config, paths: StatePaths) -> list[dict[str, Any]]:
    """One row per expected daemon, from its own answer and from its supervisor's."""
    root = DaemonId(ROOT).name
    router = query(paths, root)
    topics = list(router["topics"]) if router and "topics" in router else cfg.topics.names
    replies = {root: router}
    rows = []
    for daemon in every_daemon(topics):
        name = daemon.name
        reply = replies[name] = router if name == root else query(paths, name)
        rec = procs.read_pidfile(paths.pidfile(name))
        alive = rec is not None and rec.alive()
        if reply:
            me = reply["daemon"]
            row = {"pid": me["pid"], "state": me["state"], "uptime_s": me["uptime_s"],
                   "incarnation": me.get("incarnation"),
                   "heartbeats_rejected": me.get("heartbeats_rejected", {})}
        else:
            row = {"pid": rec.pid if alive and rec else None,
                   "state": "unresponsive" if alive else "down", "uptime_s": None,
                   "incarnation": rec.incarnation if rec else None,
                   "heartbeats_rejected": {}}
        rows.append({"name": name, "role": str(daemon.role), "topic": daemon.topic, **row})
    # What supervisors know about their children: a child they gave up on says so.
    given_up = {c["name"] for r in replies.values() if r
                for c in r.get("children", []) if c.get("state") == "gave_up"}
    for row in rows:
        if row["name"] in given_up and row["state"] != "ready":
            row["state"] = "gave_up"
        # Each start of a daemon bumps the incarnation in its pid file, so this count
        # survives the restart of the supervisor that did the restarting.
        inc = row.pop("incarnation")
        row["restarts"] = inc - 1 if isinstance(inc, int) else None
    return rows
