"""The router's directory, pure: topics, the system-wide nick registry, and where each
session currently is (the lobby, or a topic's server).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from theychat.daemons.protocol import fold


class NickTaken(Exception):
    pass


@dataclass
class SessionInfo:
    sid: str
    nick: str
    topic: str | None = None  # None: in the lobby
    detached_at: float | None = None  # wall time its connection went; None: connected
    oper: bool = False  # a server operator (/oper)

    def record(self) -> dict[str, Any]:
        """The write-ahead log record that recreates this session."""
        return {"type": "session", "sid": self.sid, "nick": self.nick, "topic": self.topic,
                "detached_at": self.detached_at, "oper": self.oper}


class Directory:
    def __init__(self, topics: list[str], rng: random.Random | None = None) -> None:
        self.topics = list(topics)
        self.creators: dict[str, str] = {}  # topics made with /create -> creator's nick
        self.dropped: set[str] = set()  # configured topics an operator dropped
        self.sessions: dict[str, SessionInfo] = {}
        self._by_nick: dict[str, str] = {}  # folded nick -> sid
        self._rng = rng or random.Random()

    def topic_named(self, name: str) -> str | None:
        """The canonical spelling of a topic, matched case-insensitively."""
        key = fold(name)
        return next((t for t in self.topics if fold(t) == key), None)

    def add_topic(self, name: str, creator: str) -> None:
        if self.topic_named(name) is None:
            self.topics.append(name)
        self.creators[name] = creator
        self.dropped.discard(name)

    def drop_topic(self, name: str) -> None:
        if name in self.topics:
            self.topics.remove(name)
        if self.creators.pop(name, None) is None:
            self.dropped.add(name)
        for s in self.in_topic(name):
            s.topic = None

    def open_session(self, sid: str) -> SessionInfo:
        while True:
            nick = f"guest{self._rng.randrange(1000, 100000)}"
            if fold(nick) not in self._by_nick:
                break
        return self.register(sid, nick, None)

    def register(self, sid: str, nick: str, topic: str | None) -> SessionInfo:
        """Record a session as it is (used when servers report their members)."""
        owner = self._by_nick.get(fold(nick))
        if owner is not None and owner != sid:
            raise NickTaken(nick)
        old = self.sessions.get(sid)
        if old is not None:
            self._by_nick.pop(fold(old.nick), None)
        info = SessionInfo(sid, nick, topic, oper=old.oper if old else False)
        self.sessions[sid] = info
        self._by_nick[fold(nick)] = sid
        return info

    def rename(self, sid: str, nick: str) -> str:
        info = self.sessions[sid]
        owner = self._by_nick.get(fold(nick))
        if owner is not None and owner != sid:
            raise NickTaken(nick)
        old = info.nick
        self._by_nick.pop(fold(old), None)
        info.nick = nick
        self._by_nick[fold(nick)] = sid
        return old

    def move(self, sid: str, topic: str | None) -> None:
        self.sessions[sid].topic = topic

    def close_session(self, sid: str) -> SessionInfo | None:
        info = self.sessions.pop(sid, None)
        if info is not None and self._by_nick.get(fold(info.nick)) == sid:
            del self._by_nick[fold(info.nick)]
        return info

    def find_nick(self, nick: str) -> SessionInfo | None:
        sid = self._by_nick.get(fold(nick))
        return self.sessions.get(sid) if sid else None

    def detach(self, sid: str, now: float) -> SessionInfo | None:
        """The connection is gone; the session (and its nick) waits to be resumed."""
        info = self.sessions.get(sid)
        if info is not None and info.detached_at is None:
            info.detached_at = now
        return info

    def expired(self, now: float, expiry_s: float) -> list[SessionInfo]:
        return [s for s in self.sessions.values()
                if s.detached_at is not None and now - s.detached_at >= expiry_s]

    def apply(self, rec: dict[str, Any]) -> None:
        """Replay one log record; malformed ones are skipped."""
        if rec.get("type") == "session":
            sid, nick, topic = rec.get("sid"), rec.get("nick"), rec.get("topic")
            if not isinstance(sid, str) or not isinstance(nick, str):
                return
            try:
                info = self.register(sid, nick, topic if isinstance(topic, str) else None)
            except NickTaken:
                return
            at = rec.get("detached_at")
            info.detached_at = float(at) if isinstance(at, int | float) else None
            info.oper = rec.get("oper") is True
        elif rec.get("type") == "end":
            self.close_session(str(rec.get("sid")))
        elif rec.get("type") == "topic" and isinstance(rec.get("name"), str):
            self.add_topic(rec["name"], str(rec.get("creator", "")))
        elif rec.get("type") == "topic_dropped":
            self.drop_topic(str(rec.get("name")))

    def snapshot(self) -> dict[str, Any]:
        return {"sessions": [s.record() for s in self.sessions.values()],
                "created": [{"name": t, "creator": c} for t, c in self.creators.items()],
                "dropped": sorted(self.dropped)}

    def restore(self, state: dict[str, Any]) -> None:
        for rec in state.get("created", []):
            if isinstance(rec, dict):
                self.apply({"type": "topic", **rec})
        # A configured topic that was dropped stays dropped; one added to the config
        # later is simply there.
        for name in state.get("dropped", []):
            if isinstance(name, str):
                self.drop_topic(name)
        for rec in state.get("sessions", []):
            if isinstance(rec, dict):
                self.apply(rec)

    def in_topic(self, topic: str | None) -> list[SessionInfo]:
        return [s for s in self.sessions.values() if s.topic == topic]

    def counts(self) -> list[dict[str, object]]:
        tally = {t: 0 for t in self.topics}
        for s in self.sessions.values():
            if s.topic in tally and s.detached_at is None:  # here now, not away
                tally[s.topic] += 1
        return [{"name": t, "members": n} for t, n in tally.items()]
