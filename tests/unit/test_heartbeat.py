"""Heartbeats: key file, signed codec, per-peer tracker, listener shell; one loopback test."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import multiprocessing
import os
import random
import socket
import stat
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from theychat.daemons import heartbeat
from theychat.daemons.errors import TheyChatError
from theychat.daemons.heartbeat import (
    KEY_BYTES,
    MAX_DATAGRAM,
    Beat,
    HeartbeatKeyError,
    HeartbeatListener,
    HeartbeatRejected,
    HeartbeatSender,
    PeerWatch,
    Rejections,
    decode,
    encode,
    load_or_create_key,
    monotonic_ms,
    read_endpoint,
    wall_ms,
    write_endpoint,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NAME = "server@rust"


def beat(**changes: Any) -> Beat:
    base = Beat(role="server", topic="rust", name=NAME, pid=4242, incarnation=3, seq=1,
                sent_ms=10_000)
    return replace(base, **changes)


def signed(payload: bytes, key: bytes = KEY) -> bytes:
    """Any payload, correctly signed: gets past the MAC to the parser."""
    return payload + b"." + hmac.new(key, payload, hashlib.sha256).hexdigest().encode()


def reason_of(data: bytes, key: bytes = KEY) -> str:
    with pytest.raises(HeartbeatRejected) as exc:
        decode(data, key)
    return exc.value.reason


# --- key -------------------------------------------------------------------------------


def test_key_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "heartbeat.key"
    old = os.umask(0)  # a careless umask must not widen the file
    try:
        key = load_or_create_key(path)
    finally:
        os.umask(old)
    assert len(key) == KEY_BYTES
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == key
    assert os.listdir(tmp_path) == ["heartbeat.key"]  # no temp file left behind


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "heartbeat.key"
    path.write_bytes(os.urandom(KEY_BYTES))
    path.chmod(0o644)
    with pytest.raises(HeartbeatKeyError, match=str(path)) as exc:
        load_or_create_key(path)
    assert isinstance(exc.value, TheyChatError)
    assert "0644" in str(exc.value)
    assert path.read_bytes() != b""  # refused, not replaced


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_key_of_wrong_length_is_refused(tmp_path: Path, size: int) -> None:
    path = tmp_path / "heartbeat.key"
    path.write_bytes(b"k" * size)
    path.chmod(0o600)
    with pytest.raises(HeartbeatKeyError, match="wrong length"):
        load_or_create_key(path)


def test_key_symlink_and_directory_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(os.urandom(KEY_BYTES))
    target.chmod(0o600)
    link = tmp_path / "heartbeat.key"
    link.symlink_to(target)
    with pytest.raises(HeartbeatKeyError, match=str(link)):
        load_or_create_key(link)
    d = tmp_path / "dir.key"
    d.mkdir(mode=0o700)
    with pytest.raises(HeartbeatKeyError, match=str(d)):
        load_or_create_key(d)


def test_key_in_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(HeartbeatKeyError, match="cannot create"):
        load_or_create_key(tmp_path / "nope" / "heartbeat.key")


def test_key_race_loser_reads_the_winners_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Force the interleaving: another daemon publishes its key between our temp write
    # and our link.
    path = tmp_path / "heartbeat.key"
    winner = os.urandom(KEY_BYTES)
    real_link = os.link

    def link_after_rival(src: Any, dst: Any) -> None:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, winner)
        os.close(fd)
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link_after_rival)
    assert load_or_create_key(path) == winner
    assert os.listdir(tmp_path) == ["heartbeat.key"]


def _key_in_thread(path: Path, barrier: threading.Barrier, keys: list[bytes]) -> None:
    barrier.wait()
    keys.append(load_or_create_key(path))  # list.append is atomic under the GIL


def test_key_concurrent_threads_agree(tmp_path: Path) -> None:
    for round_ in range(10):
        path = tmp_path / f"k{round_}"
        barrier = threading.Barrier(8)
        keys: list[bytes] = []
        threads = [threading.Thread(target=_key_in_thread, args=(path, barrier, keys))
                   for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(keys) == 8 and len(set(keys)) == 1
        assert keys[0] == path.read_bytes()


def _key_in_child(path: str, barrier: Any, out: Any) -> None:
    barrier.wait()
    out.put(load_or_create_key(Path(path)))


def test_key_concurrent_processes_agree(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    for round_ in range(3):
        path = tmp_path / f"k{round_}"
        barrier = ctx.Barrier(6)
        out = ctx.Queue()
        procs = [ctx.Process(target=_key_in_child, args=(str(path), barrier, out))
                 for _ in range(6)]
        for p in procs:
            p.start()
        keys = [out.get(timeout=10) for _ in procs]
        for p in procs:
            p.join(timeout=10)
            assert p.exitcode == 0
        assert len(set(keys)) == 1 and keys[0] == path.read_bytes()
        assert sorted(os.listdir(tmp_path)) == [f"k{i}" for i in range(round_ + 1)]


# --- codec -----------------------------------------------------------------------------


@pytest.mark.parametrize("b", [beat(), beat(topic=None, role="router", name="router"),
                               beat(name="s", pid=1, incarnation=0, seq=0, sent_ms=0)])
def test_round_trip(b: Beat) -> None:
    data = encode(b, KEY)
    assert decode(data, KEY) == b
    payload, _, mac = data.rpartition(b".")
    assert json.loads(payload) == asdict(b)
    assert b" " not in payload  # compact
    assert len(mac) == 64 and all(c in b"0123456789abcdef" for c in mac)


def test_every_flipped_bit_is_caught() -> None:
    data = encode(beat(), KEY)
    sep = data.rindex(b".")
    for i in range(len(data)):
        for bit in range(8):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            reason = reason_of(bytes(bad))
            if i == sep:  # the separator itself: there may be no signature left
                assert reason in ("unsigned", "bad_signature")
            else:
                assert reason == "bad_signature", (i, bit)


def test_wrong_key_is_bad_signature() -> None:
    assert reason_of(encode(beat(), OTHER_KEY)) == "bad_signature"


@pytest.mark.parametrize("data", [b"", b"{}", b'{"role":"server"}', b"{}.", b"no dot"])
def test_no_signature_is_unsigned(data: bytes) -> None:
    assert reason_of(data) == "unsigned"


def test_unsigned_garbage_never_reaches_the_parser() -> None:
    assert reason_of(b"\xff\xfe garbage.0123") == "bad_signature"
    assert reason_of(b"{}." + b"0" * 64) == "bad_signature"
    good = encode(beat(), KEY)
    assert reason_of(good[:-1]) == "bad_signature"  # truncated MAC
    assert reason_of(good + b"0") == "bad_signature"  # extended MAC


def test_oversized_datagram_is_malformed() -> None:
    assert reason_of(b"x" * (MAX_DATAGRAM + 1)) == "malformed"
    # Even when it is otherwise a valid beat.
    padded = json.dumps({**asdict(beat()), "pad": "p" * MAX_DATAGRAM}).encode()
    assert reason_of(signed(padded)) == "malformed"


def test_encode_refuses_what_decode_would_drop() -> None:
    with pytest.raises(ValueError):
        encode(beat(name="n" * MAX_DATAGRAM), KEY)


def _fields(**changes: Any) -> bytes:
    obj: dict[str, Any] = asdict(beat())
    obj.update(changes)
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"\xff\xfe\x00",
        b"[1,2,3]",
        b'"a string"',
        b"null",
        b"[" * 600 + b"]" * 600,
        _fields(pid=True),
        _fields(pid="4242"),
        _fields(pid=4242.0),
        _fields(pid=0),
        _fields(pid=-1),
        _fields(pid=None),
        _fields(incarnation=False),
        _fields(incarnation=-1),
        _fields(seq=1.5),
        _fields(seq=-1),
        _fields(seq=1 << 63),
        _fields(sent_ms="now"),
        _fields(sent_ms=float("nan")),
        _fields(role=5),
        _fields(role=""),
        _fields(role=None),
        _fields(name=["server@rust"]),
        _fields(name=""),
        _fields(topic=7),
        _fields(topic=""),
        _fields(topic=...),  # absent, not null
        _fields(pid=...),
    ],
)
def test_signed_but_malformed(payload: bytes) -> None:
    assert reason_of(signed(payload)) == "malformed"


def test_unknown_fields_are_ignored() -> None:
    # A newer sender may add fields; an older supervisor must still see it alive.
    assert decode(signed(_fields(load=0.5)), KEY) == beat()


def test_decode_only_ever_raises_rejected() -> None:
    rng = random.Random(1234)
    good = encode(beat(), KEY)
    payload = good.rpartition(b".")[0]
    for _ in range(3000):
        kind = rng.randrange(3)
        if kind == 0:
            data = rng.randbytes(rng.randrange(0, 1100))
        elif kind == 1:
            # Signed mutations of a real payload: exercise the parser itself.
            p = bytearray(payload)
            for _ in range(rng.randrange(1, 4)):
                p[rng.randrange(len(p))] = rng.randrange(256)
            data = signed(bytes(p))
        else:
            data = signed(rng.randbytes(rng.randrange(0, 200)))
        try:
            decode(data, KEY)
        except HeartbeatRejected as e:
            assert e.reason in heartbeat.DECODE_REASONS


# --- PeerWatch -------------------------------------------------------------------------


def test_watch_accepts_and_expires_on_the_passed_clock() -> None:
    w = PeerWatch(NAME, timeout_ms=500, now_ms=1000)
    assert not w.expired(1500)  # grace from construction
    assert w.expired(1501)
    assert w.last_beat is None and w.accepted == 0
    b = beat(sent_ms=1200)
    assert w.offer(b, 1200) is None
    assert w.last_beat == b and w.accepted == 1
    assert not w.expired(1700)
    assert w.expired(1701)
    assert w.remaining_ms(1200) == 501 and w.remaining_ms(1701) == 0


def test_watch_wrong_peer() -> None:
    w = PeerWatch(NAME, 500, 0)
    assert w.offer(beat(name="server@go", sent_ms=0), 0) == "wrong_peer"
    assert w.accepted == 0


def test_watch_replay_is_rejected_and_does_not_refresh() -> None:
    w = PeerWatch(NAME, 500, 0)
    assert w.offer(beat(seq=5, sent_ms=100), 100) is None
    assert w.offer(beat(seq=5, sent_ms=100), 300) == "replayed"
    assert w.offer(beat(seq=4, sent_ms=300), 300) == "replayed"
    assert w.expired(601)  # the replays did not push the deadline back
    assert w.offer(beat(seq=6, sent_ms=300), 300) is None  # gaps (lost beats) are fine
    assert w.offer(beat(seq=9, sent_ms=310), 310) is None
    assert w.accepted == 3


def test_watch_stale_and_future_beats() -> None:
    w = PeerWatch(NAME, 500, 0)
    assert w.offer(beat(sent_ms=1000), 1501) == "stale"
    assert w.offer(beat(sent_ms=2001), 1500) == "stale"  # from more than a timeout ahead
    assert w.offer(beat(sent_ms=1000), 1500) is None  # exactly at the limit is fine
    assert w.offer(beat(seq=2, sent_ms=2000), 1500) is None
    assert w.accepted == 2


def test_watch_separate_wall_clock_for_sent_ms() -> None:
    # Liveness on a monotonic clock, staleness against wall time: a wall-clock step
    # cannot make the peer look dead or its beats look fresh.
    w = PeerWatch(NAME, 500, now_ms=50)
    wall = 1_700_000_000_000
    assert w.offer(beat(sent_ms=wall - 10), 100, wall_now_ms=wall) is None
    assert w.offer(beat(seq=2, sent_ms=wall - 600), 150, wall_now_ms=wall) == "stale"
    assert not w.expired(600) and w.expired(601)


def test_watch_restarted_peer_and_dead_incarnations() -> None:
    w = PeerWatch(NAME, 500, 0)
    assert w.offer(beat(incarnation=3, seq=900, sent_ms=0), 0) is None
    # A restarted peer counts seq from the start again, with a higher incarnation.
    assert w.offer(beat(incarnation=4, seq=1, sent_ms=10), 10) is None
    assert w.offer(beat(incarnation=4, seq=1, sent_ms=20), 20) == "replayed"
    # The old process's beats (late, or replayed by someone) are from a dead process.
    assert w.offer(beat(incarnation=3, seq=901, sent_ms=20), 20) == "stale"
    assert w.last_beat is not None and w.last_beat.incarnation == 4
    assert w.accepted == 2


def test_watch_reset_gives_grace_but_keeps_the_floor() -> None:
    w = PeerWatch(NAME, 500, 0)
    assert w.offer(beat(incarnation=3, seq=7, sent_ms=0), 0) is None
    assert w.expired(1000)
    w.reset(1000)  # we killed and restarted it
    assert not w.expired(1500) and w.expired(1501)
    assert w.offer(beat(incarnation=3, seq=8, sent_ms=1000), 1000) is None  # not refused
    assert w.offer(beat(incarnation=2, seq=99, sent_ms=1000), 1000) == "stale"
    assert w.offer(beat(incarnation=3, seq=7, sent_ms=1000), 1000) == "replayed"
    assert w.offer(beat(incarnation=4, seq=1, sent_ms=1100), 1100) is None
    assert w.accepted == 3


def test_watch_needs_a_positive_timeout() -> None:
    with pytest.raises(ValueError):
        PeerWatch(NAME, 0, 0)


def test_rejections_count() -> None:
    r = Rejections()
    assert r.as_dict() == {} and r.total == 0
    for reason in ["stale", "bad_signature", "stale", "unknown_peer"]:
        r.add(reason)
    assert r.as_dict() == {"bad_signature": 1, "stale": 2, "unknown_peer": 1}
    assert r["stale"] == 2 and r["replayed"] == 0 and r.total == 4
    assert list(r.as_dict()) == sorted(r.as_dict())  # stable for status output


# --- listener logic, fed directly (no socket) ------------------------------------------


class FakeClock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def test_listener_routes_counts_and_rate_limits_reports() -> None:
    clock = FakeClock(10_000)
    reports: list[tuple[str, Any]] = []
    w = PeerWatch(NAME, 500, clock.now)
    lst = HeartbeatListener(KEY, {NAME: w}, lambda r, a: reports.append((r, a)),
                            clock_ms=clock, wall_clock_ms=clock)
    addr = ("127.0.0.1", 5555)
    lst.datagram_received(encode(beat(sent_ms=10_000), KEY), addr)
    assert w.accepted == 1 and lst.rejections.total == 0
    for _ in range(50):
        lst.datagram_received(encode(beat(sent_ms=10_000), OTHER_KEY), addr)
        lst.datagram_received(encode(beat(sent_ms=10_000), KEY), addr)  # replayed
    lst.datagram_received(encode(beat(name="server@go", sent_ms=10_000), KEY), addr)
    lst.datagram_received(b"x" * 2000, addr)
    lst.datagram_received(b"hello", addr)
    assert lst.rejections.as_dict() == {"bad_signature": 50, "malformed": 1, "replayed": 50,
                                        "unknown_peer": 1, "unsigned": 1}
    assert [r for r, _ in reports] == ["bad_signature", "replayed", "unknown_peer",
                                      "malformed", "unsigned"]
    assert reports[0][1] == addr
    clock.now += 999
    lst.datagram_received(b"hello", addr)
    assert len(reports) == 5  # still within the second
    clock.now += 1
    lst.datagram_received(b"hello", addr)
    assert reports[-1][0] == "unsigned" and len(reports) == 6
    assert lst.rejections["unsigned"] == 3


def test_listener_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_hook(reason: str, addr: Any) -> None:
        raise RuntimeError("logger exploded")

    lst = HeartbeatListener(KEY, {}, broken_hook)
    lst.datagram_received(b"junk", None)
    assert lst.rejections["unsigned"] == 1

    def broken_decode(data: bytes, key: bytes) -> Beat:
        raise KeyError("bug")

    monkeypatch.setattr(heartbeat, "decode", broken_decode)
    lst.datagram_received(b"junk", None)
    assert lst.rejections["internal_error"] == 1


# --- endpoint file ---------------------------------------------------------------------


def test_endpoint_round_trip_private_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "router.hb"
    assert read_endpoint(path) is None
    write_endpoint(path, "127.0.0.1", 40000)
    assert read_endpoint(path) == ("127.0.0.1", 40000)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    write_endpoint(path, "127.0.0.1", 40001)  # replaces
    assert read_endpoint(path) == ("127.0.0.1", 40001)
    assert os.listdir(tmp_path) == ["router.hb"]


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage", b"[]", b'{"host":"h"}', b'{"host":"h","port":"1"}',
     b'{"host":"h","port":true}', b'{"host":"h","port":0}', b'{"host":"h","port":65536}',
     b'{"host":"","port":1}', b'{"host":1,"port":1}', b"\xff"],
)
def test_endpoint_unusable_is_none(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "ep"
    path.write_bytes(content)
    assert read_endpoint(path) is None


# --- the one loopback service test -----------------------------------------------------


def test_loopback_sender_listener_rejects_forgery_and_replay() -> None:
    asyncio.run(asyncio.wait_for(_loopback(), timeout=5))


async def _loopback() -> None:
    t_start = time.monotonic()
    timeout_ms = 300
    watch = PeerWatch(NAME, timeout_ms, monotonic_ms())
    reports: list[str] = []
    listener = HeartbeatListener(KEY, {NAME: watch}, lambda r, a: reports.append(r))
    port = await listener.start()

    # Receives copies of the real beats, for an attacker to replay.
    capture = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    capture.bind(("127.0.0.1", 0))
    capture.setblocking(False)
    forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ticks = 0

    def on_tick() -> None:
        nonlocal ticks
        ticks += 1
        raise RuntimeError("watchdog hook failed")  # must not stop the beats

    sender = HeartbeatSender(
        beat(pid=os.getpid(), seq=0, sent_ms=0), KEY, 20,
        # An unusable target first: it must not keep the others from getting beats.
        lambda: [("256.0.0.1", 9), ("127.0.0.1", port), capture.getsockname()],
        on_tick,
    )
    try:
        sender.start()
        await asyncio.sleep(0.2)
        assert watch.accepted >= 5, watch.accepted
        assert not watch.expired(monotonic_ms())
        assert ticks >= 5 and sender.seq >= 5
        assert listener.rejections.total == 0
        captured = []
        while True:
            try:
                captured.append(capture.recv(2048))
            except BlockingIOError:
                break
        assert len(captured) >= 5
        assert decode(captured[-1], KEY).seq == sender.seq

        sender.stop()
        await asyncio.sleep(0.03)  # let beats already in flight land
        accepted, stopped_at = watch.accepted, monotonic_ms()
        expired_at = None
        while expired_at is None:
            # Fresh-looking forgeries (higher incarnation, current time) and replays of
            # the newest real beats: none may count as the peer being alive.
            forged = encode(beat(incarnation=99, seq=watch.accepted + 1, sent_ms=wall_ms()),
                            OTHER_KEY)
            forger.sendto(forged, ("127.0.0.1", port))
            for data in captured[-3:]:
                forger.sendto(data, ("127.0.0.1", port))
            await asyncio.sleep(0.01)
            if watch.expired(monotonic_ms()):
                expired_at = monotonic_ms()
            assert monotonic_ms() - stopped_at < timeout_ms + 200
        assert watch.accepted == accepted
        assert watch.last_beat is not None and watch.last_beat.incarnation == 3
        counts = listener.rejections.as_dict()
        assert counts["bad_signature"] >= 10
        assert counts["replayed"] >= 10
        assert set(counts) <= {"bad_signature", "replayed", "stale"}
        # One report per reason: the rest were within the same second.
        assert sorted(reports) == sorted(counts)
    finally:
        sender.stop()
        listener.close()
        capture.close()
        forger.close()
    assert time.monotonic() - t_start < 2.0
