"""UDP heartbeats: a signed datagram codec, a per-peer liveness tracker, thin asyncio shells.

The core (`encode`, `decode`, `PeerWatch`, `Rejections`) does no I/O and reads no clock:
callers pass times in, so every timing rule is unit-tested without sleeping. The shells
(`HeartbeatListener`, `HeartbeatSender`) only move datagrams and timers into the core.

Two clocks are involved, on purpose. A beat's `sent_ms` is wall-clock time, because a
beat may come from another host and monotonic clocks are only comparable within one
boot; it is only used to drop old (replayed, long-queued) beats. Liveness - "no valid
beat for timeout_ms" - is measured on the receiver's monotonic clock, so an NTP step
(common right after boot, just when every daemon starts) cannot declare every peer
dead at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import socket
import stat
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

from theychat.daemons.errors import TheyChatError

KEY_BYTES = 32
MAX_DATAGRAM = 1024

# Reasons `decode` gives; `PeerWatch.offer` and the listener add their own.
DECODE_REASONS = frozenset({"malformed", "unsigned", "bad_signature"})
WATCH_REASONS = frozenset({"wrong_peer", "stale", "replayed"})
LISTENER_REASONS = frozenset({"unknown_peer", "internal_error"})

# Beats carry 64-bit-ish counters; anything larger is not something we sent.
_INT_MAX = (1 << 63) - 1


class HeartbeatKeyError(TheyChatError):
    """The shared heartbeat key cannot be used; the message names the file."""


class HeartbeatRejected(TheyChatError):
    """A datagram is not a beat we can trust; `reason` is one of DECODE_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def monotonic_ms() -> int:
    """The clock `PeerWatch` times liveness with (never jumps)."""
    return time.monotonic_ns() // 1_000_000


def wall_ms() -> int:
    """The clock `Beat.sent_ms` is stamped with (comparable across processes)."""
    return time.time_ns() // 1_000_000


# --- the key ---------------------------------------------------------------------------


def load_or_create_key(path: Path) -> bytes:
    """Return the key in `path`, creating it first if there is none.

    Daemons that start together race to create it; `os.link` of a fully written temp
    file either publishes ours or fails because another daemon's is already there, in
    which case we read theirs. A reader therefore never sees a half-written key and
    everyone ends up with the same one. `os.replace` would not do: the last writer would
    win and the earlier ones would keep a key nobody else has.
    """
    try:
        return read_key(path)
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as e:
        raise HeartbeatKeyError(f"{path}: cannot create the heartbeat key: {e}") from e
    try:
        try:
            # The umask can only narrow 0600, but say it explicitly: the check on read
            # refuses anything wider.
            os.fchmod(fd, 0o600)
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    except OSError as e:
        raise HeartbeatKeyError(f"{path}: cannot create the heartbeat key: {e}") from e
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    try:
        return read_key(path)
    except FileNotFoundError as e:
        # Only someone deleting it right after it was linked gets us here.
        raise HeartbeatKeyError(f"{path}: the heartbeat key vanished while created") from e


def read_key(path: Path, what: str = "the heartbeat key") -> bytes:
    """Read and check a key file; FileNotFoundError means "create it", all else refuses."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise HeartbeatKeyError(f"{path}: cannot open {what}: {e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HeartbeatKeyError(f"{path}: {what} is not a regular file")
        if st.st_mode & 0o077:
            raise HeartbeatKeyError(
                f"{path}: {what} is readable by others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}, must be 0600)"
            )
        if st.st_uid != os.geteuid():
            raise HeartbeatKeyError(f"{path}: {what} belongs to uid {st.st_uid}")
        data = os.read(fd, KEY_BYTES + 1)
    except OSError as e:
        raise HeartbeatKeyError(f"{path}: cannot read {what}: {e}") from e
    finally:
        os.close(fd)
    if len(data) != KEY_BYTES:
        raise HeartbeatKeyError(
            f"{path}: {what} has the wrong length "
            f"({len(data)}{'+' if len(data) > KEY_BYTES else ''} bytes, must be {KEY_BYTES})"
        )
    return data


def create_key(path: Path, what: str = "a key") -> None:
    """A new random key in a new file, 0600; refuses to replace a file that exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        raise HeartbeatKeyError(f"{path}: exists already (a key is never replaced)") from None
    except OSError as e:
        raise HeartbeatKeyError(f"{path}: cannot create {what}: {e.strerror or e}") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secrets.token_bytes(KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    # Durability of the new name only; failing here loses nothing we can act on.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- the codec -------------------------------------------------------------------------


@dataclass(frozen=True)
class Beat:
    role: str
    topic: str | None
    name: str  # daemon name, e.g. `server@rust`: what the receiver files the beat under
    pid: int
    incarnation: int
    seq: int
    sent_ms: int  # wall clock, ms since the epoch


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).hexdigest().encode("ascii")


