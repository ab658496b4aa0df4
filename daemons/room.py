"""One topic's members, operators and bans, kept in its server's directory store.

The topic's messages are in its topic log (`topiclog.py`); this holds who is here and
who may do what. Keys (under the topic's own store):

    member/SID       {"nick", "host"}   in this topic now (the nick as shown here; the
                     host that holds its connection, in cluster mode). Just before it
                     goes, in cluster mode, also {"gone": PRESENCE}: how it left, for
                     the other hosts to tell their members (`left`, `kicked`, a reason)
    op/FOLDED        {}         an operator of this topic (its creator)
    ban/FOLDED       {"by", "host"}   kept out of this topic (by whom, on which host)

A member's nick is the topic's record of who said what: it changes only after the
directory (the router's) granted the new nick.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from theychat.daemons.protocol import fold
from theychat.daemons.store import DirectoryStore, Entry

MEMBER = "member/"
OP = "op/"
BAN = "ban/"


def member_key(sid: str) -> str:
    return MEMBER + sid


def member_value(nick: str, host: str = "") -> dict[str, Any]:
    return {"nick": nick, "host": host}


def op_key(nick: str) -> str:
    return OP + fold(nick)


def ban_key(nick: str) -> str:
    return BAN + fold(nick)


class Room:
    def __init__(self, topic: str, store: DirectoryStore, host: str = "") -> None:
        self.topic = topic
        self.store = store
        self.host = host  # ours (cluster mode): the members whose sockets we hold

    def members(self) -> dict[str, str]:
        """Session id -> nick of everyone in the topic."""
        return {e.key[len(MEMBER):]: str(e.value.get("nick")) for e in self.store.range(MEMBER)}

    def here(self) -> dict[str, str]:
        """Session id -> nick of the members our host holds."""
        return {e.key[len(MEMBER):]: str(e.value.get("nick")) for e in self.store.range(MEMBER)
                if str(e.value.get("host") or "") == self.host}

    def host_of(self, sid: str) -> str:
        entry = self.store.get(member_key(sid))
        return str(entry.value.get("host") or "") if entry else ""

    def nick_of(self, sid: str) -> str | None:
        entry = self.store.get(member_key(sid))
        nick = entry.value.get("nick") if entry else None
        return nick if isinstance(nick, str) else None

    def nicks(self) -> list[str]:
        return sorted(self.members().values(), key=str.lower)

    def find(self, nick: str) -> tuple[str, str] | None:
        """(session id, nick) of the member called `nick`, if there is one."""
        key = fold(nick)
        return next(((sid, n) for sid, n in self.members().items() if fold(n) == key), None)

    def find_folded(self, folded: str) -> tuple[str, str] | None:
        return next(((sid, n) for sid, n in self.members().items() if fold(n) == folded), None)

    def member_list(self) -> list[dict[str, str]]:
        return [{"sid": sid, "nick": nick} for sid, nick in self.members().items()]

    def is_op(self, nick: str) -> bool:
        return self.store.get(op_key(nick)) is not None

    def banned(self, nick: str) -> bool:
        return self.store.get(ban_key(nick)) is not None

    def join(self, sid: str, nick: str) -> Awaitable[Entry]:
        return self.store.put(member_key(sid), member_value(nick, self.host))

    def leave(self, sid: str, gone: dict[str, Any] | None = None) -> Awaitable[bool]:
        """The member goes; in cluster mode `gone` (the presence event's `event`,
        `reason`, `by`) is written first, so the other hosts can say how."""
        entry = self.store.get(member_key(sid))
        if self.host and gone and entry is not None:
            self.store.put(member_key(sid), {**entry.value, "gone": gone})
        return self.store.delete(member_key(sid))

    def rename(self, sid: str, nick: str) -> tuple[str | None, Awaitable[Entry]]:
        """(the old nick, the write): the directory already granted `nick`."""
        return self.nick_of(sid), self.store.put(member_key(sid),
                                                 member_value(nick, self.host_of(sid)))

    def add_op(self, nick: str) -> Awaitable[Entry | None]:
        return self.store.create(op_key(nick), {})

    def ban(self, nick: str, by: str) -> Awaitable[Entry]:
        return self.store.put(ban_key(nick), {"by": by, "host": self.host})
