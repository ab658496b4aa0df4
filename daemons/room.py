"""The state of one topic, pure: members, history and the sequence counter.

The server shell owns the sockets; this owns the facts about who is here and what was
said, so it can be tested without either.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

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
