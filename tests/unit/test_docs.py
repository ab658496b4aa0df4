"""The docs are an interface too: they must name what the code does."""

from __future__ import annotations

import re
from pathlib import Path

from theychat.daemons.protocol import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
EVENT_CALL = re.compile(
    r"\b(?:log|logger|_log|self\.log|d\.log)\.(?:debug|info|warning|error|critical|exception)"
    r'\(\s*"([a-z_]+)"'
)


def test_every_command_is_documented_with_its_usage() -> None:
    doc = (ROOT / "docs" / "protocol.md").read_text()
    missing = [spec.usage for spec in COMMANDS.values() if spec.usage not in doc]
    assert missing == [], f"docs/protocol.md does not show: {missing}"


def test_every_logged_event_is_documented() -> None:
    doc = (ROOT / "docs" / "events.md").read_text()
    names = set()
    for source in [*ROOT.joinpath("daemons").glob("*.py"), *ROOT.joinpath("client").glob("*.py")]:
        names |= set(EVENT_CALL.findall(source.read_text()))
    assert len(names) > 30  # the pattern still finds the calls
    missing = sorted(n for n in names if not re.search(rf"\b{n}\b", doc))
    assert missing == [], f"docs/events.md does not list: {missing}"
