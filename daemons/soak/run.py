"""`theychat soak`: start a tree, talk, inject faults, stop, then judge what was written.

    theychat soak [--config FILE] --duration S --clients N --fault-every S [--seed S]
                  [--report DIR] [--rate R] [--faults KIND ...] [--keep] [--hosts N]

With `--hosts 3` (or 5) the soak runs on a lab cluster (lab.py: each host a network
namespace with its etcd member and its tree; root and etcd needed) and its faults include
whole hosts killed and cut off (plan.HOST_KINDS).

Exit status: 0 when every check of the verdict holds, 1 when one does not, 2 when the
soak could not run (bad arguments, a tree that does not start).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from theychat.daemons import config, procs, status
from theychat.daemons.errors import TheyChatError
from theychat.daemons.soak import plan as planning
from theychat.daemons.soak.clients import SoakClient
from theychat.daemons.soak.judge import judge
from theychat.daemons.soak.lab import CLIENT_PORT, UP_TIMEOUT_S, Lab, why_no_lab
from theychat.daemons.soak.report import NO_TIMELINE, can_draw, markdown, timeline
from theychat.daemons.soak.tree import HOST, Tree, merge

JOIN_TIMEOUT_S = 20.0
DRAIN_S = 3.0  # after the last line is sent: time for every delivery to arrive
TARGET_WAIT_S = 5.0  # a fault's target must be alive again within this to be hit
STOP_HOLD_FACTOR = 3  # SIGSTOP lasts this many heartbeat timeouts (if not killed first)
HOST_DOWN_S = 2.0  # a killed host is started again this long after
PARTITION_EXTRA_S = 3.0  # a partition lasts cluster.lost_after_s and this much more: the
#                          host gives up its clients, who move to the majority


class SoakError(TheyChatError):
    pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, required=True, metavar="SECONDS",
                   help="seconds of traffic (the whole run takes ~15 s more)")
    p.add_argument("--clients", type=int, required=True, metavar="N",
                   help="clients, spread over the topics")
    p.add_argument("--fault-every", type=float, required=True, metavar="SECONDS",
                   help="seconds between two faults")
    p.add_argument("--seed", type=int, default=1, help="chooses the faults (default 1)")
    p.add_argument("--report", metavar="DIR",
                   help="where report.md, timeline.png, logs and transcripts go "
                        "(default ./soak-YYYYmmdd-HHMMSS)")
    p.add_argument("--rate", type=float, default=5.0, metavar="LINES_PER_S",
                   help="lines per second each client sends (default 5)")
    every_kind = planning.KINDS + planning.HOST_KINDS
    p.add_argument("--faults", nargs="+", choices=every_kind, default=None,
                   metavar="KIND", help=f"kinds of fault to inject (default all: "
                                        f"{' '.join(planning.KINDS)}, and with --hosts "
                                        f"{' '.join(planning.HOST_KINDS)})")
    p.add_argument("--keep", action="store_true",
                   help="keep the tree's state directory (its path is printed)")
    p.add_argument("--hosts", type=int, default=1, metavar="N",
                   help="1 (default): one tree on loopback; 3 or 5: a cluster of that many "
                        "hosts in network namespaces (root, etcd-server)")


def validate(args: argparse.Namespace) -> None:
    if args.duration < 10:
        raise SoakError("--duration: at least 10 seconds")
    if not 1 <= args.clients <= 1000:
        raise SoakError("--clients: expected 1 to 1000")
    if args.fault_every < 1:
        raise SoakError("--fault-every: at least 1 second")
    if not 0 < args.rate <= 100:
        raise SoakError("--rate: expected more than 0 and at most 100 lines per second")
    if args.hosts not in (1, 3, 5):
        raise SoakError("--hosts: expected 1, 3 or 5 (an odd number, for etcd's majority)")
    if args.faults is None:
        args.faults = list(planning.KINDS + (planning.HOST_KINDS if args.hosts > 1 else ()))
    wrong = [k for k in args.faults if k in planning.HOST_KINDS and args.hosts == 1]
    if wrong:
        raise SoakError(f"--faults {' '.join(wrong)}: needs --hosts 3 or 5")
    if args.hosts > 1 and (why := why_no_lab()):
        raise SoakError(f"--hosts {args.hosts}: {why}")


def base_config(path: str | None) -> dict[str, Any]:
    """The user's config as a mapping (validated first, so errors name the key)."""
    if path is None:
        return {}
    cfg = config.load(path)
    if cfg.listen.tls.enabled:
        raise SoakError(f"{path}: listen.tls: the soak's clients speak plain TCP; "
                        "soak a copy of the config without it")
    if cfg.cluster is not None:
        raise SoakError(f"{path}: cluster: the soak makes its own (--hosts 3); soak a copy "
                        "of the config without it")
    data = yaml.safe_load(Path(path).read_text()) or {}
    assert isinstance(data, dict)
    return data


