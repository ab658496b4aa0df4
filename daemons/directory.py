"""The router's directory: topics, the nick registry and sessions, kept in a directory
store (`store.py`) and nowhere else.

A person's facts (nick, where they are, server-operator rights, the address they came
from) live in their session's entry; every other place holds only the session id. Keys:

    session/SID       {"nick", "topic", "detached_at", "oper", "addr", "host"}  expires
                      once detached for `sessions.expiry_s` (a time to live on the entry)
    nick/FOLDED       {"sid", "at"}  created if absent: one session per nick
    topic/NAME        {"creator"}  a topic made with /create
    dropped/NAME      {}           a configured topic that was dropped

Every change is a store write whose outcome is awaited before anyone is told (a nick
race has one winner); updates are compare-and-set against the entry read, retried if
it moved on meanwhile.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from theychat.daemons.protocol import fold
from theychat.daemons.store import Change, DirectoryStore, Entry, KvState

SESSION = "session/"
NICK = "nick/"
TOPIC = "topic/"
DROPPED = "dropped/"
CAS_TRIES = 10  # an update whose entry keeps moving gives up after this many tries
# A nick claim whose session does not name it is an orphan (its router died between the
# two writes) only once it is this old: in a cluster, another host may be between them.
ORPHAN_AFTER_S = 60.0


class NickTaken(Exception):
    pass


class StoreConflict(Exception):
    """An entry kept changing under a compare-and-set (another writer is busy on it)."""


def session_key(sid: str) -> str:
    return SESSION + sid


def nick_key(nick: str) -> str:
    return NICK + fold(nick)


@dataclass(frozen=True)
class Session:
    """A session as the directory keeps it: the one home of a person's facts."""

    sid: str
    nick: str
    topic: str | None = None  # None: in the lobby
    detached_at: float | None = None  # wall time its connection went; None: connected
    oper: bool = False  # a server operator (/oper)
    addr: str = ""  # the address its connection comes from
    host: str = ""  # the host that holds its connection (cluster mode; "" on one host)

    def value(self) -> dict[str, Any]:
        return {"nick": self.nick, "topic": self.topic, "detached_at": self.detached_at,
                "oper": self.oper, "addr": self.addr, "host": self.host}

    @classmethod
    def of(cls, entry: Entry) -> Session | None:
        v = entry.value
        nick, topic, at = v.get("nick"), v.get("topic"), v.get("detached_at")
        if not isinstance(nick, str):
            return None
        return cls(entry.key[len(SESSION):], nick, topic if isinstance(topic, str) else None,
                   float(at) if isinstance(at, int | float) else None, v.get("oper") is True,
                   str(v.get("addr") or ""), str(v.get("host") or ""))


