"""One client TCP connection, as seen by whichever daemon holds it now.

The shell around the protocol core: bytes go into a `LineBuffer`, each complete line is
parsed and handed to the owner (the router's lobby or a topic server) one at a time, in
order. A command that needs I/O (a handoff, a question to the router) pauses reading
until it is done, so no line overtakes another and unread bytes can travel with the
socket when it moves to another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from theychat.daemons import control, ops, render
from theychat.daemons.config import Clients
from theychat.daemons.errors import ControlError, ProtocolError
from theychat.daemons.protocol import Command, LineBuffer, Say, parse
from theychat.daemons.ratelimit import TokenBucket
from theychat.daemons.render import Event

# Errors in a row, with no good line between them, after which a client is abusive.
MAX_ERRORS_IN_A_ROW = 20
# Unread input that may travel with a handoff; more than this in flight is a flood.
MAX_PENDING_BYTES = 64 * 1024


class Owner(Protocol):
    def handle(self, conn: ClientConn, item: Say | Command) -> Awaitable[None] | None: ...

    def lost(self, conn: ClientConn, reason: str) -> None: ...


def set_keepalive(sock: socket.socket, limits: Clients) -> None:
    """Let the kernel find peers that vanished without a FIN (cable pulled, host gone)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, limits.keepalive_idle_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, limits.keepalive_interval_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, limits.keepalive_count)


