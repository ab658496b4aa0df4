"""`theychat chat` itself, as a person runs it, for tests: the real line client in a
process of its own (optionally inside a network namespace), fed through its standard
input, its output kept in files and read back as JSON events (it is told `/json`, which
switches its display to the raw events). Every wait is bounded."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class LineClientProcess:
    def __init__(self, doors: str, nick: str, netns: str | None = None,
                 reconnect_for: float = 60.0) -> None:
        self.nick = nick
        self.dir = Path(tempfile.mkdtemp(prefix=f"tc-chat-{nick}-"))
        cmd = [sys.executable, "-m", "theychat.client", doors, "--reconnect-for",
               str(reconnect_for)]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.stdout, self.stderr = self.dir / "out", self.dir / "err"
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err)
        self.type("/json", f"/nick {nick}")

    def type(self, *lines: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("".join(line + "\n" for line in lines).encode())
        self.proc.stdin.flush()

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stdout.read_bytes().splitlines():
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if isinstance(ev, dict):
                    out.append(ev)
        return out

    def notes(self) -> str:
        return self.stderr.read_text(errors="replace")

    def wait(self, matches: Callable[[list[dict[str, Any]]], bool], what: str,
             timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            events = self.events()
            if matches(events):
                return events
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"{self.nick}: no {what} in {timeout}s (exit "
                                     f"{self.proc.poll()}); notes: {self.notes()[-2000:]}; "
                                     f"last events: {events[-8:]}")
            time.sleep(0.05)

    def wait_event(self, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        def found(events: list[dict[str, Any]]) -> bool:
            return any(all(e.get(k) == v for k, v in fields.items()) for e in events)

        events = self.wait(found, f"event {fields}", timeout)
        return next(e for e in events if all(e.get(k) == v for k, v in fields.items()))

    def join(self, topic: str, timeout: float = 10.0) -> None:
        self.type(f"/join {topic}")
        self.wait_event(timeout, type="joined", topic=topic)

    def said(self, topic: str, by: str) -> list[str]:
        """Texts of `by` in `topic` that reached us, in order (repeats included)."""
        return [e["text"] for e in self.events()
                if e.get("type") == "message" and e.get("topic") == topic
                and e.get("from") == by]

    def messages(self, topic: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("type") == "message"
                and e.get("topic") == topic]

    def acked(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("type") == "sent"]

    def quit(self, timeout: float = 10.0) -> int:
        """End of input: the client sends /quit and exits once the server closes."""
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            return -9

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
