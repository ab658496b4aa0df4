"""`theychat soak`: start a tree, talk, inject faults, stop, then judge what was written.

    theychat soak [--config FILE] --duration S --clients N --fault-every S [--seed S]
                  [--report DIR] [--rate R] [--faults KIND ...] [--keep]

Exit status: 0 when every check of the verdict holds, 1 when one does not, 2 when the
soak could not run (bad arguments, a tree that does not start).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from theychat.daemons import config, procs
from theychat.daemons.errors import TheyChatError
from theychat.daemons.soak import plan as planning
from theychat.daemons.soak.clients import SoakClient
from theychat.daemons.soak.judge import judge
from theychat.daemons.soak.report import NO_TIMELINE, can_draw, markdown, timeline
from theychat.daemons.soak.tree import HOST, Tree

JOIN_TIMEOUT_S = 20.0
DRAIN_S = 3.0  # after the last line is sent: time for every delivery to arrive
TARGET_WAIT_S = 5.0  # a fault's target must be alive again within this to be hit
STOP_HOLD_FACTOR = 3  # SIGSTOP lasts this many heartbeat timeouts (if not killed first)


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
    p.add_argument("--faults", nargs="+", choices=planning.KINDS, default=list(planning.KINDS),
                   metavar="KIND", help=f"kinds of fault to inject (default all: "
                                        f"{' '.join(planning.KINDS)})")
    p.add_argument("--keep", action="store_true",
                   help="keep the tree's state directory (its path is printed)")


def validate(args: argparse.Namespace) -> None:
    if args.duration < 10:
        raise SoakError("--duration: at least 10 seconds")
    if not 1 <= args.clients <= 1000:
        raise SoakError("--clients: expected 1 to 1000")
    if args.fault_every < 1:
        raise SoakError("--fault-every: at least 1 second")
    if not 0 < args.rate <= 100:
        raise SoakError("--rate: expected more than 0 and at most 100 lines per second")


def base_config(path: str | None) -> dict[str, Any]:
    """The user's config as a mapping (validated first, so errors name the key)."""
    if path is None:
        return {}
    cfg = config.load(path)
    if cfg.listen.tls.enabled:
        raise SoakError(f"{path}: listen.tls: the soak's clients speak plain TCP; "
                        "soak a copy of the config without it")
    data = yaml.safe_load(Path(path).read_text()) or {}
    assert isinstance(data, dict)
    return data


class Soak:
    def __init__(self, args: argparse.Namespace, tree: Tree, report: Path) -> None:
        self.args = args
        self.tree = tree
        self.report = report
        self.topics = list(tree.cfg.topics.names)
        width = len(str(args.clients))
        self.clients = [
            SoakClient(f"soak{i:0{width}d}", self.topics[i % len(self.topics)], HOST, tree.port,
                       args.rate, report / "clients" / f"soak{i:0{width}d}.jsonl",
                       phase=i / args.clients)
            for i in range(1, args.clients + 1)
        ]
        s = tree.cfg.supervision
        self.faults = planning.plan(args.seed, args.duration, args.fault_every, self.topics,
                                    [c.nick for c in self.clients], tuple(args.faults),
                                    max_hits=max(1, s.max_restarts - 1), window_s=s.window_s)
        self.fault_log = open(report / "faults.jsonl", "w")  # noqa: SIM115 (closed in run)
        self.interrupted = False
        self.traffic_from = self.traffic_until = 0.0

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
            self.fault_log.close()

    def _record(self, fault: planning.Fault, **fields: Any) -> None:
        self.fault_log.write(json.dumps({"at": fault.at, "kind": fault.kind,
                                         "targets": list(fault.targets), **fields}) + "\n")
        self.fault_log.flush()

    async def _alive(self, name: str) -> procs.PidRecord | None:
        """The daemon's current process, once it is back from an earlier fault."""
        deadline = time.monotonic() + TARGET_WAIT_S
        while time.monotonic() < deadline:
            rec = self.tree.pid_record(name)
            if rec is not None and rec.alive() and not rec.stopped:
                return rec
            await asyncio.sleep(0.05)
        return None

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
    # Every client comes from loopback: make room for them, unless the config says.
    clients = base.get("clients")
    room = {} if isinstance(clients, dict) and "max_per_address" in clients else {
        "clients": {"max_per_address": max(50, 2 * args.clients)}}
    tree = Tree(room, keep=args.keep, base=base, prefix="tc-soak-")
    soak = Soak(args, tree, report)
    command = "theychat soak " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    print(f"soak: tree in {tree.root}, port {tree.port}; {len(soak.faults)} faults planned; "
          f"report in {report}", file=sys.stderr, flush=True)

    def interrupt(signum: int, frame: object) -> None:
        soak.interrupted = True

    old = [signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)]
    started = time.time()
    rows: list[dict[str, Any]] = []
    try:
        tree.up()
        asyncio.run(soak.run())
        rows = tree.status()
    except RuntimeError as e:
        raise SoakError(str(e)) from e
    finally:
        left = tree.stop(remove=False)
        for path in tree.paths.logs.glob("*"):
            shutil.copy(path, report / "logs" / path.name)
        if not args.keep:
            shutil.rmtree(tree.root, ignore_errors=True)
        for s, handler in zip((signal.SIGINT, signal.SIGTERM), old, strict=True):
            signal.signal(s, handler)
    meta = {"seed": args.seed, "duration": args.duration, "fault_every": args.fault_every,
            "rate": args.rate, "kinds": list(args.faults), "topics": soak.topics,
            "clients": {c.nick: c.topic for c in soak.clients}, "command": command,
            "started": started, "traffic_from": soak.traffic_from,
            "traffic_until": soak.traffic_until, "ended": time.time(),
            "interrupted": soak.interrupted,
            "heartbeat_timeout_ms": tree.cfg.heartbeat.timeout_ms}
    (report / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    (report / "status.json").write_text(json.dumps({"rows": rows, "left_behind": left},
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
