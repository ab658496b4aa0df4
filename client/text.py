"""How a TheyChat event (a JSON object with a `type`) reads as text, for people.

The servers use this for connections in text mode, and the line client for the JSON it
receives, so both show exactly the same lines. Standard library only.
"""

from __future__ import annotations

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
    if t == "sent":
        return []  # a person saw what they typed; programs get the seq in JSON mode
    return [f"* {event.get('text', t)}"]
