"""A daemon's write-ahead log with the rules every stateful daemon follows: replay into
its state at start, snapshot-and-compact every `wal.snapshot_every` records, and stop
the daemon when a write or fsync fails (acknowledging anything more would be a lie).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from theychat.daemons import procs
from theychat.daemons.config import WalSettings
from theychat.daemons.wal import Record, Wal, WalError, WalFailed


class Journal:
    def __init__(self, path: Path, settings: WalSettings, log: Any,
                 snapshot: Callable[[], Record], on_fail: Callable[[str, int], None]) -> None:
        self.wal, self.replay = Wal.open(path, settings.fsync, log)
        self._every = settings.snapshot_every
        self._snapshot = snapshot
        self._on_fail = on_fail
        self.wal.on_fail = self._failed  # once, not a callback on every record
        self._compacting: asyncio.Future[None] | None = None
        self._last: asyncio.Future[Any] | None = None

    def append(self, rec: Record, result: Any = None,
               on_durable: Callable[[], None] | None = None) -> asyncio.Future[Any]:
        """Append a record; the future completes once it is durable (`wal.fsync`), or
        fails (WalError) if it cannot be: after a failure, at once. It resolves to
        `result`, and `on_durable()` runs just before (not at all on a failure).

        The caller has already applied `rec` to its state, so a snapshot taken now
        covers every record appended so far.
        """
        try:
            fut = self.wal.append_nowait(rec, result, on_durable)
        except WalError as e:  # failed earlier (or closed): the caller hears it the same way
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(e)
            return failed
        self._last = fut
        if self._compacting is None and self.wal.records_since_snapshot >= self._every:
            self._compacting = self.wal.compact(self._snapshot())
            self._compacting.add_done_callback(self._compacted)
        return fut

    async def caught_up(self) -> None:
        """Wait until everything appended so far is durable (and its callbacks ran)."""
        if self._last is not None and not self._last.done():
            with contextlib.suppress(WalFailed):
                await asyncio.shield(self._last)

    def _failed(self, error: Exception) -> None:
        status = procs.EXIT_NO_SPACE if procs.no_space(error) else 1
        self._on_fail(f"write-ahead log failed: {error}", status)

    def _compacted(self, fut: asyncio.Future[Any]) -> None:
        self._compacting = None

    async def close(self) -> None:
        with contextlib.suppress(WalFailed):
            await self.wal.close()
