"""What the throughput, latency and memory benchmarks share: a tree of their own (the
failover benchmark's `Tree`, reused), the config they run it with, the TheyChat
processes of that tree and their CPU time and memory, and small statistics helpers.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from tests.bench.failover import Tree, nearest_rank
from theychat.daemons import control
from theychat.daemons.errors import ControlError
from theychat.daemons.soak.tree import merge

CLK_TCK = os.sysconf("SC_CLK_TCK")

# The embedded defaults, except what a load generator needs to get past the limits meant
# for people (every benchmark prints these):
BENCH_OVERRIDES: dict[str, Any] = {
    "clients": {
        # A sender sends thousands of lines per second (default 20/s, burst 50).
        "rate_per_second": 1000000,
        "rate_burst": 1000000,
        # 5,000 connections and the sessions of earlier runs (default 10,000).
        "max_connections": 100000,
        # ... all from loopback (default 50 per address).
        "max_per_address": 100000,
        # A member may lag a whole in-flight window behind (default 256 KiB).
        "output_queue_bytes": 64 * 1024 * 1024,
    },
    # No history on /join: it would show earlier runs' messages as deliveries.
    "history": {"on_join": 0},
}


class BenchError(Exception):
    """A run that cannot give a figure: a lost delivery, a timeout, a tree that failed."""


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


ROOT = Path(__file__).resolve().parents[2]  # the checkout these benchmarks belong to


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, through the `finally` that stops the tree."""
    def on_term(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut it short
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)


def raise_nofile() -> int:
    """Raise our soft limit on open files to the hard one (the tree inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@contextlib.contextmanager
def tree_up(topics: Sequence[str], overrides: dict[str, Any] | None = None,
            keep: bool = False) -> Iterator[Tree]:
    """A fresh tree (state dir under /tmp, free loopback port), always stopped after."""
    raise_nofile()
    cfg = merge(BENCH_OVERRIDES, overrides or {})
    cfg["topics"] = list(topics)
    tree = Tree(cfg, keep)
    progress(f"starting a tree in {tree.root} on port {tree.port} "
             f"(topics {', '.join(topics)}, wal.fsync {tree.cfg.wal.fsync})")
    try:
        tree.up()
        yield tree
    finally:
        left = tree.stop()
        if left:
            progress(f"tree stopped; killed leftovers {left}")


def server_members(tree: Tree, topic: str) -> int | None:
    try:
        reply = control.check(control.request_sync(
            tree.paths.control(f"server@{topic}"), {"op": "status"}, 1.0))
    except ControlError:
        return None
    members = reply.get("members")
    return members if isinstance(members, int) else None


def wait_members(tree: Tree, topic: str, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := server_members(tree, topic)) != n:
        if time.monotonic() > deadline:
            raise BenchError(f"server@{topic} has {got} members, expected {n}, "
                             f"after {timeout:g} s")
        time.sleep(0.05)


# --- the processes of a tree ------------------------------------------------------------


def daemon_names(tree: Tree) -> dict[int, str]:
    """pid -> daemon name (router, server@T, ...) of every live process of the tree."""
    out = {}
    for pid in tree.processes():
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in args]
        module = next((b for a, b in itertools.pairwise(words) if a == "-m"), "?")
        role = module.removeprefix("theychat.daemons.").replace("_", "-")
        topic = next((b for a, b in itertools.pairwise(words) if a == "--topic"),
                     None)
        name = f"{role}@{topic}" if topic else role
        out[pid] = f"{name} standby" if "--standby" in words else name
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def _kib(path: str, key: bytes) -> int:
    with open(path, "rb") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise BenchError(f"no {key.decode()} in {path}")


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS from /proc/PID/status VmRSS, PSS from /proc/PID/smaps_rollup), in KiB."""
    return _kib(f"/proc/{pid}/status", b"VmRSS:"), _kib(f"/proc/{pid}/smaps_rollup", b"Pss:")


class CpuMeter:
    """CPU time of every process of the tree (and of ourselves) between start and stop."""

    def __init__(self, tree: Tree) -> None:
        self.names = daemon_names(tree)
        self.names[os.getpid()] = "load generator"
        self._t0 = 0.0
        self._start: dict[int, float] = {}
        self.percent: dict[str, float] = {}

    def _sample(self) -> dict[int, float]:
        out = {}
        for pid in self.names:
            with contextlib.suppress(OSError):
                out[pid] = cpu_seconds(pid)
        return out

    def start(self) -> None:
        self._t0, self._start = time.monotonic(), self._sample()
        self._machine = machine_busy()

    def stop(self) -> dict[str, float]:
        """Percent of one core per process name over the interval, and under OTHERS what
        the rest of the machine used meanwhile (other programs: the noise)."""
        elapsed = time.monotonic() - self._t0
        end = self._sample()
        busy = machine_busy() - self._machine
        out: dict[str, float] = {}
        for pid, name in self.names.items():
            if pid in end and pid in self._start:
                out[name] = out.get(name, 0.0) + (end[pid] - self._start[pid]) / elapsed * 100
        out[OTHERS] = max(0.0, busy / elapsed * 100 - sum(out.values()))
        self.percent = dict(sorted(out.items()))
        return self.percent


OTHERS = "not TheyChat"
QUIET_PERCENT = 25.0  # of one core: what other programs may use while we measure
QUIET_WAIT_S = 20.0


def wait_quiet(tree: Tree, limit: float = QUIET_PERCENT, timeout: float = QUIET_WAIT_S
               ) -> float:
    """On a shared machine, wait (at most `timeout`) until programs other than the tree
    and us use under `limit` percent of a core over a second; returns what they used
    in the last second (the figures that follow are noisy if it is high)."""
    deadline = time.monotonic() + timeout
    while True:
        meter = CpuMeter(tree)
        meter.start()
        time.sleep(1.0)
        foreign = meter.stop()[OTHERS]
        if foreign < limit or time.monotonic() > deadline:
            if foreign >= limit:
                progress(f"  the machine is busy ({foreign:.0f}% of a core used by other "
                         "programs): measuring anyway")
            return foreign
        progress(f"  waiting for a quieter machine ({foreign:.0f}% of a core used by other "
                 "programs)")


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


# --- statistics and reports --------------------------------------------------------------


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def pct(values: Sequence[float], p: float) -> float | None:
    return nearest_rank(values, p) if values else None


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


@dataclass
class Target:
    name: str
    measured: str
    passed: bool

    def line(self) -> str:
        return f"  {'PASS' if self.passed else 'MISS'}  {self.name}: {self.measured}"


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=False,
                                cwd=Path(__file__).parent).stdout.strip()
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
        has_uvloop = True
    except ImportError:
        has_uvloop = False
    return {"cores": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(), "commit": commit,
            "uvloop_importable": has_uvloop,
            "loadavg_at_start": os.getloadavg()}


def bench_main(name: str, args: Any, run: Callable[[Any], dict[str, Any]],
               show: Callable[[dict[str, Any]], str]) -> int:
    """The common end of every benchmark's main: run, print the table and the targets,
    write --json; 1 on a failed run, 130 when interrupted (the tree is stopped)."""
    try:
        doc = run(args)
    except BenchError as e:
        print(f"{name}: FAILED: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted; the tree was stopped", file=sys.stderr)
        return 130
    print(show(doc))
    print("targets:")
    for t in doc["targets"]:
        print(Target(**t).line())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0