class ClientConn(asyncio.Protocol):
    """A connection knows only whose it is (`sid`) and how to speak to it (`json`); the
    person's nick and rights are in the directory, and the owner looks them up."""

    def __init__(
        self,
        owner: Owner,
        sid: str,
        limits: Clients,
        log: Any,
        on_made: Callable[[ClientConn], None] | None = None,
        json: bool = False,
    ) -> None:
        self.owner = owner
        self.sid = sid
        self.json = json
        self.limits = limits
        self.log = log
        self._on_made = on_made
        self.transport: asyncio.Transport | None = None
        self.buf = LineBuffer()
        self.bucket = TokenBucket(limits.rate_per_second, limits.rate_burst, time.monotonic())
        self.busy = True  # nothing is handled until start(): the owner says hello first
        self.detached = False  # the socket now belongs to another process
        self.close_reason: str | None = None
        self._errors_in_a_row = 0
        self._dropped_in_a_row = 0
        self._task: asyncio.Future[None] | None = None  # the command now running
        # Bytes written during this turn of the event loop, handed to the transport
        # together at its end: one send() per client per turn, however many events.
        self._out: list[bytes] = []
        self._out_bytes = 0
        self.peer = ""  # host:port of the other end
        self.addr = ""  # its host (what clients.max_per_address counts)
        self.peer_hint = ""  # who is really behind a bridged (TLS) connection

    def fileno(self) -> int:
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        return int(sock.fileno())

    def record(self) -> ops.Conn:
        """What travels with this socket to its next holder (and to our monitor)."""
        return ops.Conn(sid=self.sid, json=self.json)

    # -- asyncio callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if self.peer_hint:
            self.peer, self.addr = self.peer_hint, self.peer_hint.rpartition(":")[0]
        elif isinstance(peer, tuple):
            self.peer, self.addr = f"{peer[0]}:{peer[1]}", str(peer[0])
        else:
            self.peer = self.addr = str(peer)
        if self.busy:
            transport.pause_reading()
        if self._on_made:
            self._on_made(self)

    def data_received(self, data: bytes) -> None:
        self.buf.feed(data)
        self._drain()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.detached:
            return
        reason = self.close_reason or "connection lost"
        self.close_reason = reason
        self.owner.lost(self, reason)

    # -- reading ---------------------------------------------------------------------

    def start(self, pending: bytes = b"") -> None:
        """Begin handling lines, first those that came with the socket."""
        self.buf.feed(pending)
        self._resume()

    def pause(self) -> None:
        """Stop handling this client's lines (so its socket can be moved by someone else)."""
        self.busy = True
        if self.transport is not None and not self.close_reason:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._task is None or self._task.done():
            self._resume()

    def _resume(self) -> None:
        if self.transport is None or self.detached or self.close_reason:
            return
        self.busy = False
        self.transport.resume_reading()
        self._drain()

    def _drain(self) -> None:
        while not self.busy and self.close_reason is None:
            try:
                line = self.buf.next_line()
                if line is None:
                    return
                item = parse(line)
            except ProtocolError as e:
                self._error(e.code, e.text)
                continue
            if item is None:
                continue
            if not self.bucket.allow(time.monotonic()):
                self._rate_limited(item.line if isinstance(item, Say) else None)
                continue
            self._errors_in_a_row = self._dropped_in_a_row = 0
            pending = self.owner.handle(self, item)
            if pending is not None:
                self.busy = True
                assert self.transport is not None
                self.transport.pause_reading()
                self._task = asyncio.ensure_future(self._finish(pending))

    async def _finish(self, pending: Awaitable[None]) -> None:
        try:
            await pending
        except ControlError as e:
            # The daemon that could not be asked is ours to name in the log, not to users.
            self.log.warning("command_unavailable", session=self.sid, error=str(e))
            self.send(render.error("unavailable", "that is not available right now; try again"))
        except Exception as e:  # a bug in one command must not cost the daemon
            self.log.exception("command_failed", session=self.sid, error=repr(e))
            self.send(render.error("internal", "internal error; the operator can see why"))
        self._resume()

    def _error(self, code: str, text: str) -> None:
        self.send(render.error(code, text))
        self._errors_in_a_row += 1
        if self._errors_in_a_row >= MAX_ERRORS_IN_A_ROW:
            self.close("too many bad lines in a row", abort=True)

    def _rate_limited(self, line: int | None) -> None:
        self._dropped_in_a_row += 1
        if self._dropped_in_a_row == 1 or line is not None:  # a numbered line: its answer
            self.send(render.error("rate_limited", "too many lines; slow down (line dropped)",
                                   line=line))
        elif self._dropped_in_a_row > 5 * self.limits.rate_burst:
            self.close("flooding", abort=True)

    # -- writing ---------------------------------------------------------------------

    def send(self, event: Event) -> None:
        self.write(render.encode(event, self.json))

    def write(self, data: bytes) -> None:
        """Queue bytes; a client that does not read is cut off, never buffered forever.

        The bytes go out at the end of this turn of the event loop, with everything else
        written to this client in it, in order (a fan-out of many messages is one send).
        """
        if self.transport is None or self.detached or self.close_reason or not data:
            return
        if not self._out:
            asyncio.get_running_loop().call_soon(self.flush)
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes > self.limits.output_queue_bytes:
            self.flush()  # a turn's worth beyond the limit: let the transport judge now

    def flush(self) -> None:
        """Hand what this turn wrote to the transport; cut the client off if more than
        `output_queue_bytes` are then waiting for it to read."""
        out, self._out, self._out_bytes = self._out, [], 0
        t = self.transport
        if not out or t is None or self.detached or self.close_reason:
            return
        t.write(out[0] if len(out) == 1 else b"".join(out))
        if t.get_write_buffer_size() > self.limits.output_queue_bytes:
            self.close("too slow: output queue full", abort=True)

    @staticmethod
    def write_each(conns: Iterable[ClientConn], data: bytes) -> None:
        """`conn.write(data)` for every conn, in one loop: the fan-out of one message to a
        whole topic costs a list append per member. Keep in step with `write`."""
        if not data:
            return
        n = len(data)
        call_soon = asyncio.get_running_loop().call_soon
        for conn in conns:
            if conn.transport is None or conn.detached or conn.close_reason:
                continue
            out = conn._out
            if not out:
                call_soon(conn.flush)
            out.append(data)
            conn._out_bytes += n
            if conn._out_bytes > conn.limits.output_queue_bytes:
                conn.flush()

    def release(self) -> None:
        """Let go of our copy of a socket that another process holds now: only our
        descriptor closes (the connection lives on there), and nobody is told."""
        self.detached = True
        if self.transport is not None:
            self.transport.abort()

    def close(self, reason: str, abort: bool = False) -> None:
        if self.close_reason or self.detached or self.transport is None:
            return
        if abort:
            self._out, self._out_bytes = [], 0
        else:
            self.flush()  # what was said before closing still goes out (`bye`)
            if self.close_reason:
                return  # that flush found the client too slow and cut it off
        self.close_reason = reason
        if abort:
            self.transport.abort()
        else:
            self.transport.close()

    # -- moving to another process ------------------------------------------------------

    async def _flushed(self, timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.flush()  # this turn's bytes first
            if not (self.transport and self.transport.get_write_buffer_size()):
                return
            if time.monotonic() > deadline:
                raise ControlError("client is not reading", "slow_client")
            await asyncio.sleep(0.002)

    async def hand_over(self, target: Path, adopt: ops.Adopt, witness: Path) -> dict[str, Any]:
        """Pass this socket, its record and unread bytes to the daemon at `target`.

        Reading is paused (we run inside a command), so the bytes the kernel holds stay
        there for the new owner. On success this connection is gone from our side; on
        failure it is untouched and the ControlError says why. When the target dies
        before answering, `witness` (its monitor, which the target tells before it
        answers) settles whether it took the socket: never two owners, never none.
        """
        assert self.transport is not None
        pending = self.buf.pending()
        if len(pending) > MAX_PENDING_BYTES:
            raise ControlError("too much unread input to move", "flooding")
        await self._flushed()
        sock = self.transport.get_extra_info("socket")
        fd = os.dup(sock.fileno())
        try:
            op = dataclasses.replace(adopt, session=self.record(), pending=pending.hex())
            try:
                reply = control.check(await control.request(target, op.message(), fds=[fd],
                                                            timeout=5.0))
            except ControlError as e:
                if e.code != "unavailable" or not await self._taken(witness):
                    raise
                reply = {"ok": True, "witnessed": True}
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.release()
        return reply

    async def _taken(self, witness: Path) -> bool:
        try:
            reply = await control.request(witness, ops.FdHeld(id=self.sid).message())
        except ControlError:
            return False  # no monitor, no copy: the target cannot have kept it
        return reply.get("held") is True



async def attach(owner: Owner, rec: ops.Conn, fd: int, limits: Clients, log: Any) -> ClientConn:
    """Wrap a client socket passed to us (handoff or fd store) in a paused ClientConn."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    conn = ClientConn(owner, rec.sid, limits, log, json=rec.json)
    await asyncio.get_running_loop().connect_accepted_socket(lambda: conn, sock)
    return conn
