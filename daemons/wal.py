"""The write-ahead log of a stateful daemon (DESIGN.md section 6).

On disk a record is a header `<II` (payload length, zlib.crc32 of the payload) followed by
the payload, compact UTF-8 JSON of a dict. A snapshot is the record
{"type": "snapshot", "state": {...}}; compaction rewrites the file as that one record.

All file I/O after `Wal.open` happens in one executor call at a time, driven by a single
flush task, so the file descriptor never changes under a running write.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from theychat.daemons.errors import TheyChatError

HEADER = struct.Struct("<II")
MAX_PAYLOAD = 16 * 1024 * 1024
FSYNC_MODES = ("always", "batch", "never")

Record = dict[str, Any]


class WalError(TheyChatError):
    """The write-ahead log cannot be opened or used."""


class WalLocked(WalError):
    """Another process, or another open in this one, holds the log's lock."""


class WalFailed(WalError):
    """A write or fsync failed; nothing more is acknowledged until a restart replays."""


@dataclass
class Replay:
    """What `Wal.open` found. `truncated_bytes` counts every byte cut from the log, torn
    or corrupt; a corrupt record also sets `corrupt_at` and `set_aside`."""

    snapshot: Record | None
    records: list[Record]
    truncated_bytes: int
    corrupt_at: int | None
    set_aside: Path | None
    ms: float
    total: int


class _Pending(NamedTuple):
    data: bytes
    future: asyncio.Future[Any]
    snapshot: bool
    result: Any = None  # what the future is resolved with once the record is durable
    on_durable: Callable[[], None] | None = None  # called then, before anyone hears


# json.dumps with options builds a new encoder at every call; records use this one.
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode(record: Record) -> bytes:
    """One record as it goes on disk; raises WalError if its payload exceeds 16 MiB."""
    payload = _JSON.encode(record).encode()
    if len(payload) > MAX_PAYLOAD:
        raise WalError(f"record of {len(payload)} bytes exceeds the {MAX_PAYLOAD} byte limit")
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _parse(data: bytes, offset: int) -> tuple[Record, int] | None:
    """The whole, valid record at `offset` and the offset after it, else None."""
    if len(data) - offset < HEADER.size:
        return None
    length, crc = HEADER.unpack_from(data, offset)
    end = offset + HEADER.size + length
    if length > MAX_PAYLOAD or end > len(data):
        return None
    payload = data[offset + HEADER.size : end]
    if zlib.crc32(payload) != crc:
        return None
    try:
        record = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        return None
    if not isinstance(record, dict):
        return None
    if record.get("type") == "snapshot" and not isinstance(record.get("state"), dict):
        return None
    return record, end


def _scan(data: bytes) -> tuple[Record | None, list[Record], int, int]:
    """(latest snapshot state, records after it, records read, end of the last good one)."""
    snapshot: Record | None = None
    records: list[Record] = []
    total = offset = 0
    while (parsed := _parse(data, offset)) is not None:
        record, offset = parsed
        total += 1
        if record.get("type") == "snapshot":
            snapshot, records = record["state"], []
        else:
            records.append(record)
    return snapshot, records, total, offset


def _torn(data: bytes, offset: int) -> bool:
    """Whether the bad bytes from `offset` look like an interrupted last write.

    Only the last write can be torn, so a bad record must reach EOF exactly or beyond it.
    A flipped bit in a length field can also point beyond EOF, so a whole record anywhere
    after `offset` proves damage rather than a torn write.
    """
    if len(data) - offset >= HEADER.size:
        length, _ = HEADER.unpack_from(data, offset)
        if length > MAX_PAYLOAD or offset + HEADER.size + length < len(data):
            return False
    return not any(_parse(data, o) for o in range(offset + 1, len(data) - HEADER.size + 1))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path, fsync: Callable[[int], None]) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def _set_aside(path: Path, data: bytes) -> Path:
    """Keep bytes we cannot replay in a new file beside the log, for a person to inspect."""
    base = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    aside, n = base, 0
    while True:  # two corruptions within a second must not overwrite each other's evidence
        try:
            fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            break
        except FileExistsError:
            n += 1
            aside = base.with_name(f"{base.name}.{n}")
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path.parent, os.fsync)
    return aside


def _recover(path: Path, log: Any) -> tuple[int, Replay]:
    """Open (creating) the log, replay it, and cut it back to its last good record."""
    start = time.monotonic()
    flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        created = True
    except FileExistsError:
        fd = os.open(path, flags)
        created = False
    try:
        if created:
            _fsync_dir(path.parent, os.fsync)  # else a crash could forget the name
        # A compaction that crashed before its rename leaves this behind; it is ours.
        path.with_name(path.name + ".tmp").unlink(missing_ok=True)
        with open(fd, "rb", closefd=False) as f:
            data = f.read()
        snapshot, records, total, good = _scan(data)
        corrupt_at: int | None = None
        aside: Path | None = None
        if good < len(data):
            if not _torn(data, good):
                corrupt_at, aside = good, _set_aside(path, data[good:])
                if log is not None:
                    log.error("wal_corrupt", path=str(path), offset=good, set_aside=str(aside))
            os.ftruncate(fd, good)
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    ms = round((time.monotonic() - start) * 1000, 3)
    replay = Replay(snapshot, records, len(data) - good, corrupt_at, aside, ms, total)
    if log is not None:
        log.info("wal_replayed", records=total, ms=ms, truncated_bytes=replay.truncated_bytes,
                 path=str(path))
    return fd, replay


