"""The two seams on one host: a daemon's write-ahead log holds its directory store and,
for a topic server, its topic log.

One file per daemon (`wal/NAME.wal`), so the store's changes and the topic's messages
are durable in the order they were made (a departure is never durable before what was
said just before it), with one fsync per batch for both (group commit, `wal.fsync`).
The journal snapshots and compacts it, and stops the daemon when a write fails.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from theychat.daemons.config import WalSettings
from theychat.daemons.journal import Journal
from theychat.daemons.records import Delete, LogState, Message, Put, Snapshot, replay
from theychat.daemons.store import Entry, KvState, KvStore
from theychat.daemons.topiclog import Posted, Tail, TailLog

EXPIRE_EVERY_S = 1.0  # how often expired entries (detached sessions) are deleted


class LocalLog:
    """Opens (and replays) one daemon's write-ahead log; `store` and `topic` are its two
    seams (`topic` only when `keep` says how many entries a topic keeps)."""

    def __init__(self, path: Path, settings: WalSettings, log: Any,
                 on_fail: Callable[[str, int], None], keep: int | None = None) -> None:
        self.state = LogState(KvState(), Tail(keep) if keep is not None else None)
        self.journal = Journal(path, settings, log, self._snapshot, on_fail)
        found = self.journal.replay
        skipped = replay(self.state, found.snapshot, found.records)
        if skipped and log is not None:
            log.warning("wal_records_skipped", path=str(path), count=skipped)
        self.store = LocalStore(self)
        self.topic = LocalTopicLog(self) if self.state.tail is not None else None

    def _snapshot(self) -> dict[str, Any]:
        return Snapshot.take(self.state).encode()

    def append(self, record: Put | Delete | Message) -> asyncio.Future[None]:
        return self.journal.append(record.encode())

    def append_posted(self, entry: Posted, result: Any = None,
                      on_durable: Callable[[], None] | None = None) -> asyncio.Future[Any]:
        return self.journal.append(Message.encode_posted(entry), result, on_durable)

    async def close(self) -> None:
        await self.store.close()
        await self.journal.close()


class LocalStore(KvStore):
    """The directory store of one daemon, in its write-ahead log."""

    def __init__(self, wal: LocalLog) -> None:
        super().__init__(wal.state.kv)
        self._wal = wal
        self._expiry: asyncio.Task[None] | None = None

    def _persist_put(self, entry: Entry) -> asyncio.Future[None]:
        return self._wal.append(Put(entry.key, entry.value, entry.revision, entry.expires_at))

    def _persist_delete(self, key: str, revision: int, expired: bool) -> asyncio.Future[None]:
        return self._wal.append(Delete(key, revision, expired))

    async def sync(self) -> None:
        await self._wal.journal.caught_up()

    def start(self) -> None:
        """Delete expired entries from now on, every EXPIRE_EVERY_S."""
        if self._expiry is None:
            self._expiry = asyncio.ensure_future(self._expire_forever())

    async def _expire_forever(self) -> None:
        while True:
            self.expire()
            await asyncio.sleep(EXPIRE_EVERY_S)

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry


class LocalTopicLog(TailLog):
    """A topic's log in its server's write-ahead log: committed means fsynced."""

    def __init__(self, wal: LocalLog) -> None:
        assert wal.state.tail is not None
        super().__init__(wal.state.tail)
        self._wal = wal

    def _persist(self, entries: list[Posted],
                 on_durable: Callable[[], None]) -> asyncio.Future[list[Posted]]:
        # The log writes in order: the last one durable means all are.
        for e in entries[:-1]:
            self._wal.append_posted(e)
        return self._wal.append_posted(entries[-1], entries, on_durable)
