"""Control channel between daemons: one JSON object per packet over Unix SOCK_SEQPACKET.

SEQPACKET keeps message boundaries, so a packet is exactly one JSON line and file
descriptors passed with SCM_RIGHTS arrive attached to the request they belong to (the
client-socket handoff). Every request gets exactly one reply:
`{"ok": true, ...}` or `{"ok": false, "code": "...", "error": "..."}`. A handler may put
fds to send back under the reply key `_fds` (it keeps ownership of them).

Debug by hand with: `socat - UNIX-CONNECT:STATE/run/router.ctl,type=5`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from theychat.daemons.errors import ControlError

# Below the default socket send buffer (net.core.wmem_default, 208 KiB): a SEQPACKET
# message must fit in it whole.
MAX_PACKET = 192 * 1024
MAX_FDS = 64  # per packet; fd_fetch sends up to fdstore.FETCH_BATCH
CONNECT_RETRY_S = 0.002  # while a peer's listen backlog is full
Message = dict[str, Any]
Handler = Callable[[Message, list[int]], Awaitable[Message]]


def ok(**fields: Any) -> Message:
    return {"ok": True, **fields}


def fail(code: str, text: str) -> Message:
    return {"ok": False, "code": code, "error": text}


def encode(msg: Message) -> bytes:
    data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
    if len(data) > MAX_PACKET:
        raise ControlError(f"control message too large ({len(data)} bytes)", "too_large")
    return data


def decode(data: bytes) -> Message:
    try:
        msg = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deep
        raise ControlError("malformed JSON", "bad_json") from None
    if not isinstance(msg, dict):
        raise ControlError("expected a JSON object", "bad_request")
    return msg


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


async def _wait(sock: socket.socket, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    fd = sock.fileno()
    add, remove = (
        (loop.add_writer, loop.remove_writer) if writable else (loop.add_reader, loop.remove_reader)
    )
    add(fd, ready)
    try:
        await fut
    finally:
        remove(fd)


async def send_packet(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    while True:
        try:
            if fds:
                socket.send_fds(sock, [data], list(fds))
            else:
                sock.send(data)
            return
        except BlockingIOError:
            await _wait(sock, writable=True)


async def recv_packet(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One packet and the fds that came with it; b"" means the peer closed."""
    while True:
        try:
            # CLOEXEC: a socket passed to us must not leak into the daemons we spawn.
            data, fds, flags, _ = socket.recv_fds(sock, MAX_PACKET, MAX_FDS,
                                                  socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            await _wait(sock, writable=False)
            continue
        # Again by hand: some kernels (gVisor, seen here) ignore MSG_CMSG_CLOEXEC, and a
        # leaked listening socket keeps the port bound after every router has died.
        for fd in fds:
            os.set_inheritable(fd, False)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            close_fds(fds)
            raise ControlError("control packet truncated", "too_large")
        return data, fds


class ControlServer:
    """Accepts control connections and answers each request through `handler`.

    The handler owns the fds it takes (`fds.pop()`); whatever it leaves is closed.
    """

    def __init__(self, path: Path, handler: Handler, log: Any) -> None:
        self.path = path
        self._handler = handler
        self._log = log
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # stale: our lock file proves no live owner
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        sock.listen(socket.SOMAXCONN)  # a burst of /join: each is one connection here
        sock.setblocking(False)
        self._sock = sock
        self._spawn(self._accept_loop())

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as e:
                self._log.warning("control_accept_failed", error=str(e))
                await asyncio.sleep(0.05)
                continue
            conn.setblocking(False)
            self._spawn(self._serve(conn))

    async def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data, fds = await recv_packet(conn)
                except (ControlError, OSError) as e:
                    self._log.warning("control_bad_request", error=str(e))
                    with contextlib.suppress(OSError):
                        await send_packet(conn, encode(fail("bad_request", str(e))))
                    return
                if not data:
                    close_fds(fds)
                    return
                reply = await self._answer(data, fds)
                reply_fds = reply.pop("_fds", [])
                try:
                    await send_packet(conn, encode(reply), reply_fds)
                except (ControlError, OSError) as e:
                    self._log.warning("control_reply_failed", error=str(e))
                    return

    async def _answer(self, data: bytes, fds: list[int]) -> Message:
        try:
            msg = decode(data)
            if not isinstance(msg.get("op"), str):
                raise ControlError("missing 'op'", "bad_request")
            return await self._handler(msg, fds)
        except ControlError as e:
            self._log.warning("control_bad_request", code=e.code, error=str(e))
            return fail(e.code, str(e))
        except Exception as e:  # a bug must not take the daemon down with it
            self._log.exception("control_handler_failed", error=repr(e))
            return fail("internal", "internal error; see the daemon's log")
        finally:
            close_fds(fds)

    async def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        for t in list(self._tasks):
            t.cancel()


async def _connect(sock: socket.socket, path: Path) -> None:
    """Connect a non-blocking Unix socket. A full listen backlog makes connect() fail with
    EAGAIN at once (unlike TCP, nothing is in progress): asyncio's sock_connect would then
    wait for writability and wrongly report a connection, so retry ourselves instead
    (within the caller's timeout)."""
    while True:
        try:
            sock.connect(str(path))
            return
        except BlockingIOError:
            await asyncio.sleep(CONNECT_RETRY_S)


async def request_fds(
    path: Path, msg: Message, fds: Sequence[int] = (), timeout: float = 2.0
) -> tuple[Message, list[int]]:
    """Send one request; return the reply and the fds that came with it (now ours)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await _connect(sock, path)
            await send_packet(sock, encode(msg), fds)
            data, extra = await recv_packet(sock)
    except TimeoutError:
        raise ControlError(f"{path.name}: no reply in {timeout:.1f}s", "unavailable") from None
    except OSError as e:
        raise ControlError(f"{path.name}: {e.strerror or e}", "unavailable") from None
    finally:
        sock.close()
    if not data:
        close_fds(extra)
        raise ControlError(f"{path.name}: closed without a reply", "unavailable")
    try:
        return decode(data), extra
    except ControlError:
        close_fds(extra)
        raise


async def request(
    path: Path, msg: Message, fds: Sequence[int] = (), timeout: float = 2.0
) -> Message:
    """Send one request and return the reply; ControlError if the peer is unreachable."""
    reply, extra = await request_fds(path, msg, fds, timeout)
    close_fds(extra)
    return reply


def request_sync(path: Path, msg: Message, timeout: float = 2.0) -> Message:
    """Blocking `request`, for the command line."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    deadline = time.monotonic() + timeout
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        sock.send(encode(msg))
        data, fds, _, _ = socket.recv_fds(sock, MAX_PACKET, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
        close_fds(fds)
    except TimeoutError:
        raise ControlError(f"{path.name}: no reply in {timeout:.1f}s", "unavailable") from None
    except OSError as e:
        raise ControlError(f"{path.name}: {e.strerror or e}", "unavailable") from None
    finally:
        sock.close()
    if not data:
        raise ControlError(f"{path.name}: closed without a reply", "unavailable")
    return decode(data)


def check(reply: Message) -> Message:
    """Raise the error a peer replied with, or return its reply."""
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "request failed")),
                           str(reply.get("code") or "control_error"))
    return reply
