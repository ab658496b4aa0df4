"""A TheyChat tree of our own for soaks and benchmarks: a fresh state directory and a free
loopback port, started with `theychat up`, and always stopped, leaving no process behind."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from theychat.daemons import config, procs, status
from theychat.daemons.paths import StatePaths

HOST = "127.0.0.1"
CLI_TIMEOUT_S = 60.0


def ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free loopback port below the ephemeral range. A port inside it can be taken, while
    its daemon restarts, by a client's own outgoing connection: connecting to a port
    nobody listens on may pick that very port as the local one and connect to itself
    (TCP simultaneous open), and the restarted daemon then cannot listen."""
    low = min(ephemeral_ports()[0], 32768)
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.randrange(10000, low)
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, one level deep for mappings."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = {**(out.get(key) or {}), **value} if isinstance(value, dict) else value
    return out


class Tree:
    def __init__(self, overrides: dict[str, Any], keep: bool = False,
                 base: dict[str, Any] | None = None, prefix: str = "tc-tree-") -> None:
        # Short path under /tmp: Unix socket paths are limited to 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.state = self.root / "state"
        self.port = free_port()
        self.keep = keep
        cfg = merge(merge(base or {}, {"state_dir": str(self.state),
                                       "listen": {"host": HOST, "port": self.port}}),
                    overrides)
        self.config = self.root / "theychat.yaml"
        self.config.write_text(json.dumps(cfg, indent=2) + "\n")  # JSON is YAML
        self.cfg = config.load(str(self.config))
        self.paths = StatePaths(self.state)

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "theychat.daemons", *args, "--config",
                               str(self.config)], capture_output=True, text=True,
                              timeout=timeout, check=False)

    def up(self) -> None:
        res = self.cli("up")
        if res.returncode != 0:
            raise RuntimeError(f"theychat up failed: {res.stderr.strip()}")

    def status(self) -> list[dict[str, Any]]:
        """The rows of `theychat status --json`, computed in-process (milliseconds instead
        of a Python start-up per poll)."""
        return status.gather(self.cfg, self.paths)

    def pid_record(self, name: str) -> procs.PidRecord | None:
        return procs.read_pidfile(self.paths.pidfile(name))

    def log(self, name: str) -> Path:
        return self.paths.log(name)

    def processes(self) -> list[int]:
        """Every live daemon of this tree (`python -m theychat.daemons.*` with our state dir in
        its command line), so nothing is left behind, not even a stopped one."""
        found = []
        needle = str(self.state).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            ours = any(a == b"-m" and b.startswith(b"theychat.daemons.")
                       for a, b in itertools.pairwise(args))
            if ours and any(needle in a for a in args) and procs.alive(int(entry.name)):
                found.append(int(entry.name))
        return found

    def stop(self, remove: bool = True) -> list[int]:
        """`theychat down`, then SIGKILL whatever is still there; returns those pids."""
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            self.cli("down")
        left = self.processes()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        if remove and not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        return left


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a log or transcript file; torn or foreign lines are skipped."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if isinstance(ev, dict):
                    yield ev
