"""structlog JSON lines, one file per daemon; event names are an interface (docs/events.md)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any, TextIO

import structlog

Logger = Any  # structlog's bound logger; its methods are dynamic


class LogFile:
    """A daemon's log file, line-buffered (a SIGKILL must not take the last events with
    it), that never raises: a full disk loses log lines, never the daemon (nor the
    coroutine that logged)."""

    def __init__(self, path: Path) -> None:
        self._file: TextIO = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self.lost = 0  # lines a write error cost

    def write(self, text: str) -> None:
        try:
            self._file.write(text)
        except (OSError, ValueError):
            self.lost += 1

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._file.flush()


def configure(path: Path, level: str, **bound: Any) -> Logger:
    stream: Any = LogFile(path)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)
        ),
        logger_factory=_factory(stream, journal_stream()),
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger().bind(**bound)


def journal_stream() -> TextIO | None:
    """stdout, if systemd connected it to the journal ($JOURNAL_STREAM names it); not when
    a spawned daemon's stdout is its NAME.stderr file, even under a systemd unit."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    return sys.stdout if want == f"{st.st_dev}:{st.st_ino}" else None


# sd-daemon(3) priority prefixes: journald strips them and files the line at that level.
_PRIORITY = {"debug": 7, "info": 6, "msg": 6, "warning": 4, "warn": 4, "error": 3, "err": 3,
             "exception": 3, "critical": 2, "fatal": 2}


class _Tee:
    """Each JSON line to the log file and, as it is, to the journal with its priority."""

    def __init__(self, file: LogFile, journal: TextIO) -> None:
        self._file, self._journal = file, journal

    def __getattr__(self, method: str) -> Any:
        priority = _PRIORITY.get(method, 6)

        def write(message: str) -> None:
            self._file.write(message + "\n")
            try:
                self._journal.write(f"<{priority}>{message}\n")
                self._journal.flush()
            except (OSError, ValueError):
                pass  # journald restarting: the file still has the line

        return write


def _factory(file: LogFile, journal: TextIO | None) -> Any:
    if journal is None:
        return structlog.WriteLoggerFactory(file=typing.cast(TextIO, file))
    return lambda *args: _Tee(file, journal)


_SKIP = {"event", "ts", "level", "role", "topic", "pid", "incarnation"}


def human(line: str) -> str | None:
    """One JSON log line as a short human line, for `theychat up --foreground`."""
    try:
        ev = json.loads(line)
    except ValueError:
        return None
    if not isinstance(ev, dict):
        return None
    ts = str(ev.get("ts", ""))[11:23] or time.strftime("%H:%M:%S")
    who = ev.get("role", "?") + (f"@{ev['topic']}" if ev.get("topic") else "")
    level = ev.get("level", "info")
    mark = {"warning": " WARN", "error": " ERROR", "critical": " CRIT"}.get(level, "")
    extras = " ".join(f"{k}={v}" for k, v in ev.items() if k not in _SKIP)
    return f"{ts} {who:<24} {ev.get('event', '?')}{mark} {extras}".rstrip()
