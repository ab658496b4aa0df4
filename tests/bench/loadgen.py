"""The load generator of the throughput and latency benchmarks: plain text-mode
connections driven by one epoll loop in this process.

Every message a sender sends is the text `@MICROSECONDS` (its `time.monotonic_ns()` at
sending, a clock all processes share); every line a member receives that holds an `@` is
one delivery. Deliveries are counted with `bytes.count(b"@")` on whole `recv` buffers, so
counting costs nearly nothing per line; the latency is taken from every line of a few
*probe* members only (one in the fan-out order's first, middle and last place).

Senders run in one of two modes:
- closed loop (`window`): at most `window` messages of a topic are in flight (sent but
  not yet received by the last member in fan-out order); senders send as fast as the
  server takes them;
- paced (`rate`): a fixed number of messages per second, on a schedule.

At the end every member must have received exactly the messages of the others; any
difference is a `BenchError`, never a figure.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tests.bench.common import BenchError, pct, progress

HOST = "127.0.0.1"
SETUP_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 30.0
CHUNK = 64  # most lines a sender writes in one send()
RECV_BYTES = 1 << 18
# Connections set up at once. More than 64 joins of one topic in flight at once overflow
# the listen backlog of the server's control socket, and some fail with `unavailable`
# (see docs/benchmarks.md): the benchmarks stay below it.
JOIN_BATCH = 50
LAZY_S = 0.005
LAZY = select.EPOLLIN | select.EPOLLONESHOT


def now_us() -> int:
    return time.monotonic_ns() // 1000


@dataclass(eq=False)
class Member:
    sock: socket.socket
    index: int
    sender: bool = False
    probe: bool = False
    count: int = 0  # messages received (lines with an `@`)
    sent: int = 0  # messages this member sent
    out: bytes = b""  # bytes queued for sending (the socket's buffer was full)
    carry: bytes = b""  # a probe's incomplete last line
    latencies_us: list[int] = field(default_factory=list)


@dataclass(eq=False)
class Group:
    """The members of one topic, their senders and the in-flight reference."""

    topic: str
    members: list[Member]
    senders: list[Member]
    reference: Member  # the last member in fan-out order: in flight = sent - its count
    sent: int = 0


def _read_until(sock: socket.socket, marker: bytes, buf: bytes, deadline: float) -> bytes:
    """Read until `marker` and the end of its line are in `buf`; return what follows."""
    while True:
        i = buf.find(marker)
        if i >= 0:
            nl = buf.find(b"\n", i)
            if nl >= 0:
                return buf[nl + 1:]
        if b"\n! " in b"\n" + buf:
            line = (b"\n" + buf).split(b"\n! ", 1)[1].split(b"\n", 1)[0]
            raise BenchError(f"error from TheyChat: {line.decode(errors='replace')}")
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            raise BenchError(f"no {marker!r} within {SETUP_TIMEOUT_S:g} s") from None
        if not data:
            raise BenchError(f"connection closed while waiting for {marker!r}: {buf[-200:]!r}")
        buf += data


def connect(port: int, n: int, topic: str | None, nick_prefix: str | None = None,
            first: int = 0, batch: int = JOIN_BATCH, drain_between: bool = False,
            dial: Callable[[], socket.socket] | None = None) -> list[Member]:
    """`n` connections, each registered with `/nick PREFIXi` if a prefix is given and in
    `topic` (or the lobby); `batch` at a time, each batch's commands pipelined. With
    `drain_between`, what earlier members were sent meanwhile (presence) is read after
    each batch, so it does not pile up in the daemons. `dial` makes a connection
    (default: to loopback `port`; the cluster benchmark's come from a namespace)."""
    members: list[Member] = []
    try:
        for start in range(0, n, batch):
            socks = []
            for _ in range(min(batch, n - start)):
                s = (dial() if dial is not None
                     else socket.create_connection((HOST, port), timeout=SETUP_TIMEOUT_S))
                s.settimeout(SETUP_TIMEOUT_S)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                members.append(Member(s, first + len(members)))
                socks.append(s)
            deadline = time.monotonic() + SETUP_TIMEOUT_S
            for i, s in enumerate(socks):
                cmds = b""
                if nick_prefix:
                    cmds += b"/nick %s%d\n" % (nick_prefix.encode(), first + start + i)
                if topic:
                    cmds += b"/join %s\n" % topic.encode()
                s.sendall(cmds or b"\n")
            for s in socks:
                rest = _read_until(s, b"* welcome to TheyChat", b"", deadline)
                if nick_prefix:
                    rest = _read_until(s, b"* you are now ", rest, deadline)
                if topic:
                    rest = _read_until(s, b"* you are in ", rest, deadline)
                if b"@" in rest:
                    raise BenchError(f"unexpected message before the run: {rest!r}")
                s.setblocking(False)
            if drain_between:
                _read_available(members)
    except BaseException:
        close(members)
        raise
    return members


def _read_available(members: Sequence[Member]) -> None:
    for m in members:
        with contextlib.suppress(BlockingIOError):
            while m.sock.recv(RECV_BYTES):
                pass


def close(members: Sequence[Member]) -> None:
    for m in members:
        with contextlib.suppress(OSError):
            m.sock.close()


def make_group(topic: str, members: list[Member], senders: int) -> Group:
    """Senders are the first members to join; probes are the first non-sender, the
    middle one and the last one (fan-out goes in order of arrival)."""
    if len(members) < senders + 1:
        raise BenchError("need at least one member that is not a sender")
    for m in members[:senders]:
        m.sender = True
    probes = {senders, (senders + len(members) - 1) // 2, len(members) - 1}
    for i in probes:
        members[i].probe = True
    return Group(topic, members, members[:senders], members[-1])


@dataclass
class Result:
    seconds: float  # the measured window
    messages: int  # sent in the window
    deliveries: int  # received in the window, by every member
    latencies_us: list[int]  # of probe lines received in the window
    drained_s: float  # from the end of sending to the last delivery
    max_lag_ms: float = 0.0  # paced: how far the senders fell behind their schedule

    @property
    def deliveries_per_s(self) -> float:
        return self.deliveries / self.seconds

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.seconds

    def latency_ms(self, p: float) -> float | None:
        value = pct(self.latencies_us, p)
        return None if value is None else value / 1000


class Loop:
    """One epoll loop over every member of every group."""

    def __init__(self, groups: Sequence[Group]) -> None:
        self.groups = list(groups)
        self.by_fd: dict[int, Member] = {}
        self.ep = select.epoll()
        for g in self.groups:
            for m in g.members:
                fd = m.sock.fileno()
                self.by_fd[fd] = m
                self.ep.register(fd, LAZY if self._lazy(m) else select.EPOLLIN)
        self.buf = bytearray(RECV_BYTES)
        self.view = memoryview(self.buf)
        self.measuring = False
        self._resting: list[Member] = []  # lazy members read, not yet re-armed
        self._rearm_at = 0.0

    @staticmethod
    def _lazy(m: Member) -> bool:
        """Members whose lines are only counted are read at most every LAZY_S: their
        lines wait in the kernel's socket buffer (which the server does not notice) and
        one recv takes many, instead of one recv per line at low rates."""
        return LAZY_S > 0 and not (m.probe or m.sender)

    def close(self) -> None:
        self.ep.close()

    def received(self) -> int:
        return sum(m.count for g in self.groups for m in g.members)

    def sent(self) -> int:
        return sum(g.sent for g in self.groups)

    def _recv(self, m: Member) -> None:
        try:
            n = m.sock.recv_into(self.buf)
        except BlockingIOError:
            return
        except OSError as e:
            raise BenchError(f"member {m.index}: {e}") from e
        if n == 0:
            raise BenchError(f"member {m.index}: the server closed the connection")
        m.count += self.buf.count(b"@", 0, n)
        if m.probe:
            at = now_us()
            lines = (m.carry + self.view[:n].tobytes()).split(b"\n")
            m.carry = lines.pop()
            if self.measuring:
                for line in lines:
                    i = line.rfind(b"@")
                    if i >= 0:
                        m.latencies_us.append(at - int(line[i + 1:]))

    def _flush(self, m: Member) -> None:
        try:
            n = m.sock.send(m.out)
        except BlockingIOError:
            n = 0
        except OSError as e:
            raise BenchError(f"sender {m.index}: {e}") from e
        m.out = m.out[n:]
        fd = m.sock.fileno()
        self.ep.modify(fd, select.EPOLLIN | select.EPOLLOUT if m.out else select.EPOLLIN)

    def _send(self, g: Group, k: int) -> int:
        """Up to `k` messages from the group's senders whose buffers are empty."""
        done = 0
        for s in g.senders:
            if done >= k:
                break
            if s.out:
                continue
            n = min(CHUNK, k - done)
            s.out = (b"@%d\n" % now_us()) * n
            s.sent += n
            g.sent += n
            done += n
            self._flush(s)
        return done

    def poll(self, timeout: float) -> None:
        if self._resting:
            now = time.monotonic()
            if now >= self._rearm_at:
                for m in self._resting:
                    self.ep.modify(m.sock.fileno(), LAZY)
                self._resting.clear()
            else:
                timeout = min(timeout, self._rearm_at - now)
        for fd, ev in self.ep.poll(timeout):
            m = self.by_fd[fd]
            if ev & select.EPOLLOUT and m.out:
                self._flush(m)
            if ev & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                self._recv(m)
                if self._lazy(m):
                    if not self._resting:
                        self._rearm_at = time.monotonic() + LAZY_S
                    self._resting.append(m)

    def run(self, warmup: float, seconds: float, window: int | None = None,
            rate: float | None = None, on_start: Callable[[], None] | None = None,
            on_end: Callable[[], object] | None = None) -> Result:
        """Send for `warmup` + `seconds`, measure during the last `seconds`, then wait
        for every delivery."""
        assert (window is None) != (rate is None)
        t0 = time.monotonic()
        measure_at, end_at = t0 + warmup, t0 + warmup + seconds
        counts_at: dict[str, tuple[float, int, int]] = {}
        lag = 0.0
        per_group = rate / len(self.groups) if rate else 0.0
        while True:
            now = time.monotonic()
            if now >= measure_at and "start" not in counts_at:
                if on_start:
                    on_start()
                counts_at["start"] = (now, self.sent(), self.received())
                self.measuring = True
            if now >= end_at:
                counts_at["end"] = (now, self.sent(), self.received())
                self.measuring = False
                if on_end:
                    on_end()
                break
            timeout = 0.05
            for g in self.groups:
                if window is not None:
                    room = window - (g.sent - g.reference.count)
                    if room > 0 and self._send(g, room):
                        timeout = 0.0
                else:
                    due = int((now - t0) * per_group) - g.sent
                    if due > 0:
                        lag = max(lag, due / per_group)
                        self._send(g, due)
                    timeout = min(timeout, max(0.0, (g.sent + 1) / per_group - (now - t0)))
            self.poll(timeout)
        # Drain: every member must get every message but its own, exactly once.
        stop = time.monotonic()
        for g in self.groups:  # what senders still have queued goes out too
            while any(s.out for s in g.senders):
                if time.monotonic() - stop > DRAIN_TIMEOUT_S:
                    raise BenchError("senders could not send their last lines")
                self.poll(0.01)
        deadline = stop + DRAIN_TIMEOUT_S
        while not self._complete():
            if time.monotonic() > deadline:
                raise BenchError(self._shortfall())
            self.poll(0.05)
        drained = time.monotonic() - stop
        settle = time.monotonic() + 0.2  # duplicates would show up now
        while time.monotonic() < settle:
            self.poll(0.05)
        if not self._complete():
            raise BenchError(self._shortfall())
        (t1, s1, r1), (t2, s2, r2) = counts_at["start"], counts_at["end"]
        lat = [x for g in self.groups for m in g.members if m.probe for x in m.latencies_us]
        return Result(t2 - t1, s2 - s1, r2 - r1, lat, drained, lag * 1000)

    def _complete(self) -> bool:
        return all(m.count == g.sent - m.sent for g in self.groups for m in g.members)

    def _shortfall(self) -> str:
        bad = [(g.topic, m.index, m.count, g.sent - m.sent) for g in self.groups
               for m in g.members if m.count != g.sent - m.sent]
        lost = sum(exp - got for _, _, got, exp in bad if exp > got)
        dup = sum(got - exp for _, _, got, exp in bad if got > exp)
        shown = ", ".join(f"{t}#{i}: {got}/{exp}" for t, i, got, exp in bad[:5])
        return (f"deliveries lost: {lost}, duplicated: {dup}, over {len(bad)} member(s) "
                f"(got/expected {shown}{' ...' if len(bad) > 5 else ''})")


def run_groups(groups: Sequence[Group], warmup: float, seconds: float,
               window: int | None = None, rate: float | None = None,
               on_start: Callable[[], None] | None = None,
               on_end: Callable[[], object] | None = None) -> Result:
    loop = Loop(groups)
    try:
        result = loop.run(warmup, seconds, window=window, rate=rate, on_start=on_start,
                          on_end=on_end)
    finally:
        loop.close()
    progress(f"  {result.deliveries_per_s:,.0f} deliveries/s, {result.messages_per_s:,.0f} "
             f"messages/s, latency p50 {result.latency_ms(50) or 0:.2f} ms p99 "
             f"{result.latency_ms(99) or 0:.2f} ms, drained in {result.drained_s:.2f} s")
    return result


def drain(members: Sequence[Member], quiet: float = 0.5, timeout: float = 60.0) -> int:
    """Read (and count) whatever the members were sent until nothing arrives for `quiet`
    seconds; returns the bytes read. For setups where the lines themselves do not matter
    (presence of later arrivals), so that no daemon keeps them queued."""
    ep = select.epoll()
    by_fd = {}
    for m in members:
        by_fd[m.sock.fileno()] = m
        ep.register(m.sock.fileno(), select.EPOLLIN)
    total = 0
    try:
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() - last < quiet:
            if time.monotonic() > deadline:
                raise BenchError(f"members still receiving after {timeout:g} s")
            for fd, _ in ep.poll(0.05):
                try:
                    data = by_fd[fd].sock.recv(RECV_BYTES)
                except BlockingIOError:
                    continue
                if not data:
                    raise BenchError(f"member {by_fd[fd].index}: the server closed the "
                                     "connection")
                total += len(data)
                last = time.monotonic()
    finally:
        ep.close()
    return total
