"""The write-ahead log: record format, replay of damaged files, group commit, lock, compaction."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import re
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from theychat.daemons.wal import (
    HEADER,
    MAX_PAYLOAD,
    Replay,
    Wal,
    WalError,
    WalFailed,
    WalLocked,
    encode,
)

T = TypeVar("T")

SAMPLE: list[dict[str, Any]] = [
    {"type": "snapshot", "state": {"next_seq": 3, "members": {"s1": "alice"}}},
    {},
    {"type": "message", "seq": 3, "text": "héllo ✓"},
    {"type": "join", "session": "s2", "nick": "bob"},
    {"type": "message", "seq": 4, "text": "x" * 300},
    {"type": "leave", "session": "s1", "n": [1, 2.5, None, True]},
]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def recovered(replay: Replay) -> list[dict[str, Any]]:
    """The replay as the list of records it stands for, snapshot first."""
    head = [] if replay.snapshot is None else [{"type": "snapshot", "state": replay.snapshot}]
    return head + replay.records


def ends(records: list[dict[str, Any]]) -> list[int]:
    """Offsets at which each prefix of `records` ends on disk: [0, end of 1st, ...]."""
    out = [0]
    for r in records:
        out.append(out[-1] + len(encode(r)))
    return out


def reopen(path: Path) -> Replay:
    async def go() -> Replay:
        wal, replay = Wal.open(path)
        await wal.close()
        return replay

    return run(go())


@pytest.fixture
def no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    # The exhaustive damage tests are about parsing, and open() thousands of times; a real
    # fsync costs milliseconds each. The durability tests below keep the real one.
    monkeypatch.setattr(os, "fsync", lambda fd: None)


# --------------------------------------------------------------------------------------
# Format and round trip


def test_record_is_length_crc_and_compact_json(tmp_path: Path) -> None:
    path = tmp_path / "w.wal"

    async def go() -> None:
        wal, _ = Wal.open(path)
        await wal.append({"text": "héllo", "n": 1})
        await wal.close()

    run(go())
    data = path.read_bytes()
    length, crc = struct.unpack_from("<II", data)
    payload = data[8:]
    assert length == len(payload) and crc == zlib.crc32(payload)
    assert payload == '{"text":"héllo","n":1}'.encode()


@pytest.mark.parametrize("mode", ["always", "batch", "never"])
def test_round_trip_in_each_fsync_mode(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "w.wal"
    records = [{"seq": i, "text": "m" * (i % 7)} for i in range(40)]
    fsyncs: list[int] = []

    async def go() -> None:
        wal, replay = Wal.open(path, fsync=mode)
        assert (replay.snapshot, replay.records, replay.total) == (None, [], 0)

        def counting(fd: int) -> None:
            fsyncs.append(fd)
            os.fsync(fd)

        wal._fsync = counting
        await asyncio.gather(*(wal.append(r) for r in records[:20]))
        for r in records[20:]:
            await wal.append(r)
        assert wal.size == path.stat().st_size
        assert wal.records_since_snapshot == 40
        await wal.close()

    run(go())
    replay = reopen(path)
    assert replay.records == records and replay.total == 40
    assert (replay.truncated_bytes, replay.corrupt_at, replay.set_aside) == (0, None, None)
    if mode == "always":
        assert len(fsyncs) == 40
    elif mode == "batch":
        assert 20 < len(fsyncs) < 40  # the first 20 went in one group
    else:
        assert fsyncs == []


def test_oversized_record_is_refused(tmp_path: Path) -> None:
    async def go() -> None:
        wal, _ = Wal.open(tmp_path / "w.wal")
        with pytest.raises(WalError, match="exceeds"):
            wal.append_nowait({"text": "x" * MAX_PAYLOAD})
        await wal.append({"ok": True})
        await wal.close()

    run(go())
    assert reopen(tmp_path / "w.wal").records == [{"ok": True}]


def test_unknown_fsync_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WalError, match=r"wal\.fsync"):
        Wal.open(tmp_path / "w.wal", fsync="sometimes")


# --------------------------------------------------------------------------------------
# Damaged files


def test_truncation_at_every_offset(tmp_path: Path, no_fsync: None) -> None:
    path = tmp_path / "w.wal"
    data = b"".join(encode(r) for r in SAMPLE)
    bounds = ends(SAMPLE)
    extra = {"type": "message", "text": "after"}

    async def go() -> None:
        for cut in range(len(data) + 1):
            path.write_bytes(data[:cut])
            wal, replay = Wal.open(path)
            whole = sum(1 for b in bounds[1:] if b <= cut)
            assert recovered(replay) == SAMPLE[:whole], cut
            assert replay.truncated_bytes == cut - bounds[whole], cut
            assert replay.corrupt_at is None and replay.set_aside is None, cut
            assert path.read_bytes() == data[: bounds[whole]], cut
            await wal.append(extra)
            await wal.close()
            wal, replay = Wal.open(path)
            assert recovered(replay) == [*SAMPLE[:whole], extra], cut
            await wal.close()

    run(go())
    assert not list(tmp_path.glob("*.corrupt-*"))


def test_flipped_bit_at_every_offset(tmp_path: Path, no_fsync: None) -> None:
    path = tmp_path / "w.wal"
    data = b"".join(encode(r) for r in SAMPLE)
    bounds = ends(SAMPLE)
    last = len(SAMPLE) - 1

    async def go() -> None:
        for offset in range(len(data)):
            damaged = bytearray(data)
            damaged[offset] ^= 1 << (offset % 8)
            path.write_bytes(damaged)
            wal, replay = Wal.open(path)
            await wal.close()
            hit = max(i for i in range(len(SAMPLE)) if bounds[i] <= offset)
            assert recovered(replay) == SAMPLE[:hit], offset
            assert path.read_bytes() == data[: bounds[hit]], offset
            if hit < last or replay.corrupt_at is not None:
                # Damage with whole records after it is kept aside, never just dropped.
                assert replay.corrupt_at == bounds[hit], offset
                assert replay.set_aside is not None
                assert replay.set_aside.read_bytes() == bytes(damaged[bounds[hit] :]), offset
                assert list(tmp_path.glob("*.corrupt-*")) == [replay.set_aside]
                replay.set_aside.unlink()
            else:  # a damaged last record is indistinguishable from a torn write
                assert replay.truncated_bytes == len(data) - bounds[last], offset
                assert not list(tmp_path.glob("*.corrupt-*"))

    run(go())


def test_corrupt_middle_is_logged_and_set_aside_with_private_mode(tmp_path: Path) -> None:
    path = tmp_path / "w.wal"
    data = bytearray(b"".join(encode(r) for r in SAMPLE))
    at = ends(SAMPLE)[2]
    data[at + HEADER.size] ^= 0xFF
    path.write_bytes(data)
    log = FakeLog()

    async def go() -> Replay:
        wal, replay = Wal.open(path, log=log)
        await wal.close()
        return replay

    replay = run(go())
    assert replay.corrupt_at == at and replay.truncated_bytes == len(data) - at
    assert replay.set_aside is not None
    assert replay.set_aside.name.startswith("w.wal.corrupt-")
    assert stat.S_IMODE(replay.set_aside.stat().st_mode) == 0o600
    assert log.events[0] == ("error", "wal_corrupt", {
        "path": str(path), "offset": at, "set_aside": str(replay.set_aside)})
    assert log.events[1][:2] == ("info", "wal_replayed")
    assert log.events[1][2]["records"] == 2
    assert log.events[1][2]["truncated_bytes"] == len(data) - at


def test_length_over_limit_is_corruption_not_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "w.wal"
    first = encode(SAMPLE[1])
    path.write_bytes(first + HEADER.pack(MAX_PAYLOAD + 1, 0) + b"{}")
    replay = reopen(path)
    assert replay.records == [SAMPLE[1]]
    assert replay.corrupt_at == len(first)
    assert path.read_bytes() == first


def framed(payload: bytes) -> bytes:
    """A record with a correct header around any payload, even one that is not a dict."""
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


@pytest.mark.parametrize(
    "content",
    [
        b"",
        bytes(4096),
        random.Random(1).randbytes(5000),
        random.Random(2).randbytes(7),
        HEADER.pack(0xFFFFFFFF, 0) + b"x" * 100,
        HEADER.pack(MAX_PAYLOAD, 0) + b"{}",
        encode(SAMPLE[1]) + bytes(100),
        framed(b"[" * 100_000),  # json.loads hits the recursion limit
        framed(b"[1, 2]"),
        framed(b'{"type":"snapshot","state":7}'),
        framed(b"\xff\xfe{}"),
        framed(b""),
    ],
    ids=["empty", "zeros", "random", "short-random", "huge-length", "max-length", "then-zeros",
         "deep-json", "not-a-dict", "bad-snapshot", "bad-utf8", "empty-payload"],
)
def test_garbage_never_raises(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "w.wal"
    path.write_bytes(content)

    async def go() -> list[dict[str, Any]]:
        wal, replay = Wal.open(path)
        await wal.append({"after": 1})
        await wal.close()
        return recovered(replay)

    before = run(go())
    assert before in ([], [SAMPLE[1]])
    again = reopen(path)
    assert recovered(again) == [*before, {"after": 1}]
    assert (again.truncated_bytes, again.corrupt_at) == (0, None)


# --------------------------------------------------------------------------------------
# Group commit and fsync failure


def test_group_commit_acknowledges_only_after_its_fsync(tmp_path: Path) -> None:
    path = tmp_path / "w.wal"
    records = [{"seq": i, "text": "y" * i} for i in range(50)]
    calls: list[tuple[float, float, int]] = []  # (start, end, file size it made durable)
    started = threading.Event()

    def slow_fsync(fd: int) -> None:
        start, size = time.monotonic(), os.fstat(fd).st_size
        started.set()
        time.sleep(0.2)
        os.fsync(fd)
        calls.append((start, time.monotonic(), size))

    done_at: dict[int, float] = {}

    async def go() -> float:
        wal, _ = Wal.open(path)
        wal._fsync = slow_fsync
        loop = asyncio.get_running_loop()

        def launch(i: int) -> asyncio.Task[None]:
            task = asyncio.create_task(wal.append(records[i]))
            task.add_done_callback(lambda _: done_at.__setitem__(i, time.monotonic()))
            return task

        tasks = [launch(i) for i in range(10)]
        await loop.run_in_executor(None, started.wait)
        tasks += [launch(i) for i in range(10, 50)]
        await asyncio.sleep(0)  # let the 40 new tasks queue their records
        queued_at = time.monotonic()
        await asyncio.gather(*tasks)
        await wal.close()
        return queued_at

    queued_at = run(go())
    # The loop took the 40 appends while the first fsync was still sleeping in its thread.
    assert queued_at < calls[0][1]
    assert len(calls) == 2  # 50 records, two group commits
    for i, end in enumerate(ends(records)[1:]):
        covering = next(c for c in calls if c[2] >= end)
        assert done_at[i] >= covering[1], i
    assert reopen(path).records == records


def test_fsync_failure_is_fatal_and_nothing_unsynced_survives(tmp_path: Path) -> None:
    path = tmp_path / "w.wal"
    good = [{"seq": 1}, {"seq": 2}]
    started = threading.Event()
    calls: list[int] = []
    log = FakeLog()

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        started.set()
        time.sleep(0.1)
        raise OSError(errno.EIO, "Input/output error")

    async def go() -> None:
        wal, _ = Wal.open(path, log=log)
        for r in good:
            await wal.append(r)
        wal._fsync = failing_fsync
        loop = asyncio.get_running_loop()
        first = [asyncio.create_task(wal.append({"bad": i})) for i in range(10)]
        await loop.run_in_executor(None, started.wait)
        late = [wal.append_nowait({"bad": i}) for i in range(10, 50)]
        results = await asyncio.gather(*first, *late, return_exceptions=True)
        assert all(isinstance(r, WalFailed) for r in results), results
        assert "Input/output error" in str(results[0])
        with pytest.raises(WalFailed):
            await wal.append({"later": True})
        with pytest.raises(WalFailed):
            wal.append_nowait({"later": True})
        await wal.close()

    run(go())
    assert len(calls) == 1  # nothing was retried after the failure
    assert log.events[-1][:2] == ("error", "wal_failed")
    assert reopen(path).records == good


def test_write_failure_is_fatal(tmp_path: Path) -> None:
    path = tmp_path / "w.wal"

    async def go() -> None:
        wal, _ = Wal.open(path)
        await wal.append({"seq": 1})
        read_only = os.open(path, os.O_RDONLY)
        os.dup2(read_only, wal._fd)  # the next write() fails with EBADF
        os.close(read_only)
        with pytest.raises(WalFailed):
            await wal.append({"seq": 2})
        with pytest.raises(WalFailed):
            await wal.append({"seq": 3})
        await wal.close()

    run(go())
    assert reopen(path).records == [{"seq": 1}]


# --------------------------------------------------------------------------------------
# Lock


def test_second_open_in_same_process_is_locked_until_close(tmp_path: Path) -> None:
    path = tmp_path / "w.wal"

    async def go() -> None:
        wal, _ = Wal.open(path)
        with pytest.raises(WalLocked, match=re.escape(str(path))):
            Wal.open(path)
        await wal.append({"seq": 1})  # the failed open left the holder alone
        await wal.close()
        again, replay = Wal.open(path)
        assert replay.records == [{"seq": 1}]
        await again.close()

    run(go())


def test_lock_held_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "w.wal"
    holder = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(30)\n"
    )
    lock = path.with_name(path.name + ".lock")
    proc = subprocess.Popen([sys.executable, "-c", holder, str(lock)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        with pytest.raises(WalLocked, match=re.escape(str(path))):
            Wal.open(path)
    finally:
        proc.kill()
        proc.wait(timeout=5)
    assert reopen(path).records == []


# --------------------------------------------------------------------------------------
# Compaction


def test_compaction(tmp_path: Path) -> None:
    path = tmp_path / "w.wal"
    lock = path.with_name(path.name + ".lock")
    state = {"next_seq": 101, "history": [{"seq": i} for i in range(95, 101)]}
    tail = [{"seq": 101}, {"seq": 102}, {"seq": 103}]
    synced_dirs: list[int] = []

    def recording(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced_dirs.append(fd)
        os.fsync(fd)

    async def go() -> None:
        wal, _ = Wal.open(path)
        wal._fsync = recording
        await asyncio.gather(*(wal.append({"seq": i, "text": "z" * 40}) for i in range(1, 101)))
        assert wal.records_since_snapshot == 100
        big, lock_before, inode_before = path.stat().st_size, lock.stat(), path.stat().st_ino
        await wal.compact(state)
        assert synced_dirs, "compaction must fsync the directory after its rename"
        assert wal.records_since_snapshot == 0
        for r in tail:
            await wal.append(r)
        assert path.stat().st_size < big // 4
        assert wal.size == path.stat().st_size
        assert path.stat().st_ino != inode_before  # really replaced...
        assert lock.stat().st_ino == lock_before.st_ino  # ...while the lock stayed put
        assert not path.with_name(path.name + ".tmp").exists()
        with pytest.raises(WalLocked):
            Wal.open(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        await wal.close()

    run(go())
    replay = reopen(path)
    assert replay.snapshot == state and replay.records == tail and replay.total == 4


def test_compaction_orders_with_unflushed_appends(tmp_path: Path) -> None:
    path = tmp_path / "w.wal"

    async def go() -> None:
        wal, _ = Wal.open(path)
        before = [wal.append_nowait({"seq": i}) for i in range(5)]
        state = {"next_seq": 5}
        snap = wal.compact(state)
        state["next_seq"] = 99  # encoded at the call: later changes must not leak in
        after = [wal.append_nowait({"seq": i}) for i in range(5, 7)]
        await asyncio.gather(*before, snap, *after)
        await wal.close()

    run(go())
    replay = reopen(path)
    assert replay.snapshot == {"next_seq": 5}
    assert replay.records == [{"seq": 5}, {"seq": 6}]
    assert (replay.total, replay.truncated_bytes) == (3, 0)


# --------------------------------------------------------------------------------------
# Files, modes and logging


def test_new_file_is_private_and_its_directory_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "w.wal"
    synced: list[bool] = []  # is_dir for every fsync during open()
    real = os.fsync

    def recording(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    run(Wal.open(path)[0].close())
    assert synced == [True]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.with_name("w.wal.lock").stat().st_mode) == 0o600
    synced.clear()
    run(Wal.open(path)[0].close())
    assert synced == []  # an existing, intact log costs no fsync to open


def test_replay_is_logged(tmp_path: Path) -> None:
    path = tmp_path / "w.wal"
    path.write_bytes(b"".join(encode(r) for r in SAMPLE) + b"\x05")
    log = FakeLog()

    async def go() -> Replay:
        wal, replay = Wal.open(path, log=log)
        assert wal.size == path.stat().st_size
        assert wal.records_since_snapshot == len(SAMPLE) - 1
        await wal.close()
        return replay

    replay = run(go())
    assert replay.ms >= 0 and replay.total == len(SAMPLE) and replay.truncated_bytes == 1
    assert log.events == [("info", "wal_replayed", {
        "records": len(SAMPLE), "ms": replay.ms, "truncated_bytes": 1, "path": str(path)})]
    assert json.dumps(log.events)  # every field is plain data


class FakeLog:
    """Records structlog-style calls: (level, event, fields)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        def emit(event: str, **fields: Any) -> None:
            self.events.append((level, event, fields))

        return emit
