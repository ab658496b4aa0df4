"""Everything a client is sent is an event: a dict with a `type`.

In JSON mode the event is the line; in text mode it becomes one human line (or none, for
acknowledgements a person does not need). Building the dict once and rendering it once
per mode is what lets a server encode a message a single time for every member.
"""

from __future__ import annotations

import json

from client.text import Event as Event
from client.text import text_lines as text_lines

# json.dumps with options builds a new encoder at every call; events use this one.
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode_json(event: Event) -> bytes:
    return _JSON.encode(event).encode() + b"\n"


def encode_text(event: Event) -> bytes:
    lines = text_lines(event)
    return "".join(line + "\n" for line in lines).encode()


def encode(event: Event, json_mode: bool) -> bytes:
    return encode_json(event) if json_mode else encode_text(event)


def error(code: str, text: str) -> Event:
    return {"type": "error", "code": code, "text": text}