class Wal:
    """An open, locked log. Create it with `Wal.open`; use it from one event loop."""

    def __init__(self, path: Path, fd: int, lock_fd: int, fsync: str, log: Any,
                 size: int, records_since_snapshot: int) -> None:
        self.path = path
        self.fsync_mode = fsync
        self.size = size  # bytes, counting records still queued
        self.records_since_snapshot = records_since_snapshot
        self._fd = fd
        self._lock_fd = lock_fd
        self._log = log
        self._fsync: Callable[[int], None] = os.fsync
        self._queue: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._durable = size  # where a failed write cuts the file back to
        self._failed: Exception | None = None
        self._closed = False
        self.on_fail: Callable[[Exception], None] | None = None  # told once, on the failure

    @classmethod
    def open(cls, path: Path, fsync: str = "batch", log: Any = None) -> tuple[Wal, Replay]:
        """Lock, create if missing, and replay. Never raises on the file's contents."""
        if fsync not in FSYNC_MODES:
            raise WalError(f"wal.fsync: expected one of {', '.join(FSYNC_MODES)}, got {fsync!r}")
        # A side file, so the lock survives compaction replacing the log itself.
        lock_path = path.with_name(path.name + ".lock")
        try:
            lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise WalError(f"{lock_path}: {e.strerror or e}") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fd, replay = _recover(path, log)
        except BaseException as e:
            os.close(lock_fd)
            if isinstance(e, BlockingIOError):
                raise WalLocked(f"{path}: in use, {lock_path.name} is locked") from None
            if isinstance(e, OSError):
                raise WalError(f"{path}: {e.strerror or e}") from None
            raise
        size = os.fstat(fd).st_size
        return cls(path, fd, lock_fd, fsync, log, size, len(replay.records)), replay

    async def append(self, record: Record) -> None:
        """Return once `record` is durable as the fsync mode defines it."""
        await self.append_nowait(record)

    def append_nowait(self, record: Record, result: Any = None,
                      on_durable: Callable[[], None] | None = None) -> asyncio.Future[Any]:
        """Queue `record` now (so records land in call order); the future says when it is
        durable, with `result`, and `on_durable()` runs just before it does (one future per
        record: the caller needs no other)."""
        data = encode(record)
        future = self._enqueue(_Pending(data, asyncio.get_running_loop().create_future(),
                                        False, result, on_durable))
        self.size += len(data)
        self.records_since_snapshot += 1
        return future

    def compact(self, state: Record) -> asyncio.Future[None]:
        """Replace the log by one snapshot of `state`; await the result for durability.

        `state` must include the effects of every record appended before this call: the
        snapshot supersedes them. It is encoded now, so later changes to it do not leak in.
        """
        data = encode({"type": "snapshot", "state": state})
        future = self._enqueue(_Pending(data, asyncio.get_running_loop().create_future(), True))
        self.size = len(data)
        self.records_since_snapshot = 0
        return future

    async def close(self) -> None:
        """Wait for queued records, then release the file and its lock."""
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            await asyncio.wait([self._flusher])  # wait, not await: a cancel must not stop it
        os.close(self._fd)
        os.close(self._lock_fd)

    def _enqueue(self, pending: _Pending) -> asyncio.Future[Any]:
        if self._failed is not None:
            raise WalFailed(f"{self.path}: failed earlier: {self._failed}") from self._failed
        if self._closed:
            raise WalError(f"{self.path}: closed")
        self._queue.append(pending)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return pending.future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue and self._failed is None:
                batch = self._take()
                try:
                    await loop.run_in_executor(None, self._write, batch)
                except Exception as e:  # whatever it was, these records are not known durable
                    self._fail(e, batch)
                else:
                    for p in batch:
                        if not p.future.done():  # the appender may have been cancelled
                            if p.on_durable is not None:
                                p.on_durable()
                            p.future.set_result(p.result)
        finally:
            self._flusher = None

    def _take(self) -> list[_Pending]:
        """The next batch: everything queued (group commit), up to a snapshot, which goes
        alone because it replaces the file rather than appending to it."""
        if self._queue[0].snapshot or self.fsync_mode == "always":
            n = 1
        else:
            n = next((i for i, p in enumerate(self._queue) if p.snapshot), len(self._queue))
        batch, self._queue = self._queue[:n], self._queue[n:]
        return batch

    def _write(self, batch: list[_Pending]) -> None:
        """Runs in an executor thread, one batch at a time."""
        if batch[0].snapshot:
            self._rewrite(batch[0].data)
            return
        data = b"".join(p.data for p in batch)
        try:
            _write_all(self._fd, data)
            if self.fsync_mode != "never":
                self._fsync(self._fd)
        except BaseException:
            # These appenders will hear their records failed: a restart must not replay them.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._durable)
            raise
        self._durable += len(data)

    def _rewrite(self, data: bytes) -> None:
        # Compaction fsyncs whatever the mode: a rename of unsynced data can lose everything.
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC,
                     0o600)
        try:
            _write_all(fd, data)
            self._fsync(fd)
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent, self._fsync)
        except BaseException:
            os.close(fd)
            raise
        os.close(self._fd)
        self._fd, self._durable = fd, len(data)

    def _fail(self, error: Exception, batch: list[_Pending]) -> None:
        # PostgreSQL's lesson: after a failed fsync the page cache cannot be trusted, so a
        # retry that "succeeds" proves nothing. Refuse everything from now on.
        self._failed = error
        for p in [*batch, *self._queue]:
            if not p.future.done():
                failed = WalFailed(f"{self.path}: {error}")
                failed.__cause__ = error  # what it was (a full disk?) stays known
                p.future.set_exception(failed)
        self._queue.clear()
        if self._log is not None:
            self._log.error("wal_failed", path=str(self.path), error=str(error))
        if self.on_fail is not None:
            self.on_fail(error)
