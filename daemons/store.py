"""The directory store seam: keys to JSON objects, with revisions, conditions, watches and
entries that expire (DESIGN.md section 8).

The lobby's directory (`directory.py`) and a topic's room (`room.py`) keep their state
only here. On one host the store lives in the daemon's write-ahead log (`local.py`); in a
cluster it would live in etcd, whose operations these are: get and range, put,
create-if-absent, compare-and-set against an entry's revision, delete, watch a prefix,
and a time to live (etcd's leases).

The contract every implementation keeps:
- `get` and `range` see this process's own writes at once (read your writes);
- a write returns an awaitable that completes once the write is durable (the WAL
  fsynced it, or etcd committed it), with its outcome: the entry written, or None when
  its condition did not hold (the key existed, or its revision had moved on);
- watchers hear every change under their prefix, in revision order, expiries included.

`MemoryStore` keeps the state in memory only, for tests of the logic above it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

Value = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    value: Value
    revision: int  # the store's revision when this was written (etcd's mod_revision)
    expires_at: float | None = None  # wall time (s) it expires at; None: never


@dataclass(frozen=True, slots=True)
class Change:
    key: str
    entry: Entry | None  # what the key holds now; None: deleted
    prev: Entry | None = None  # what it held before (etcd's prev_kv)
    expired: bool = False  # deleted because its time was up


OnChange = Callable[[Change], None]


class DirectoryStore(Protocol):
    def get(self, key: str) -> Entry | None: ...

    def range(self, prefix: str) -> list[Entry]:
        """Every entry whose key starts with `prefix`, in key order."""
        ...

    def put(self, key: str, value: Value, ttl_s: float | None = None) -> Awaitable[Entry]: ...

    def create(self, key: str, value: Value,
               ttl_s: float | None = None) -> Awaitable[Entry | None]:
        """Write only if the key is absent; None if it exists."""
        ...

    def compare_and_set(self, key: str, value: Value, revision: int,
                        ttl_s: float | None = None) -> Awaitable[Entry | None]:
        """Write only if the key's entry has this revision (0: the key is absent)."""
        ...

    def delete(self, key: str, revision: int | None = None) -> Awaitable[bool]:
        """Delete (only if at `revision`, when given); False if nothing was deleted."""
        ...

    def watch(self, prefix: str, on_change: OnChange) -> Callable[[], None]:
        """Call `on_change` for every later change under `prefix`; returns a cancel."""
        ...

    def sync(self) -> Awaitable[None]:
        """Complete once every write made so far is durable."""
        ...


class KvState:
    """The store's state, pure: entries and the revision counter. The write-ahead log's
    records (`records.py`) rebuild it, snapshots included."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.revision = 0

    def put(self, key: str, value: Value, expires_at: float | None,
            revision: int | None = None) -> Entry:
        self.revision = max(self.revision + 1, revision or 0)
        entry = Entry(key, value, self.revision, expires_at)
        self.entries[key] = entry
        return entry

    def delete(self, key: str, revision: int | None = None) -> Entry | None:
        gone = self.entries.pop(key, None)
        if gone is not None:
            self.revision = max(self.revision + 1, revision or 0)
        return gone

    def expired(self, now: float) -> list[Entry]:
        return [e for e in self.entries.values()
                if e.expires_at is not None and e.expires_at <= now]


def _done(value: Any) -> asyncio.Future[Any]:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    fut.set_result(value)
    return fut


class KvStore:
    """A DirectoryStore over a `KvState` in this process: decisions are taken at call
    time, and `_persist` makes each change durable (nothing, in `MemoryStore`; a record
    in the write-ahead log, in `local.LocalStore`)."""

    def __init__(self, state: KvState | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.state = state or KvState()
        self.clock = clock  # wall time: expiry must mean the same after a restart
        self._watchers: list[tuple[str, OnChange]] = []

    # -- what an implementation provides --------------------------------------------------

    def _persist_put(self, entry: Entry) -> asyncio.Future[None]:
        return _done(None)

    def _persist_delete(self, key: str, revision: int, expired: bool) -> asyncio.Future[None]:
        return _done(None)

    # -- reads -----------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        return self.state.entries.get(key)

    def range(self, prefix: str) -> list[Entry]:
        return sorted((e for k, e in self.state.entries.items() if k.startswith(prefix)),
                      key=lambda e: e.key)

    # -- writes ----------------------------------------------------------------------------

    def put(self, key: str, value: Value, ttl_s: float | None = None) -> Awaitable[Entry]:
        return self._write(key, value, ttl_s)

    def create(self, key: str, value: Value,
               ttl_s: float | None = None) -> Awaitable[Entry | None]:
        if key in self.state.entries:
            return _done(None)
        return self.put(key, value, ttl_s)

    def compare_and_set(self, key: str, value: Value, revision: int,
                        ttl_s: float | None = None) -> Awaitable[Entry | None]:
        current = self.state.entries.get(key)
        if (current.revision if current else 0) != revision:
            return _done(None)
        return self.put(key, value, ttl_s)

    def delete(self, key: str, revision: int | None = None) -> Awaitable[bool]:
        current = self.state.entries.get(key)
        if current is None or (revision is not None and current.revision != revision):
            return _done(False)
        return self._when(self._remove(key, expired=False), True)

    def expire(self, now: float | None = None) -> list[Entry]:
        """Delete every entry whose time is up (watchers hear `expired`); returns them."""
        gone = self.state.expired(self.clock() if now is None else now)
        for entry in gone:
            self._remove(entry.key, expired=True)
        return gone

    # Each change is applied, then logged, then told to watchers: what a watcher writes
    # in turn is logged after it, so the log replays in revision order.

    def _write(self, key: str, value: Value, ttl_s: float | None) -> asyncio.Future[Entry]:
        expires = None if ttl_s is None else self.clock() + ttl_s
        prev = self.state.entries.get(key)
        entry = self.state.put(key, value, expires)
        durable = self._when(self._persist_put(entry), entry)
        self._notify(Change(key, entry, prev))
        return durable

    def _remove(self, key: str, expired: bool) -> asyncio.Future[None]:
        prev = self.state.delete(key)
        durable = self._persist_delete(key, self.state.revision, expired)
        self._notify(Change(key, None, prev, expired))
        return durable

    @staticmethod
    def _when(durable: asyncio.Future[None], outcome: Any) -> asyncio.Future[Any]:
        """A future of `outcome` that completes when `durable` does (or fails with it)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def settle(d: asyncio.Future[None]) -> None:
            if fut.done():
                return
            if d.cancelled():
                fut.cancel()
            elif d.exception() is not None:
                fut.set_exception(d.exception())  # type: ignore[arg-type]
            else:
                fut.set_result(outcome)

        if durable.done():
            settle(durable)
        else:
            durable.add_done_callback(settle)
        return fut

    # -- watches ---------------------------------------------------------------------------

    def watch(self, prefix: str, on_change: OnChange) -> Callable[[], None]:
        item = (prefix, on_change)
        self._watchers.append(item)
        return lambda: self._watchers.remove(item) if item in self._watchers else None

    def _notify(self, change: Change) -> None:
        for prefix, on_change in list(self._watchers):
            if change.key.startswith(prefix):
                on_change(change)

    def sync(self) -> Awaitable[None]:
        return _done(None)


class MemoryStore(KvStore):
    """The store in memory only: every write is durable at once (for tests)."""
