"""The process manager of `theychat up`: the root of the tree when systemd is not.

The router and the router-monitor restart each other; only when both are dead at once
does this step in and start the router again (which starts its monitor). It adopts
nothing else and sends no heartbeats: like systemd, it watches pids. Restarts obey the
same intensity limit as every supervisor.
"""

from __future__ import annotations

import asyncio
import sys
import time

from theychat.daemons import control, daemon, ops, procs
from theychat.daemons.control import ok
from theychat.daemons.daemon import Daemon
from theychat.daemons.errors import ControlError
from theychat.daemons.policy import RestartPolicy, decide, prune
from theychat.daemons.tree import Role, roots

POLL_S = 0.1
# The pair restart each other within milliseconds; only a longer joint absence is ours.
BOTH_DEAD_FOR_S = 0.5


def _alive(d: Daemon, name: str) -> bool:
    rec = procs.read_pidfile(d.paths.pidfile(name))
    return rec is not None and rec.alive()


async def _ready(d: Daemon, name: str, pid: int, timeout_s: float) -> bool:
    """Wait (bounded) until the daemon answers `status` as ready: we hear no heartbeats,
    so its own answer is our proof that the restart worked. False at once if it died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not d.stop.is_set():
        if not procs.alive(pid):
            return False
        try:
            reply = await control.request(d.paths.control(name), ops.Status().message(),
                                          timeout=0.5)
            if reply.get("ok") and reply.get("daemon", {}).get("state") == "ready":
                return True
        except ControlError:
            pass
        await asyncio.sleep(POLL_S / 10)
    return False


async def main_async(d: Daemon) -> None:
    s = d.cfg.supervision
    policy = RestartPolicy(s.max_restarts, s.window_s, s.backoff_initial_ms, s.backoff_step_ms,
                           s.backoff_max_ms)
    root, partner = roots()
    spec = d.child_spec(root)
    watched = [root.name, partner.name]
    recent: list[float] = []
    restarts = 0
    gave_up = False

    ctl = control.ControlServer(d.paths.control(d.name), ops.Dispatcher(d.name, {
        ops.Status: lambda op, fds: ok(daemon=d.status(), restarts=restarts, gave_up=gave_up),
    }), d.log)
    await ctl.start()
    d.ready(watching=watched)
    both_dead_since: float | None = None
    while not d.stop.is_set():
        await asyncio.sleep(POLL_S)
        if d.paths.stopping.exists() or any(_alive(d, n) for n in watched):
            both_dead_since = None
            continue
        now = time.monotonic()
        both_dead_since = both_dead_since or now
        if now - both_dead_since < BOTH_DEAD_FOR_S or gave_up:
            continue
        d.log.warning("peer_declared_dead", child=spec.name, cause="exit",
                      detection_ms=round((now - both_dead_since) * 1000), both_roots=True)
        recent = prune(recent, now, policy.window_s)
        decision = decide(policy, recent, now)
        if decision.action == "give_up":
            gave_up = True
            d.log.error("gave_up", child=spec.name, restarts_in_window=len(recent))
            continue
        d.log.info("restarting", child=spec.name, cause="exit",
                   delay_ms=round(decision.delay_s * 1000))
        await asyncio.sleep(decision.delay_s)
        pid = procs.spawn(spec.args, d.paths.stderr(spec.name))
        recent.append(now)
        restarts += 1
        d.log.info("child_started", child=spec.name, child_pid=pid)
        if await _ready(d, spec.name, pid, s.start_timeout_ms / 1000):
            d.log.info("restarted", child=spec.name, child_pid=pid, restarts=restarts,
                       recovery_ms=round((time.monotonic() - now) * 1000, 1))
        both_dead_since = None
    await ctl.close()


def main(argv: list[str] | None = None) -> int:
    return daemon.run(Role.MANAGER, main_async, argv)


if __name__ == "__main__":
    sys.exit(main())