class Soak:
    """The traffic and the faults, on one tree (`tree`) or a lab of hosts (`lab`)."""

    def __init__(self, args: argparse.Namespace, tree: Tree | Lab, report: Path) -> None:
        self.args = args
        self.tree = tree
        self.lab = tree if isinstance(tree, Lab) else None
        self.report = report
        self.cfg = tree.cfg
        self.topics = list(self.cfg.topics.names)
        width = len(str(args.clients))
        self.clients = [
            self._client(f"soak{i:0{width}d}", self.topics[i % len(self.topics)], i)
            for i in range(1, args.clients + 1)
        ]
        s = self.cfg.supervision
        hosts = [h.name for h in self.lab.hosts] if self.lab else []
        self.faults = planning.plan(args.seed, args.duration, args.fault_every, self.topics,
                                    [c.nick for c in self.clients], tuple(args.faults),
                                    max_hits=max(1, s.max_restarts - 1), window_s=s.window_s,
                                    hosts=hosts)
        self.fault_log = open(report / "faults.jsonl", "w")  # noqa: SIM115 (closed in run)
        self.interrupted = False
        self.traffic_from = self.traffic_until = 0.0
        self.away: set[str] = set()  # hosts killed or cut off, not back yet
        self.recoveries: set[asyncio.Task[None]] = set()

    def _client(self, nick: str, topic: str, i: int) -> SoakClient:
        transcript = self.report / "clients" / f"{nick}.jsonl"
        phase = i / self.args.clients
        if self.lab is None:
            assert isinstance(self.tree, Tree)
            return SoakClient(nick, topic, HOST, self.tree.port, self.args.rate, transcript,
                              phase=phase)
        # People are spread over the hosts, and know every door (as theychat chat does).
        doors = [(h.client_ip, CLIENT_PORT) for h in self.lab.hosts]
        doors = doors[i % len(doors):] + doors[:i % len(doors)]
        return SoakClient(nick, topic, doors[0][0], CLIENT_PORT, self.args.rate, transcript,
                          phase=phase, doors=doors, netns=self.lab.clients)

    async def run(self) -> None:
        tasks = [asyncio.ensure_future(c.run()) for c in self.clients]
        try:
            deadline = time.monotonic() + JOIN_TIMEOUT_S
            while not all(c.in_topic for c in self.clients):
                if time.monotonic() > deadline or all(t.done() for t in tasks):
                    raise SoakError("the clients could not all join their topics in "
                                    f"{JOIN_TIMEOUT_S:.0f}s")
                await asyncio.sleep(0.05)
            self.traffic_from = time.time()
            start = time.monotonic()
            for fault in self.faults:
                if self.interrupted:
                    break
                await asyncio.sleep(max(0.0, start + fault.at - time.monotonic()))
                await self.inject(fault)
            while not self.interrupted and time.monotonic() < start + self.args.duration:
                await asyncio.sleep(0.1)
            self.traffic_until = time.time()
            for c in self.clients:
                c.interval = float("inf")  # stop talking; keep listening
            await asyncio.sleep(DRAIN_S)
        finally:
            for c in self.clients:
                c.stop()
            await asyncio.wait(tasks, timeout=10)
            if self.recoveries:  # every host back before the end is judged
                await asyncio.wait(self.recoveries, timeout=UP_TIMEOUT_S)
            self.fault_log.close()

    def _record(self, fault: planning.Fault, **fields: Any) -> None:
        self.fault_log.write(json.dumps({"at": fault.at, "kind": fault.kind,
                                         "targets": list(fault.targets), **fields}) + "\n")
        self.fault_log.flush()

    async def _alive(self, name: str) -> procs.PidRecord | None:
        """The daemon's current process, once it is back from an earlier fault."""
        if planning.split(name)[0] in self.away:
            return None
        deadline = time.monotonic() + TARGET_WAIT_S
        loop = asyncio.get_running_loop()
        while time.monotonic() < deadline:
            rec = self.tree.pid_record(name)
            if (rec is not None and rec.alive() and not rec.stopped
                    and await loop.run_in_executor(None, self._supervised, name, rec.pid)):
                return rec
            await asyncio.sleep(0.05)
        return None

    def _supervised(self, target: str, pid: int) -> bool:
        """Whether the target's supervisor is ready and watches this very process: a
        fault on a daemon whose supervisor is itself still starting (or adopting it)
        tests that supervisor's grace, not its watch."""
        host, name = planning.split(target)
        sup = planning.split(planning.supervisor_of(target))[1]
        if self.lab is not None:
            paths = self.lab.host(host).paths
        else:
            assert isinstance(self.tree, Tree)
            paths = self.tree.paths
        reply = status.query(paths, sup)
        if reply is None or reply.get("daemon", {}).get("state") != "ready":
            return False
        return any(c.get("name") == name and c.get("pid") == pid and c.get("state") == "running"
                   for c in reply.get("children", []))

    async def inject(self, fault: planning.Fault) -> None:
        if fault.kind == "client_reset":
            chosen = [c for c in self.clients if c.nick == fault.targets[0]]
            others = [c for c in self.clients if c.nick != fault.targets[0]]
            for c in chosen + others:  # one that is connected now, the planned one first
                t = time.time()
                if c.reset():
                    self._record(fault, t=t, targets_hit=[c.nick])
                    return
            self._record(fault, t=None, skipped="no client was connected")
            return
        if fault.kind in planning.HOST_KINDS:
            await self._host_fault(fault)
            return
        recs = {}
        for name in fault.targets:
            rec = await self._alive(name)
            if rec is None:
                self._record(fault, t=None, skipped=f"{name} was not back in time")
                return
            recs[name] = rec
        sig = signal.SIGSTOP if fault.kind == "stop" else signal.SIGKILL
        t = time.time()
        for rec in recs.values():
            procs.signal_process(rec, sig)
        self._record(fault, t=t, pids={n: r.pid for n, r in recs.items()})
        if sig == signal.SIGSTOP:
            hold = STOP_HOLD_FACTOR * self.tree.cfg.heartbeat.timeout_ms / 1000
            asyncio.get_running_loop().call_later(
                hold, lambda: [procs.signal_process(r, signal.SIGCONT) for r in recs.values()])


    async def _host_fault(self, fault: planning.Fault) -> None:
        """A host killed whole (started again HOST_DOWN_S later), or cut off from the
        others for longer than cluster.lost_after_s (then healed)."""
        assert self.lab is not None
        lab, h = self.lab, self.lab.host(fault.targets[0])
        if self.away:
            self._record(fault, t=None, skipped=f"{', '.join(sorted(self.away))} still away")
            return
        loop = asyncio.get_running_loop()
        self.away.add(h.name)
        t = time.time()
        if fault.kind == "host_kill":
            killed = await loop.run_in_executor(None, lab.kill_host, h)
            self._record(fault, t=t, killed=killed, back_after_s=HOST_DOWN_S)

            async def back() -> None:
                await asyncio.sleep(HOST_DOWN_S)
                await loop.run_in_executor(None, lab.restart_host, h)
        else:
            assert self.cfg.cluster is not None
            hold = self.cfg.cluster.lost_after_s + PARTITION_EXTRA_S
            await loop.run_in_executor(None, lab.partition, h)
            self._record(fault, t=t, back_after_s=hold)

            async def back() -> None:
                await asyncio.sleep(hold)
                await loop.run_in_executor(None, lab.heal, h)

        async def recover() -> None:
            try:
                await back()
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                self.fault_log.write(json.dumps({"at": fault.at, "kind": fault.kind,
                                                 "recovery_failed": f"{h.name}: {e}"}) + "\n")
            finally:
                self.away.discard(h.name)

        task = asyncio.ensure_future(recover())
        self.recoveries.add(task)
        task.add_done_callback(self.recoveries.discard)


