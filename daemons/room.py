"""The state of one topic, pure: members, history and the sequence counter.

The server shell owns the sockets; this owns the facts about who is here and what was
said, so it can be tested without either.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from daemons.protocol import fold
from daemons.render import Event


@dataclass
class Member:
    sid: str
    nick: str


class Room:
    def __init__(self, topic: str, history_size: int, next_seq: int = 1) -> None:
        self.topic = topic
        self.members: dict[str, Member] = {}
        self.history: deque[Event] = deque(maxlen=max(history_size, 0) or None)
        self._history_size = history_size
        self.next_seq = next_seq

    def add(self, sid: str, nick: str) -> Member:
        member = Member(sid, nick)
        self.members[sid] = member
        return member

    def remove(self, sid: str) -> Member | None:
        return self.members.pop(sid, None)

    def rename(self, sid: str, nick: str) -> str:
        member = self.members[sid]
        old, member.nick = member.nick, nick
        return old

    def nicks(self) -> list[str]:
        return sorted((m.nick for m in self.members.values()), key=str.lower)

    def find(self, nick: str) -> Member | None:
        key = fold(nick)
        return next((m for m in self.members.values() if fold(m.nick) == key), None)

    def post(self, sid: str, text: str, ts: float) -> Event:
        """Record a message from a member and return it, numbered."""
        msg: Event = {
            "type": "message",
            "topic": self.topic,
            "from": self.members[sid].nick,
            "text": text,
            "seq": self.next_seq,
            "ts": round(ts, 3),
        }
        self.next_seq += 1
        if self._history_size > 0:
            self.history.append(msg)
        return msg

    def recent(self, n: int) -> list[Event]:
        if n <= 0:
            return []
        return list(self.history)[-n:]

    def after(self, seq: int) -> list[Event]:
        """Messages numbered after `seq` that history still holds (for a resume)."""
        return [m for m in self.history if m["seq"] > seq]

    # -- the write-ahead log's view: records that rebuild this state ----------------------

    def record_of(self, msg: Event) -> dict[str, Any]:
        return {"type": "msg", **{k: msg[k] for k in ("seq", "from", "text", "ts")}}

    def apply(self, rec: dict[str, Any]) -> None:
        """Replay one log record; unknown or malformed records are skipped, not fatal."""
        kind = rec.get("type")
        if kind == "join" and isinstance(rec.get("sid"), str) and isinstance(rec.get("nick"), str):
            self.add(rec["sid"], rec["nick"])
        elif kind == "leave":
            self.remove(str(rec.get("sid")))
        elif kind == "nick" and rec.get("sid") in self.members:
            self.rename(rec["sid"], str(rec.get("nick")))
        elif kind == "msg" and isinstance(rec.get("seq"), int):
            msg = {"type": "message", "topic": self.topic, "from": rec.get("from"),
                   "text": rec.get("text"), "seq": rec["seq"], "ts": rec.get("ts")}
            if self._history_size > 0:
                self.history.append(msg)
            self.next_seq = max(self.next_seq, rec["seq"] + 1)

    def snapshot(self) -> dict[str, Any]:
        return {"members": [{"sid": m.sid, "nick": m.nick} for m in self.members.values()],
                "history": [self.record_of(m) for m in self.history],
                "next_seq": self.next_seq}

    def restore(self, state: dict[str, Any]) -> None:
        for m in state.get("members", []):
            self.apply({"type": "join", **m})
        for rec in state.get("history", []):
            self.apply(rec)
        if isinstance(state.get("next_seq"), int):
            self.next_seq = max(self.next_seq, state["next_seq"])
