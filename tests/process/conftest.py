"""Process-level fixtures: a real TheyChat tree on a free loopback port in a temporary
state directory, and line clients that talk to it. Every wait is bounded in time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from theychat.daemons.soak.tree import free_port

THEYCHAT = [sys.executable, "-m", "theychat.daemons"]
WAIT_S = 10.0


def run_cli(*args: str, timeout: float = 40) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*THEYCHAT, *args], capture_output=True, text=True, timeout=timeout)


@dataclass
class Tree:
    config: Path
    state: Path
    port: int

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, "--config", str(self.config))

    def status(self) -> list[dict[str, Any]]:
        res = self.cli("status", "--json")
        rows: list[dict[str, Any]] = json.loads(res.stdout)
        return rows

    def pid(self, name: str) -> int:
        return int(json.loads((self.state / "run" / f"{name}.pid").read_text())["pid"])

    def pids(self) -> list[int]:
        out = []
        for f in (self.state / "run").glob("*.pid"):
            out.append(int(json.loads(f.read_text())["pid"]))
        return out

    def log_events(self, name: str) -> list[dict[str, Any]]:
        path = self.state / "logs" / f"{name}.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wait_healthy(self, timeout: float = WAIT_S) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            rows = self.status()
            if all(r["state"] == "ready" for r in rows):
                return rows
            time.sleep(0.1)
        raise AssertionError(f"tree not healthy in {timeout}s: {rows}")

    def wait_event(self, name: str, event: str, timeout: float = WAIT_S, after: str = "",
                   **fields: Any) -> dict[str, Any]:
        """The first `event` in NAME's log with these fields (and a ts later than `after`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.log_events(name):
                if ev["event"] == event and ev["ts"] > after and all(
                    ev.get(k) == v for k, v in fields.items()
                ):
                    return ev
            time.sleep(0.05)
        raise AssertionError(f"no {event} {fields} in {name}'s log within {timeout}s")


def processes_of(state: Path) -> list[str]:
    """Command lines of every process still running on this state directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if str(state) in cmd and stat[stat.rindex(")") + 2] != "Z":
            found.append(f"{entry.name}: {cmd}")
    return found


def make_config(extra: dict[str, Any] | None = None) -> tuple[Path, Path, int]:
    # Short path under /tmp: Unix socket paths are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="tc-", dir="/tmp"))
    port = free_port()
    cfg: dict[str, Any] = {
        "state_dir": str(root / "state"),
        "listen": {"port": port},
        "topics": ["rust", "python"],
    }
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(cfg.get(key), list):
            cfg[key] = {"names": cfg[key], **value}  # `topics` in its long form
        elif isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    path = root / "theychat.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, root / "state", port


@pytest.fixture
def make_tree() -> Iterator[Any]:
    """Factory: start a tree with optional config overrides; all are stopped after."""
    trees: list[Tree] = []

    def start(extra: dict[str, Any] | None = None) -> Tree:
        path, state, port = make_config(extra)
        tree = Tree(path, state, port)
        trees.append(tree)
        res = tree.cli("up")
        assert res.returncode == 0, res.stderr
        return tree

    yield start
    for tree in trees:
        tear_down(tree)


def tear_down(tree: Tree) -> None:
    """Stop a tree and prove nothing of it is left (strays are killed all the same)."""
    tree.cli("down")
    left = processes_of(tree.state)
    for line in left:  # never leave strays behind, even when the test failed
        os.kill(int(line.split(":")[0]), signal.SIGKILL)
    if not os.environ.get("THEYCHAT_KEEP"):  # keep logs to debug a failure
        shutil.rmtree(tree.state.parent, ignore_errors=True)
    assert not left, f"processes left after down: {left}"


@pytest.fixture(scope="module")
def tree() -> Iterator[Tree]:
    """One shared tree for the chat tests of a module (they use distinct nicks)."""
    path, state, port = make_config({"clients": {"rate_per_second": 1000, "rate_burst": 1000}})
    t = Tree(path, state, port)
    res = t.cli("up")
    assert res.returncode == 0, res.stderr
    yield t
    tear_down(t)


class Client:
    """A line client over a plain socket, with bounded waits."""

    def __init__(self, port: int, nick: str | None = None, json_mode: bool = False,
                 wrap: Callable[[socket.socket], socket.socket] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        if wrap is not None:
            self.sock = wrap(self.sock)
        self.buf = b""
        self.lines: list[str] = []  # everything received, in order
        self.greeting = self.expect(r"welcome to TheyChat")
        self.session = re.search(r"session ([0-9a-f]+)", self.greeting)[1]  # type: ignore[index]
        if nick:
            self.send(f"/nick {nick}")
            self.expect(rf"you are now {nick}")
        if json_mode:
            self.send("/json")
            self.expect(r'"json":true')

    def send(self, line: str | bytes) -> None:
        data = line if isinstance(line, bytes) else line.encode() + b"\n"
        self.sock.sendall(data)

    def _read_line(self, deadline: float) -> str | None:
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not data:
                raise EOFError("server closed the connection")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        text = line.decode("utf-8", errors="replace")
        self.lines.append(text)
        return text

    def _until(self, matches: Callable[[str], bool], what: str, timeout: float) -> str:
        """Read lines until one matches; the ones before it are skipped."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            line = self._read_line(deadline)
            if line is None:
                raise AssertionError(f"no {what} in {timeout}s; got {seen}")
            seen.append(line)
            if matches(line):
                return line

    def expect(self, pattern: str, timeout: float = WAIT_S) -> str:
        rx = re.compile(pattern)
        return self._until(lambda ln: rx.search(ln) is not None,
                           f"line matching {pattern!r}", timeout)

    def expect_json(self, timeout: float = WAIT_S, **fields: Any) -> dict[str, Any]:
        def matches(line: str) -> bool:
            obj = json.loads(line)
            return all(obj.get(k) == v for k, v in fields.items())

        obj: dict[str, Any] = json.loads(self._until(matches, f"JSON line with {fields}",
                                                     timeout))
        return obj

    def quiet(self, duration: float = 0.3) -> list[str]:
        """Lines that arrive within `duration` (to assert that nothing does)."""
        got = []
        deadline = time.monotonic() + duration
        while (line := self._read_line(deadline)) is not None:
            got.append(line)
        return got

    def join(self, topic: str) -> None:
        self.send(f"/join {topic}")
        self.expect(rf"you are in {topic} with")

    def close(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        """Vanish abruptly: RST instead of FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()
