"""The directory store seam on etcd (cluster mode): the same contract as `store.py`, for
every host at once.

The keys of one store live under a prefix (`/theychat/CLUSTER/dir/`, a topic's
`/theychat/CLUSTER/topics/T/`). This process keeps a cache of the whole prefix, filled
by one range read and kept up to date by one watch from the revision after it, so reads
are local and cost nothing. Writes go to etcd:

- `put` is seen by this process at once (read your writes: a topic's member list shows
  the newcomer before the write is back) and is durable once etcd committed it; if it
  fails, the cache goes back to what etcd has;
- `create`, `compare_and_set` and conditional `delete` are etcd transactions: their
  outcome is etcd's, and the cache learns it from the answer;
- an entry with a time to live gets a lease of its own; when it runs out etcd deletes
  the key, and watchers hear an expired delete.

Watchers hear every change in revision order, whoever made it, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from theychat.daemons import etcd
from theychat.daemons.etcd import Etcd, Event
from theychat.daemons.store import Change, Entry, OnChange, Value


def _value(raw: bytes) -> Value | None:
    try:
        v = json.loads(raw)
    except ValueError:
        return None
    return v if isinstance(v, dict) else None


class EtcdStore:
    def __init__(self, client: Etcd, prefix: str, log: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.etcd = client
        self.prefix = prefix
        self.log = log
        self.clock = clock
        self.entries: dict[str, Entry] = {}
        self.revision = 0  # of the last change this cache has applied
        self._watchers: list[tuple[str, OnChange]] = []
        self._own_deletes: set[str] = set()  # deletes we made: not an expiry
        self._pending: set[asyncio.Future[Any]] = set()
        self._last_write: dict[str, asyncio.Future[Any]] = {}  # per key: writes in order
        self._follow: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    async def start(self) -> None:
        """Load the prefix, then follow it."""
        kvs, rev = await self.etcd.range(self.prefix, prefix=True)
        for kv in kvs:
            value = _value(kv.value)
            if value is not None:
                key = kv.key[len(self.prefix):]
                self.entries[key] = Entry(key, value, kv.mod_revision, self._expiry(kv))
        self.revision = rev
        self._follow = asyncio.ensure_future(self._follow_changes(rev + 1))
        self.ready.set()

    async def close(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=2.0)

    def _expiry(self, kv: etcd.Kv) -> float | None:
        # The exact time is etcd's; here only that there is one matters (a lease).
        return self.clock() if kv.lease else None

    # -- reads ---------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        return self.entries.get(key)

    def range(self, prefix: str) -> list[Entry]:
        return sorted((e for k, e in self.entries.items() if k.startswith(prefix)),
                      key=lambda e: e.key)

    # -- the cache, fed by our answers and by the watch -----------------------------------

    def _apply(self, key: str, entry: Entry | None, expired: bool = False) -> None:
        """One change as etcd made it, unless the cache already holds it (or newer)."""
        current = self.entries.get(key)
        rev = entry.revision if entry is not None else 0
        if entry is not None:
            if current is not None and current.revision >= entry.revision > 0:
                return
            self.entries[key] = entry
        else:
            if current is None:
                return
            del self.entries[key]
        self.revision = max(self.revision, rev)
        self._notify(Change(key, entry, current, expired))

    async def _follow_changes(self, start: int) -> None:
        async for batch in self.etcd.watch(self.prefix, prefix=True, start_revision=start):
            for ev in batch:
                self._event(ev)

    def _event(self, ev: Event) -> None:
        key = ev.kv.key[len(self.prefix):]
        self.revision = max(self.revision, ev.kv.mod_revision)
        if ev.kind == "delete":
            ours = key in self._own_deletes
            self._own_deletes.discard(key)
            had_lease = ev.prev is not None and ev.prev.lease != 0
            current = self.entries.get(key)
            if current is not None and current.revision > ev.kv.mod_revision:
                return  # written again since
            self._apply(key, None, expired=had_lease and not ours)
            return
        value = _value(ev.kv.value)
        if value is not None:
            self._apply(key, Entry(key, value, ev.kv.mod_revision, self._expiry(ev.kv)))

    # -- writes --------------------------------------------------------------------------

    def _run(self, key: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        """A write of `key`, made after the writes of it before (each is an HTTP request
        of its own: without this a put then a delete could reach etcd the other way)."""
        before = self._last_write.get(key)

        async def in_turn() -> Any:
            if before is not None and not before.done():
                await asyncio.wait([before])
            return await coro

        task = asyncio.ensure_future(in_turn())
        self._pending.add(task)
        self._last_write[key] = task

        def done(t: asyncio.Future[Any]) -> None:
            self._pending.discard(t)
            if self._last_write.get(key) is t:
                del self._last_write[key]

        task.add_done_callback(done)
        return task

    async def _lease(self, ttl_s: float | None) -> int:
        return 0 if ttl_s is None else await self.etcd.grant(max(1, math.ceil(ttl_s)))

    def put(self, key: str, value: Value, ttl_s: float | None = None) -> Awaitable[Entry]:
        before = self.entries.get(key)
        expires = None if ttl_s is None else self.clock() + ttl_s
        seen = Entry(key, value, 0, expires)  # read-your-writes until etcd answers
        self.entries[key] = seen
        self._notify(Change(key, seen, before))

        async def write() -> Entry:
            try:
                lease = await self._lease(ttl_s)
                rev = await self.etcd.put(self.prefix + key, json.dumps(value).encode(), lease)
            except BaseException:
                if self.entries.get(key) is seen:  # nobody wrote since: back to etcd's
                    self._restore(key, before)
                raise
            done = Entry(key, value, rev, expires)
            if self.entries.get(key) is seen:
                self.entries[key] = done
                self.revision = max(self.revision, rev)
            return done

        return self._run(key, write())

    def _restore(self, key: str, before: Entry | None) -> None:
        seen = self.entries.pop(key, None)
        if before is not None:
            self.entries[key] = before
        self._notify(Change(key, before, seen))

    def create(self, key: str, value: Value,
               ttl_s: float | None = None) -> Awaitable[Entry | None]:
        return self._run(key, self._conditional(key, value,
                                                etcd.created(self.prefix + key, 0), ttl_s))

    def compare_and_set(self, key: str, value: Value, revision: int,
                        ttl_s: float | None = None) -> Awaitable[Entry | None]:
        cond = (etcd.created(self.prefix + key, 0) if revision == 0
                else etcd.modified(self.prefix + key, revision))
        return self._run(key, self._conditional(key, value, cond, ttl_s))

    async def _conditional(self, key: str, value: Value, cond: dict[str, Any],
                           ttl_s: float | None) -> Entry | None:
        lease = await self._lease(ttl_s)
        raw = json.dumps(value).encode()
        result = await self.etcd.txn([cond], [etcd.put(self.prefix + key, raw, lease)])
        won, revision = result.succeeded, result.revision
        if not won and result.attempts > 1:
            # Sent twice (a member was slow to answer): the attempt that failed its
            # compare may have lost to our own other one. The key tells.
            kvs, _ = await self.etcd.range(self.prefix + key)
            if kvs and kvs[0].value == raw and kvs[0].lease == lease:
                won, revision = True, kvs[0].mod_revision
        if not won:
            if lease:
                await self.etcd.revoke(lease)
            return None
        entry = Entry(key, value, revision,
                      None if ttl_s is None else self.clock() + ttl_s)
        self._apply(key, entry)
        return entry

    def delete(self, key: str, revision: int | None = None) -> Awaitable[bool]:
        async def remove() -> bool:
            conds = [] if revision is None else [etcd.modified(self.prefix + key, revision)]
            self._own_deletes.add(key)
            result = await self.etcd.txn(conds, [etcd.delete(self.prefix + key)])
            deleted = result.succeeded and any(
                int(r.get("response_delete_range", {}).get("deleted", 0))
                for r in result.responses)
            if not deleted and result.attempts > 1:  # perhaps by our own other attempt
                kvs, _ = await self.etcd.range(self.prefix + key)
                deleted = not kvs
            if not deleted:
                self._own_deletes.discard(key)
                return False
            current = self.entries.get(key)
            if current is not None and current.revision <= result.revision:
                self._apply(key, None)
            return True

        return self._run(key, remove())

    def expire(self, now: float | None = None) -> list[Entry]:
        return []  # etcd expires leased keys itself; watchers hear of it

    # -- watches -----------------------------------------------------------------------------

    def watch(self, prefix: str, on_change: OnChange) -> Callable[[], None]:
        item = (prefix, on_change)
        self._watchers.append(item)
        return lambda: self._watchers.remove(item) if item in self._watchers else None

    def _notify(self, change: Change) -> None:
        for prefix, on_change in list(self._watchers):
            if change.key.startswith(prefix):
                try:
                    on_change(change)
                except Exception as e:  # a watcher's bug must not stop the cache
                    if self.log is not None:
                        self.log.exception("watcher_failed", key=change.key, error=repr(e))

    async def sync(self) -> None:
        if self._pending:
            await asyncio.wait(list(self._pending))