class Directory:
    def __init__(self, store: DirectoryStore, configured: list[str], expiry_s: float,
                 rng: random.Random | None = None,
                 clock: Callable[[], float] = time.time, host: str = "") -> None:
        self.store = store
        self.host = host  # ours, in cluster mode: the sessions whose connections we hold
        self.configured = list(configured)
        self.expiry_s = expiry_s
        self._rng = rng or random.Random()
        self.clock = clock

    # -- topics ------------------------------------------------------------------------

    @property
    def topics(self) -> list[str]:
        """The configured topics not dropped, then the created ones, oldest first."""
        dropped = {e.key[len(DROPPED):] for e in self.store.range(DROPPED)}
        created = sorted(self.store.range(TOPIC), key=lambda e: e.revision)
        names = [t for t in self.configured if t not in dropped]
        return names + [e.key[len(TOPIC):] for e in created
                        if e.key[len(TOPIC):] not in names]

    def topic_named(self, name: str) -> str | None:
        """The canonical spelling of a topic, matched case-insensitively."""
        key = fold(name)
        return next((t for t in self.topics if fold(t) == key), None)

    def creator(self, topic: str) -> str | None:
        entry = self.store.get(TOPIC + topic)
        creator = entry.value.get("creator") if entry else None
        return creator if isinstance(creator, str) and creator else None

    async def add_topic(self, name: str, creator: str) -> None:
        await self.store.put(TOPIC + name, {"creator": creator})
        await self.store.delete(DROPPED + name)

    async def drop_topic(self, name: str) -> None:
        """Forget a topic; its sessions are in the lobby from now on."""
        if self.store.get(TOPIC + name) is not None:
            await self.store.delete(TOPIC + name)
        if name in self.configured:
            await self.store.put(DROPPED + name, {})
        for s in self.in_topic(name):
            await self._update(s.sid, topic=None)

    # -- reading sessions ----------------------------------------------------------------

    def session(self, sid: str) -> Session | None:
        entry = self.store.get(session_key(sid))
        return Session.of(entry) if entry else None

    def sessions(self) -> list[Session]:
        return [s for e in self.store.range(SESSION) if (s := Session.of(e)) is not None]

    def find_nick(self, nick: str) -> Session | None:
        claim = self.store.get(nick_key(nick))
        sid = claim.value.get("sid") if claim else None
        found = self.session(sid) if isinstance(sid, str) else None
        return found if found and fold(found.nick) == fold(nick) else None

    def in_topic(self, topic: str | None, here: bool = False) -> list[Session]:
        """The sessions placed in `topic` (None: the lobby); `here`: of our host only."""
        return [s for s in self.sessions()
                if s.topic == topic and (not here or s.host == self.host)]

    def connected_from(self, addr: str) -> int:
        """Sessions connected now from this address (for clients.max_per_address)."""
        return sum(1 for s in self.sessions() if s.addr == addr and s.detached_at is None)

    def counts(self) -> list[dict[str, object]]:
        tally = {t: 0 for t in self.topics}
        for s in self.sessions():
            if s.topic in tally and s.detached_at is None:  # here now, not away
                tally[s.topic] += 1
        return [{"name": t, "members": n} for t, n in tally.items()]

    # -- changing sessions ---------------------------------------------------------------

    async def _claim(self, sid: str, nick: str) -> None:
        """Take `nick` for `sid` (or find it already ours); NickTaken if it is someone's."""
        key = nick_key(nick)
        claim = {"sid": sid, "at": self.clock()}
        if await self.store.create(key, claim) is not None:
            return
        holder = self.store.get(key)
        if holder is None or holder.value.get("sid") == sid:
            if holder is None:
                await self._claim(sid, nick)  # released meanwhile: try again
            return
        # A claim whose session does not name it (the router died between) is free.
        if self._orphan(holder) and await self.store.compare_and_set(key, claim,
                                                                    holder.revision):
            return
        raise NickTaken(nick)

    def _orphan(self, claim: Entry) -> bool:
        sid, at = claim.value.get("sid"), claim.value.get("at")
        owner = self.session(sid) if isinstance(sid, str) else None
        if owner is not None and nick_key(owner.nick) == claim.key:
            return False
        old = not isinstance(at, int | float) or self.clock() - at > ORPHAN_AFTER_S
        return old or not self.host

    async def _release(self, sid: str, nick: str) -> None:
        claim = self.store.get(nick_key(nick))
        if claim is not None and claim.value.get("sid") == sid:
            await self.store.delete(claim.key, claim.revision)

    async def _update(self, sid: str, only_if: Callable[[Session], bool] | None = None,
                      **changes: Any) -> Session | None:
        """Change a session's entry (compare-and-set, retried); None if it has none (or
        it is not, at the time of the write, as `only_if` wants)."""
        for _ in range(CAS_TRIES):
            entry = self.store.get(session_key(sid))
            current = Session.of(entry) if entry else None
            if entry is None or current is None or (only_if and not only_if(current)):
                return None
            new = replace(current, **changes)
            ttl = self._ttl(new)
            if await self.store.compare_and_set(entry.key, new.value(), entry.revision, ttl):
                return new
        raise StoreConflict(session_key(sid))

    def _ttl(self, s: Session) -> float | None:
        """A detached session expires `sessions.expiry_s` after its connection went."""
        if s.detached_at is None:
            return None
        return max(0.0, s.detached_at + self.expiry_s - self.clock())

    async def open_session(self, sid: str, addr: str = "") -> Session:
        """A new connection: a session with a guest nick of its own."""
        while True:
            nick = f"guest{self._rng.randrange(1000, 100000)}"
            try:
                await self._claim(sid, nick)
                break
            except NickTaken:
                continue
        session = Session(sid, nick, addr=addr, host=self.host)
        await self.store.put(session_key(sid), session.value())
        return session

    async def register(self, sid: str, nick: str, topic: str | None, addr: str = "") -> Session:
        """Record a session as a server reports it (after a restart lost track of it);
        NickTaken if its nick is someone else's now."""
        old = self.session(sid)
        if old is None or fold(old.nick) != fold(nick):
            await self._claim(sid, nick)
            if old is not None:
                await self._release(sid, old.nick)
        if old is None:
            new = Session(sid, nick, topic, addr=addr, host=self.host)
            await self.store.put(session_key(sid), new.value())
            return new
        updated = await self._update(sid, nick=nick, topic=topic, detached_at=None,
                                     host=self.host)
        assert updated is not None
        return updated

    async def rename(self, sid: str, nick: str) -> str:
        """Give the session a new nick; returns the old one. NickTaken if it is taken."""
        current = self.session(sid)
        if current is None:
            raise KeyError(sid)
        await self._claim(sid, nick)
        if fold(current.nick) != fold(nick):
            await self._release(sid, current.nick)
        await self._update(sid, nick=nick)
        return current.nick

    async def move(self, sid: str, topic: str | None) -> Session | None:
        return await self._update(sid, topic=topic, host=self.host)

    def on_change(self, prefix: str, callback: Callable[[Change], None]) -> None:
        """Follow the directory's keys under `prefix` (SESSION, TOPIC, DROPPED, ...)."""
        self.store.watch(prefix, callback)

    async def detach(self, sid: str) -> Session | None:
        """The connection is gone; the session (and its nick) waits to be resumed."""
        s = self.session(sid)
        if s is None or s.detached_at is not None:
            return s
        return await self._update(sid, detached_at=self.clock())

    async def detach_host(self, host: str) -> int:
        """Every connected session of a host that is gone (cluster mode): detached, so
        it can be resumed elsewhere and expires if not. How many."""
        def still_there(s: Session) -> bool:  # not resumed elsewhere meanwhile
            return s.host == host and s.detached_at is None

        count = 0
        for s in self.sessions():
            if still_there(s):
                try:
                    if await self._update(s.sid, still_there, detached_at=self.clock()):
                        count += 1
                except StoreConflict:
                    continue  # another host did it, or the session moved meanwhile
        return count

    async def attach(self, sid: str, addr: str, topic: str | None = None) -> Session | None:
        """A connection (of our host) holds the session again (a resume)."""
        return await self._update(sid, detached_at=None, addr=addr, topic=topic,
                                  host=self.host)

    async def grant_oper(self, sid: str) -> Session | None:
        return await self._update(sid, oper=True)

    async def end(self, sid: str) -> Session | None:
        """The session is over (/quit, or it expired): its nick is free again."""
        s = self.session(sid)
        if s is None:
            return None
        await self.store.delete(session_key(sid))
        await self._release(sid, s.nick)
        return s

    def on_expired(self, callback: Callable[[Session], None]) -> None:
        """Call `callback` for each session that expires (its nick is then released)."""
        def changed(c: Change) -> None:
            if c.expired and c.prev is not None:
                gone = Session.of(c.prev)
                if gone is not None:
                    callback(gone)

        self.store.watch(SESSION, changed)

    async def release_expired(self, s: Session) -> None:
        await self._release(s.sid, s.nick)

    async def repair(self) -> None:
        """At start: a detached session without its time to live (a log of an earlier
        version) gets it; a nick claim whose session does not name it is released."""
        for s in self.sessions():
            entry = self.store.get(session_key(s.sid))
            if s.detached_at is not None and entry is not None and entry.expires_at is None:
                await self.store.compare_and_set(entry.key, s.value(), entry.revision,
                                                 self._ttl(s))
        for claim in self.store.range(NICK):
            if self._orphan(claim):
                await self.store.delete(claim.key, claim.revision)


