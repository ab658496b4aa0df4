"""The topic log seam: one topic's messages in one order (DESIGN.md section 8).

A topic server appends what its members say and fans out what the log commits; it never
numbers a message itself. The log gives each line its sequence number, and tells its
followers about committed entries, in order, once each. On one host the log is the topic
server's write-ahead log (`local.LocalTopicLog`), where committed means fsynced; in a
cluster it would be the topic's sequencer on etcd, where committed means in etcd (and
followers on every host hear of every entry, whoever appended it).

Reads (`after`, `last`) see only committed entries, and only as many as the topic keeps
(`history.size`): history and live delivery never overlap.

A line a client numbered (`/say N TEXT`, what `theychat chat` sends) is taken once: a
resent line whose number the session already had taken is not appended again, and its
append answers with the entry it got the first time (within the entries kept).

`MemoryTopicLog` commits at once, for tests of the logic above it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import NamedTuple, Protocol

from theychat.daemons.render import Event

# Named tuples, not frozen dataclasses: one of each is made for every line said, and a
# tuple is several times cheaper to build.


class Draft(NamedTuple):
    """A line to append: who said it (session and nick at the time) and what."""

    sid: str
    nick: str
    text: str
    ts: float
    action: bool = False  # /me
    line: int | None = None  # the client's number for this line of its session, if any


class Posted(NamedTuple):
    """A committed entry of the log."""

    seq: int
    ts: float
    nick: str
    text: str
    action: bool = False
    sid: str | None = None  # the sender's session: never shown to others
    line: int | None = None  # the sender's number for it

    def event(self, topic: str) -> Event:
        """The message as members see it (without the sender's secret session id)."""
        ev: Event = {"type": "message", "topic": topic, "from": self.nick, "text": self.text,
                     "seq": self.seq, "ts": self.ts}
        if self.action:
            ev["action"] = True
        return ev


OnCommit = Callable[[list[Posted]], None]


class TopicLog(Protocol):
    @property
    def last_seq(self) -> int:
        """The highest committed sequence number (0: none yet)."""
        ...

    def append(self, drafts: Sequence[Draft]) -> Awaitable[list[Posted]]:
        """Append lines in this order; completes once they are committed, with their
        numbers. Fails (and commits none of them) if the log cannot take them."""
        ...

    def after(self, seq: int) -> list[Posted]:
        """Committed entries numbered after `seq`, as far as the log keeps them."""
        ...

    def last(self, n: int) -> list[Posted]:
        """The latest `n` committed entries."""
        ...

    def last_line(self, sid: str) -> int | None:
        """The highest line number of session `sid` committed, as far as the log keeps
        it (None: none known). A resumed client sends again what came after it."""
        ...

    def follow(self, on_commit: OnCommit) -> None:
        """Call `on_commit(entries)` for every later commit, in order."""
        ...

    def sync(self) -> Awaitable[None]:
        """Complete once everything appended so far is committed."""
        ...

    def withdraw(self, sids: set[str]) -> int:
        """Lines of these sessions that the log has not begun to commit are dropped,
        their appends failed with `Withdrawn`; how many appends. A host that lets its
        clients go (it lost the cluster) withdraws what they said meanwhile: never
        acknowledged, it must not surface later, after what they said elsewhere."""
        ...


class Withdrawn(Exception):
    """An append given up before it was committed (`TopicLog.withdraw`)."""


class Tail:
    """The end of a log that a topic keeps in memory, pure: the last `history.size`
    entries appended, and how far they are committed. Reads see committed ones only."""

    def __init__(self, keep: int) -> None:
        self.keep = max(keep, 0)
        # A bounded deque drops the oldest entry itself: add() only notes what it held.
        self.entries: deque[Posted] = deque(maxlen=self.keep or None)
        self.next_seq = 1  # the number the next appended line gets
        self.last_seq = 0  # the highest committed
        self.lines: dict[str, Posted] = {}  # session -> its latest numbered line
        self.evicted: dict[str, int] = {}  # session -> its highest line no longer kept

    def add(self, entries: Iterable[Posted]) -> None:
        """Entries appended (numbered), not yet committed. Every line passes here: the
        common case (unnumbered, room in the tail) costs an append and two tests."""
        kept, keep = self.entries, self.keep
        for e in entries:
            if keep:
                if len(kept) == keep:
                    old = kept[0]  # about to be dropped by the append
                    if old.line is not None and old.sid is not None:
                        self.evicted[old.sid] = old.line
                kept.append(e)
            if e.seq >= self.next_seq:
                self.next_seq = e.seq + 1
            if e.line is not None and e.sid is not None:
                self.lines[e.sid] = e
        if len(self.lines) > 4 * max(keep, 256):  # forget sessions long quiet
            recent = {e.sid for e in kept}
            self.lines = {s: p for s, p in self.lines.items() if s in recent}
            self.evicted = {s: n for s, n in self.evicted.items() if s in recent}

    def taken(self, d: Draft) -> Posted | None:
        """The entry a numbered line already got, if its session had it taken: itself if
        it is still kept; the session's latest if it is no longer kept (taken long ago).
        A number below the latest that was never here was lost on the way (read by a
        server that died before logging it) and is new."""
        if d.line is None:
            return None
        latest = self.lines.get(d.sid)
        if latest is None or latest.line is None or latest.line < d.line:
            return None
        if latest.line == d.line:
            return latest
        same = next((e for e in self.entries if e.sid == d.sid and e.line == d.line), None)
        if same is not None:
            return same
        return latest if d.line <= self.evicted.get(d.sid, 0) else None

    def commit(self, seq: int) -> None:
        self.last_seq = max(self.last_seq, seq)

    def last_line(self, sid: str) -> int | None:
        latest = self.lines.get(sid)
        if latest is None or latest.seq <= self.last_seq:
            return None if latest is None else latest.line
        older = [e.line for e in self.entries
                 if e.sid == sid and e.line is not None and e.seq <= self.last_seq]
        return older[-1] if older else None

    def after(self, seq: int) -> list[Posted]:
        return [e for e in self.entries if seq < e.seq <= self.last_seq]

    def last(self, n: int) -> list[Posted]:
        if n <= 0:
            return []
        return [e for e in self.entries if e.seq <= self.last_seq][-n:]


class TailLog:
    """A TopicLog over a `Tail` in this process: numbers are given at append time, and
    `_persist` makes a batch durable (at once in `MemoryTopicLog`; the write-ahead log
    in `local.LocalTopicLog`). Batches commit in the order they were appended."""

    def __init__(self, tail: Tail) -> None:
        self.tail = tail
        self._followers: list[OnCommit] = []
        self._last: asyncio.Future[list[Posted]] | None = None

    @property
    def last_seq(self) -> int:
        return self.tail.last_seq

    def _persist(self, entries: list[Posted],
                 on_durable: Callable[[], None]) -> asyncio.Future[list[Posted]]:
        """Make `entries` durable: call `on_durable()` once they are, then resolve the
        future to them (so whoever hears of it sees them committed)."""
        on_durable()
        fut: asyncio.Future[list[Posted]] = asyncio.get_running_loop().create_future()
        fut.set_result(entries)
        return fut

    def append(self, drafts: Sequence[Draft]) -> asyncio.Future[list[Posted]]:
        tail = self.tail
        for d in drafts:  # a loop, not any(): this runs for every line
            if d.line is not None:
                return self._append_numbered(drafts)
        seq = tail.next_seq
        entries = [Posted(seq + i, round(d.ts, 3), d.nick, d.text, d.action, d.sid)
                   for i, d in enumerate(drafts)]
        tail.add(entries)

        def committed() -> None:
            tail.commit(entries[-1].seq)
            for on_commit in self._followers:
                on_commit(entries)

        durable = self._persist(entries, committed)
        self._last = durable
        return durable

    def _append_numbered(self, drafts: Sequence[Draft]) -> asyncio.Future[list[Posted]]:
        """Lines a client numbered: those its session already had taken are answered
        with their entries, the others appended."""
        answers: list[Posted | None] = [self.tail.taken(d) for d in drafts]
        fresh = [d for d, a in zip(drafts, answers, strict=True) if a is None]
        result: asyncio.Future[list[Posted]] = asyncio.get_running_loop().create_future()
        if not fresh:
            taken = [a for a in answers if a is not None]
            last = self._last
            if max(a.seq for a in taken) <= self.tail.last_seq or last is None:
                result.set_result(taken)
            else:  # still on its way to disk: answered once it is there, never before
                last.add_done_callback(lambda f: self._answer(f, result, taken))
            return result
        seq = self.tail.next_seq
        entries = [Posted(seq + i, round(d.ts, 3), d.nick, d.text, d.action, d.sid, d.line)
                   for i, d in enumerate(fresh)]
        self.tail.add(entries)
        made = iter(entries)
        ordered = [a if a is not None else next(made) for a in answers]

        def committed() -> None:
            self.tail.commit(entries[-1].seq)
            for on_commit in self._followers:
                on_commit(entries)

        durable = self._persist(entries, committed)

        durable.add_done_callback(lambda f: self._answer(f, result, ordered))
        self._last = durable
        return result

    @staticmethod
    def _answer(durable: asyncio.Future[list[Posted]], result: asyncio.Future[list[Posted]],
                entries: list[Posted]) -> None:
        """`result` gets `entries` once `durable` (the batch that commits them) did."""
        if result.done():
            return
        if durable.cancelled():
            result.cancel()
        elif durable.exception() is not None:
            result.set_exception(durable.exception())  # type: ignore[arg-type]
        else:
            result.set_result(entries)

    def after(self, seq: int) -> list[Posted]:
        return self.tail.after(seq)

    def last(self, n: int) -> list[Posted]:
        return self.tail.last(n)

    def last_line(self, sid: str) -> int | None:
        return self.tail.last_line(sid)

    def follow(self, on_commit: OnCommit) -> None:
        self._followers.append(on_commit)

    async def sync(self) -> None:
        last = self._last
        if last is not None and not last.done():
            await asyncio.wait([last])

    def withdraw(self, sids: set[str]) -> int:
        return 0  # on one host every line taken is being written already: none to drop


class MemoryTopicLog(TailLog):
    """The topic log in memory only: every append commits at once (for tests)."""

    def __init__(self, keep: int = 1000) -> None:
        super().__init__(Tail(keep))
