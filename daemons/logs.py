"""structlog JSON lines, one file per daemon; event names are an interface (docs/events.md)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, TextIO

import structlog

Logger = Any  # structlog's bound logger; its methods are dynamic


def configure(path: Path, level: str, **bound: Any) -> Logger:
    # Line-buffered: a SIGKILL must not take the last events with it.
    stream: TextIO = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
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
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger().bind(**bound)


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