# --- records of logs written before the directory store (records.py replays them) ------


def legacy_session(kv: KvState, sid: str, nick: str, rec: dict[str, Any]) -> None:
    old = kv.entries.get(session_key(sid))
    if old is not None:
        was = Session.of(old)
        if was is not None and fold(was.nick) != fold(nick):
            claim = kv.entries.get(nick_key(was.nick))
            if claim is not None and claim.value.get("sid") == sid:
                kv.delete(claim.key)
    claim = kv.entries.get(nick_key(nick))
    if claim is not None and claim.value.get("sid") != sid:
        return  # taken by another session: the earlier log skipped such a record too
    topic, at = rec.get("topic"), rec.get("detached_at")
    s = Session(sid, nick, topic if isinstance(topic, str) else None,
                float(at) if isinstance(at, int | float) else None, rec.get("oper") is True)
    kv.put(nick_key(nick), {"sid": sid}, None)
    kv.put(session_key(sid), s.value(), None)


def legacy_end(kv: KvState, sid: str) -> None:
    gone = kv.delete(session_key(sid))
    s = Session.of(gone) if gone else None
    if s is not None:
        claim = kv.entries.get(nick_key(s.nick))
        if claim is not None and claim.value.get("sid") == sid:
            kv.delete(claim.key)


def legacy_topic(kv: KvState, name: str, creator: str) -> None:
    kv.put(TOPIC + name, {"creator": creator}, None)
    kv.delete(DROPPED + name)


def legacy_dropped(kv: KvState, name: str) -> None:
    if kv.delete(TOPIC + name) is None:
        kv.put(DROPPED + name, {}, None)
    for entry in list(kv.entries.values()):
        s = Session.of(entry) if entry.key.startswith(SESSION) else None
        if s is not None and s.topic == name:
            kv.put(entry.key, replace(s, topic=None).value(), entry.expires_at)
