"""The state of one topic, pure: members, history and the sequence counter.

The server shell owns the sockets; this owns the facts about who is here and what was
said, so it can be tested without either.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from theychat.daemons.protocol import fold
from theychat.daemons.render import Event


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
        self.durable_seq = next_seq - 1  # the last message the log holds (and was sent)
        self.ops: set[str] = set()  # folded nicks of this topic's operators
        self.bans: set[str] = set()  # folded nicks kept out

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

    def member_list(self) -> list[dict[str, str]]:
        return [{"sid": m.sid, "nick": m.nick} for m in self.members.values()]

    def nicks(self) -> list[str]:
        return sorted((m.nick for m in self.members.values()), key=str.lower)

    def find(self, nick: str) -> Member | None:
        key = fold(nick)
        return next((m for m in self.members.values() if fold(m.nick) == key), None)

    def post(self, sid: str, text: str, ts: float, action: bool = False,
             sender: str | None = None) -> Event:
        """Record a message from a member and return it, numbered."""
        msg: Event = {
            "type": "message",
            "topic": self.topic,
            "from": self.members[sid].nick,
            "text": text,
            "seq": self.next_seq,
            "ts": round(ts, 3),
        }
        if action:
            msg["action"] = True
        if sender:
            msg["sid"] = sender  # kept in the log; `public()` strips it for clients
        self.next_seq += 1
        if self._history_size > 0:
            self.history.append(msg)
        return msg

    @staticmethod
    def public(msg: Event) -> Event:
        """A message as clients see it: without the sender's (secret) session id."""
        return {k: v for k, v in msg.items() if k != "sid"} if "sid" in msg else msg

    def durable(self, seq: int) -> None:
        self.durable_seq = max(self.durable_seq, seq)

    def recent(self, n: int) -> list[Event]:
        """The last `n` messages that were sent out: history and live never overlap."""
        if n <= 0:
            return []
        return [self.public(m) for m in self.history if m["seq"] <= self.durable_seq][-n:]

    def after(self, seq: int) -> list[Event]:
        """Sent messages numbered after `seq` that history still holds (for a resume)."""
        return [m for m in self.history if seq < m["seq"] <= self.durable_seq]

    def is_op(self, nick: str) -> bool:
        return fold(nick) in self.ops

    def banned(self, nick: str) -> bool:
        return fold(nick) in self.bans

    # -- the write-ahead log's view: records that rebuild this state ----------------------

    def record_of(self, msg: Event) -> dict[str, Any]:
        rec = {"type": "msg", **{k: msg[k] for k in ("seq", "from", "text", "ts")}}
        for extra in ("action", "sid"):
            if msg.get(extra):
                rec[extra] = msg[extra]
        return rec

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
            if rec.get("action"):
                msg["action"] = True
            if isinstance(rec.get("sid"), str):
                msg["sid"] = rec["sid"]
            if self._history_size > 0:
                self.history.append(msg)
            self.next_seq = max(self.next_seq, rec["seq"] + 1)
            self.durable_seq = self.next_seq - 1  # replayed: it is in the log
        elif kind == "op" and isinstance(rec.get("nick"), str):
            self.ops.add(fold(rec["nick"]))
        elif kind == "ban" and isinstance(rec.get("nick"), str):
            self.bans.add(fold(rec["nick"]))
        elif kind == "kick":
            self.remove(str(rec.get("sid")))

    def snapshot(self) -> dict[str, Any]:
        return {"members": self.member_list(),
                "history": [self.record_of(m) for m in self.history],
                "next_seq": self.next_seq, "ops": sorted(self.ops), "bans": sorted(self.bans)}

    def restore(self, state: dict[str, Any]) -> None:
        for m in state.get("members", []):
            self.apply({"type": "join", **m})
        for rec in state.get("history", []):
            self.apply(rec)
        if isinstance(state.get("next_seq"), int):
            self.next_seq = max(self.next_seq, state["next_seq"])
            self.durable_seq = self.next_seq - 1
        for nick in state.get("ops", []):
            self.apply({"type": "op", "nick": nick})
        for nick in state.get("bans", []):
            self.apply({"type": "ban", "nick": nick})
