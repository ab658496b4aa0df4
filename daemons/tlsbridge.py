"""TLS on the client port, without giving up socket handoff.

A TLS session's state lives in the process that did the handshake and cannot be passed
with SCM_RIGHTS. So the router ends TLS and bridges each TLS connection to one end of a
Unix socketpair; the other end is the "client socket" the rest of TheyChat sees: it is
handed to topic servers and kept by monitors exactly like a plain TCP socket, so server
restarts stay invisible. The bridge lives in the router: if the router dies, its TLS
sessions end with it, and the line client (`theychat chat --tls`) reconnects and
resumes its session.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from theychat.daemons.clientconn import set_keepalive
from theychat.daemons.config import Clients
from theychat.daemons.errors import TheyChatError


def server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(Path(cert).expanduser(), Path(key).expanduser())
    except (OSError, ssl.SSLError) as e:
        raise TheyChatError(f"listen.tls: cannot load {cert} / {key}: {e}") from None
    return ctx


class _Half(asyncio.Protocol):
    """One side of the bridge: what it reads, the other side writes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.early: list[bytes] = []  # read before the other side was attached

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        other = self.peer
        if other is not None and other.early:
            transport.write(b"".join(other.early))
            other.early.clear()
            if other.transport is not None:
                other.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.peer and self.peer.transport:
            self.peer.transport.write(data)
        elif self.transport is not None:  # keep it, and read no more until it can go
            self.early.append(data)
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self.peer and self.peer.transport and self.peer.transport.can_write_eof():
            self.peer.transport.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer and self.peer.transport:
            self.peer.transport.close()

    # Back-pressure: a side that cannot keep up stops the other from reading.
    def pause_writing(self) -> None:
        if self.peer and self.peer.transport:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer and self.peer.transport:
            self.peer.transport.resume_reading()


class TlsBridge(_Half):
    """Accepted TLS connection: makes the socketpair and hands its inner end on."""

    def eof_received(self) -> bool:
        super().eof_received()
        return False  # an SSL transport closes on EOF whatever we return; say so

    def __init__(self, on_inner: Callable[[socket.socket, str], None], limits: Clients) -> None:
        super().__init__()
        self._on_inner = on_inner
        self._limits = limits
        self._attaching: asyncio.Future[Any] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        with contextlib.suppress(OSError):  # keepalive belongs on the real TCP socket
            set_keepalive(self.transport.get_extra_info("socket"), self._limits)
        peer = self.transport.get_extra_info("peername")
        outer, inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        outer.setblocking(False)
        inner.setblocking(False)
        half = _Half()
        half.peer, self.peer = self, half
        self._attaching = asyncio.ensure_future(
            asyncio.get_running_loop().connect_accepted_socket(lambda: half, outer))
        self._on_inner(inner, f"{peer[0]}:{peer[1]} (tls)" if isinstance(peer, tuple) else "tls")