def run(args: argparse.Namespace) -> int:
    validate(args)
    base = base_config(args.config)
    report = Path(args.report or time.strftime("soak-%Y%m%d-%H%M%S"))
    try:
        if report.exists() and any(report.iterdir()):
            raise SoakError(f"--report {report}: exists and is not empty")
        (report / "clients").mkdir(parents=True, exist_ok=True)
        (report / "logs").mkdir(exist_ok=True)
    except OSError as e:
        raise SoakError(f"--report {report}: {e.strerror or e}") from None
    # Every client comes from one address: make room for them, unless the config says.
    clients = base.get("clients")
    room = {} if isinstance(clients, dict) and "max_per_address" in clients else {
        "clients": {"max_per_address": max(50, 2 * args.clients)}}
    stage: Tree | Lab
    if args.hosts == 1:
        stage = Tree(room, keep=args.keep, base=base, prefix="tc-soak-")
        where = f"tree in {stage.root}, port {stage.port}"
    else:
        extra = merge({k: v for k, v in base.items() if k not in ("state_dir", "listen")},
                      room)
        if isinstance(extra.get("topics"), list):
            extra["topics"] = {"names": extra["topics"]}
        topics = config.from_mapping(base).topics.names
        stage = Lab(args.hosts, topics=topics, extra=extra)
        where = f"lab of {args.hosts} hosts in {stage.root}, doors {stage.doors}"
    soak = Soak(args, stage, report)
    command = "theychat soak " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    print(f"soak: {where}; {len(soak.faults)} faults planned; report in {report}",
          file=sys.stderr, flush=True)

    def interrupt(signum: int, frame: object) -> None:
        soak.interrupted = True

    old = [signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)]
    started = time.time()
    rows: list[dict[str, Any]] = []
    sequencers: dict[str, str | None] = {}
    try:
        if isinstance(stage, Lab):
            stage.start()
        else:
            stage.up()
        asyncio.run(soak.run())
        rows = stage.status()
        if isinstance(stage, Lab):
            sequencers = {t["topic"]: t["sequencer"] for t in stage.cluster_view()["topics"]}
    except RuntimeError as e:
        raise SoakError(str(e)) from e
    finally:
        if isinstance(stage, Lab):
            left = stage.down()
            stage.copy_logs(report / "logs")
            if args.keep:
                os.environ["THEYCHAT_KEEP"] = "1"  # the lab leaves its directory
            stage.stop()
        else:
            left = stage.stop(remove=False)
            for path in stage.paths.logs.glob("*"):
                shutil.copy(path, report / "logs" / path.name)
            if not args.keep:
                shutil.rmtree(stage.root, ignore_errors=True)
        for s, handler in zip((signal.SIGINT, signal.SIGTERM), old, strict=True):
            signal.signal(s, handler)
    meta = {"seed": args.seed, "duration": args.duration, "fault_every": args.fault_every,
            "rate": args.rate, "kinds": list(args.faults), "topics": soak.topics,
            "clients": {c.nick: c.topic for c in soak.clients}, "command": command,
            "started": started, "traffic_from": soak.traffic_from,
            "traffic_until": soak.traffic_until, "ended": time.time(),
            "interrupted": soak.interrupted,
            "heartbeat_timeout_ms": stage.cfg.heartbeat.timeout_ms,
            "hosts": [h.name for h in stage.hosts] if isinstance(stage, Lab) else []}
    (report / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    (report / "status.json").write_text(json.dumps({"rows": rows, "left_behind": left,
                                                    "sequencers": sequencers},
                                                   indent=2) + "\n")
    verdict = judge(report)
    drawn = can_draw()
    (report / "report.md").write_text(markdown(verdict, meta, drawn))
    if drawn:
        timeline(verdict, meta, report / "timeline.png")
    else:
        print(f"soak: {NO_TIMELINE}", file=sys.stderr)
    for c in verdict.checks:
        print(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.figure}")
    for v in verdict.violations[:20]:
        print(f"  - {v}")
    print(f"soak {'passed' if verdict.ok else 'FAILED'}: {report / 'report.md'}")
    if soak.interrupted:
        print("soak: interrupted before its end", file=sys.stderr)
        return 1
    return 0 if verdict.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="theychat soak")
    parser.add_argument("--config")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except TheyChatError as e:
        print(f"theychat soak: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