def encode(beat: Beat, key: bytes) -> bytes:
    """`JSON.hexmac`: compact ASCII JSON, a dot, hex HMAC-SHA256 of the JSON bytes."""
    payload = json.dumps(asdict(beat), separators=(",", ":")).encode("ascii")
    data = payload + b"." + _mac(key, payload)
    if len(data) > MAX_DATAGRAM:
        # Names are bounded by the config (topics are 1-32 chars), so this is a bug.
        raise ValueError(f"beat of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    return data


def decode(data: bytes, key: bytes) -> Beat:
    """Verify then parse one datagram; raises HeartbeatRejected with a stable reason.

    The MAC is checked before the JSON is looked at, so an unauthenticated sender
    cannot reach the parser at all.
    """
    if len(data) > MAX_DATAGRAM:
        raise HeartbeatRejected("malformed", f"{len(data)} bytes")
    payload, dot, mac = data.rpartition(b".")
    if not dot or not mac:
        raise HeartbeatRejected("unsigned")
    # compare_digest takes any lengths and still does not leak where they differ.
    if not hmac.compare_digest(_mac(key, payload), mac):
        raise HeartbeatRejected("bad_signature")
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise HeartbeatRejected("malformed", "not JSON") from e
    if not isinstance(obj, dict):
        raise HeartbeatRejected("malformed", "not an object")
    # Unknown keys are ignored so a newer daemon can add fields without an older
    # supervisor (which adopts children across upgrades) rejecting every beat.
    return Beat(
        role=_str(obj, "role"),
        topic=_optional_str(obj, "topic"),
        name=_str(obj, "name"),
        pid=_int(obj, "pid", 1),
        incarnation=_int(obj, "incarnation", 0),
        seq=_int(obj, "seq", 0),
        sent_ms=_int(obj, "sent_ms", 0),
    )


def _str(obj: dict[str, Any], key: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not v:
        raise HeartbeatRejected("malformed", f"{key}: expected a non-empty string")
    return v


def _optional_str(obj: dict[str, Any], key: str) -> str | None:
    # Present-but-null, not absent: a missing key is a different (broken) sender.
    if key not in obj:
        raise HeartbeatRejected("malformed", f"{key}: missing")
    return None if obj[key] is None else _str(obj, key)


def _int(obj: dict[str, Any], key: str, minimum: int) -> int:
    v = obj.get(key)
    # bool is an int subclass; True is not a pid.
    if type(v) is not int or not minimum <= v <= _INT_MAX:
        raise HeartbeatRejected("malformed", f"{key}: expected an integer >= {minimum}")
    return v


# --- the tracker -----------------------------------------------------------------------


class PeerWatch:
    """Liveness of one peer: accepted beats push its deadline back.

    Times are ms on the caller's monotonic clock (`monotonic_ms`), except that a beat's
    `sent_ms` is compared with wall time: `offer(..., wall_now_ms=)`, defaulting to
    `now_ms` so a test (or a caller with one clock) can pass a single time.
    """

    def __init__(self, name: str, timeout_ms: int, now_ms: int) -> None:
        if timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be positive, got {timeout_ms}")
        self.name = name
        self.timeout_ms = timeout_ms
        self.last_beat: Beat | None = None
        self.accepted = 0
        # A new watch gets a full timeout of grace: the peer may only now be starting.
        self._deadline_base = now_ms
        self._incarnation: int | None = None  # highest seen: older ones are dead processes
        self._seq = -1  # last accepted seq within _incarnation

    def offer(self, beat: Beat, now_ms: int, *, wall_now_ms: int | None = None) -> str | None:
        """Accept `beat` (None) or say why not; a rejected beat changes nothing."""
        if beat.name != self.name:
            return "wrong_peer"
        wall = now_ms if wall_now_ms is None else wall_now_ms
        # Both directions: a beat from far in the future could otherwise be captured and
        # replayed to us later while it still looks fresh.
        if abs(wall - beat.sent_ms) > self.timeout_ms:
            return "stale"
        if self._incarnation is not None:
            if beat.incarnation < self._incarnation:
                return "stale"
            if beat.incarnation == self._incarnation and beat.seq <= self._seq:
                return "replayed"
        self._incarnation = beat.incarnation
        self._seq = beat.seq
        self._deadline_base = now_ms
        self.last_beat = beat
        self.accepted += 1
        return None

    def expired(self, now_ms: int) -> bool:
        return now_ms - self._deadline_base > self.timeout_ms

    def remaining_ms(self, now_ms: int) -> int:
        """How long until `expired` turns true (0 if it already is): a timer's delay."""
        return max(0, self._deadline_base + self.timeout_ms - now_ms + 1)

    def reset(self, now_ms: int) -> None:
        """We restarted the peer: give the new process a grace period.

        The incarnation floor and seq stay: beats of the process we killed (queued, or
        replayed by someone) must not count as the new one being alive.
        """
        self._deadline_base = now_ms


class Rejections:
    """Counts of dropped datagrams by reason, for status output and tests."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def add(self, reason: str) -> None:
        self._counts[reason] += 1

    def __getitem__(self, reason: str) -> int:
        return self._counts[reason]

    @property
    def total(self) -> int:
        return self._counts.total()

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self._counts.items()))


# --- the asyncio shells ----------------------------------------------------------------

RejectHook = Callable[[str, Any], None]


class HeartbeatListener(asyncio.DatagramProtocol):
    """Receives beats for the peers in `watches` (keyed by daemon name).

    `watches` is the caller's dict: add or remove peers at any time. `on_reject(reason,
    addr)` is for logging and is rate limited to once per second per reason, because a
    flood of forged datagrams must not become a flood of log lines; `rejections`
    counts every one.
    """

    def __init__(
        self,
        key: bytes,
        watches: dict[str, PeerWatch] | None = None,
        on_reject: RejectHook | None = None,
        *,
        clock_ms: Callable[[], int] = monotonic_ms,
        wall_clock_ms: Callable[[], int] = wall_ms,
    ) -> None:
        self.key = key
        self.watches: dict[str, PeerWatch] = {} if watches is None else watches
        self.rejections = Rejections()
        self.on_reject = on_reject
        self.transport: asyncio.DatagramTransport | None = None
        self.port: int | None = None
        self._clock_ms = clock_ms
        self._wall_clock_ms = wall_clock_ms
        self._last_report: dict[str, int] = {}

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self,
                                                           local_addr=(host, port))
        self.transport = transport
        self.port = int(transport.get_extra_info("sockname")[1])
        return self.port

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector's datagram transport does not subclass DatagramTransport on 3.11.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for a receive-only socket say nothing about our peers.
        pass

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # Anything escaping here would be logged by asyncio per datagram: a cheap way
        # for a stranger to fill our logs. So nothing escapes.
        try:
            reason = self._handle(data)
        except Exception:
            reason = "internal_error"
        if reason is not None:
            self._reject(reason, addr)

    def _handle(self, data: bytes) -> str | None:
        try:
            beat = decode(data, self.key)
        except HeartbeatRejected as e:
            return e.reason
        watch = self.watches.get(beat.name)
        if watch is None:
            return "unknown_peer"
        return watch.offer(beat, self._clock_ms(), wall_now_ms=self._wall_clock_ms())

    def _reject(self, reason: str, addr: Any) -> None:
        self.rejections.add(reason)
        if self.on_reject is None:
            return
        now = self._clock_ms()
        last = self._last_report.get(reason)
        if last is not None and now - last < 1000:
            return
        self._last_report[reason] = now
        with contextlib.suppress(Exception):
            self.on_reject(reason, addr)


class HeartbeatSender:
    """Sends a beat to every target each `interval_ms`, from one UDP socket.

    Beats come from the event loop itself, so they stop when the loop is stuck: that
    is exactly the hang the receiver is meant to notice. `targets()` is asked anew every
    time, so a supervisor that restarted on a new port is found without a restart here.
    """

    def __init__(
        self,
        beat_template: Beat,
        key: bytes,
        interval_ms: int,
        targets: Callable[[], list[tuple[str, int]]],
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        if interval_ms <= 0:
            raise ValueError(f"interval_ms must be positive, got {interval_ms}")
        self.template = beat_template
        self.key = key
        self.interval_ms = interval_ms
        self.targets = targets
        self.on_tick = on_tick
        self.seq = beat_template.seq
        self.sent = 0
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin beating (the first beat goes out at once); needs a running loop."""
        if self._task is not None:
            return
        loop = asyncio.get_running_loop()  # before the socket: no leak if there is none
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._task = loop.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def beat_once(self) -> None:
        """Build and send the next beat to every current target."""
        sock = self._sock
        if sock is None:
            return
        self.seq += 1
        beat = replace(self.template, seq=self.seq, sent_ms=wall_ms())
        data = encode(beat, self.key)
        try:
            targets = self.targets()
        except Exception:
            # A target lookup that fails this time (say, a file being replaced) may
            # work next time; the heartbeat must not stop over it.
            targets = []
        for target in targets:
            # Refused (no supervisor listening yet), full buffer, no route: the next
            # beat is only an interval away, and the receiver tolerates lost ones.
            with contextlib.suppress(OSError):
                sock.sendto(data, target)
                self.sent += 1

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.interval_ms / 1000
        next_at = loop.time()
        while True:
            self.beat_once()
            if self.on_tick is not None:
                # A broken hook (systemd WATCHDOG=1) must not silence the beats; systemd
                # notices the missing pings itself.
                with contextlib.suppress(Exception):
                    self.on_tick()
            # Fixed schedule, no drift; after a stall, resume at the next slot rather
            # than sending a burst of catch-up beats.
            next_at += interval
            now = loop.time()
            if next_at < now:
                next_at = now + interval
            await asyncio.sleep(next_at - now)


# --- publishing the listener's port ----------------------------------------------------


def write_endpoint(path: Path, host: str, port: int) -> None:
    """Publish where our listener is, atomically: readers see the old or the new one."""
    data = json.dumps({"host": host, "port": port}, separators=(",", ":")).encode("ascii")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_endpoint(path: Path) -> tuple[str, int] | None:
    """(host, port) from `write_endpoint`, or None if absent or unusable."""
    try:
        obj = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(obj, dict):
        return None
    host, port = obj.get("host"), obj.get("port")
    if not isinstance(host, str) or not host or type(port) is not int or not 0 < port < 65536:
        return None
    return host, port
