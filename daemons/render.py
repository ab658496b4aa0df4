"""Everything a client is sent is an event: a dict with a `type`.

In JSON mode the event is the line; in text mode it becomes one human line (or none, for
acknowledgements a person does not need). Building the dict once and rendering it once
per mode is what lets a server encode a message a single time for every member.

The line client shows the JSON it receives with the same `text_lines`, so a person sees
the same lines through `theychat chat` as through `nc`. Standard library only: the
client imports this module.
"""

from __future__ import annotations

import json
from typing import Any

Event = dict[str, Any]


def _names(names: list[str]) -> str:
    return ", ".join(names) if names else "nobody"


def _message_text(m: Event, *, history: bool = False) -> str:
    mark = f" #{m['seq']}" if history else ""
    if m.get("action"):
        return f"[{m['topic']}{mark}] * {m['from']} {m['text']}"
    return f"[{m['topic']}{mark}] {m['from']}: {m['text']}"


def text_lines(event: Event) -> list[str]:
    t = event["type"]
    if t == "message":
        return [_message_text(event)]
    if t == "dm":
        return [f"[dm from {event['from']}] {event['text']}"]
    if t == "error":
        return [f"! {event['text']}"]
    if t == "presence":
        what = {"joined": "joined", "left": "left"}.get(event["event"], event["event"])
        if event["event"] == "renamed":
            return [f"* {event['old']} is now known as {event['nick']}"]
        if event["event"] == "kicked":
            why = f": {event['reason']}" if event.get("reason") else ""
            return [f"* {event['nick']} was kicked from {event['topic']} by {event['by']}{why}"]
        reason = f" ({event['reason']})" if event.get("reason") else ""
        return [f"* {event['nick']} {what} {event['topic']}{reason}"]
    if t == "topics":
        parts = [
            f"{x['name']} ({x['members']}" + ("" if x.get("available", True) else ", unavailable")
            + ")"
            for x in event["topics"]
        ]
        return ["* topics (members): " + (", ".join(parts) or "none")]
    if t == "who":
        where = event["topic"] or "the lobby"
        return [f"* in {where}: {_names(event['members'])}"]
    if t == "history":
        lines = [_message_text(m, history=True) for m in event["messages"]]
        count = len(event["messages"])
        return [f"* history of {event['topic']}: {count} message(s)", *lines]
    if t == "joined":
        return [
            f"* you are in {event['topic']} with {_names(event['members'])}; "
            "type to talk, /leave for the lobby"
        ]
    if t == "left":
        return [f"* you left {event['topic']}; you are in the lobby"]
    if t == "resumed":
        where = f"; back to {event['topic']}" if event.get("topic") else ""
        return [f"* welcome back, {event['nick']} (session {event['session']}){where}"]
    if t == "hello":
        return [
            f"* welcome to TheyChat, {event['nick']} (session {event['session']}). "
            "Type /help for commands."
        ]
    if t == "help":
        return ["* " + line for line in event["lines"]]
    if t in ("ok", "notice", "bye"):
        return [f"* {event['text']}"] if event.get("text") else []
    if t in ("sent", "caught_up"):
        return []  # a person saw what they typed; programs get the numbers in JSON mode
    return [f"* {event.get('text', t)}"]


# json.dumps with options builds a new encoder at every call; events use this one.
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode_json(event: Event) -> bytes:
    return _JSON.encode(event).encode() + b"\n"


def encode_text(event: Event) -> bytes:
    lines = text_lines(event)
    return "".join(line + "\n" for line in lines).encode()


def encode(event: Event, json_mode: bool) -> bytes:
    return encode_json(event) if json_mode else encode_text(event)


def error(code: str, text: str, line: int | None = None) -> Event:
    """An error; `line`: the number of the client's line it refuses (`/say N`)."""
    event: Event = {"type": "error", "code": code, "text": text}
    if line is not None:
        event["line"] = line
    return event
