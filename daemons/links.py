"""Links between hosts: a follower's topic server talks to the topic's sequencer on
another host over TCP, one JSON object per line, authenticated with the cluster key.

A link starts with a challenge and response both ways (each side proves it knows the
key, over the other's fresh nonce), and from then on every line carries an HMAC of its
sequence number and body under a key of that connection alone: a line cannot be
forged, replayed, reordered or moved to another link. Anything that fails a check ends
the link (`LinkError`); a follower then connects again.

    follower -> router of the sequencer's host:  {"topic": T}        (plain: a routing hint)
    sequencer -> follower:  {"nonce": Ns}
    follower -> sequencer:  {"host": H, "nonce": Nc, "mac": HMAC(key, link1|T|H|Ns|Nc)}
    sequencer -> follower:  {"mac": HMAC(key, link2|T|H|Nc|Ns)}
    then both ways:  BODY MAC    MAC = HMAC(HMAC(key, session|Ns|Nc), N|BODY), N = 0, 1, ...

A topic's bodies are batches: {"requests": [{"id", "lines"}, ...]} one way and
{"replies": [{"id", "e" | "error"}, ...]} the other, gathered by `send_soon` over one
turn of the event loop, so a busy link costs one encode, one MAC and one write per turn
rather than per append.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import secrets
import socket
import struct
from typing import Any

from theychat.daemons.errors import TheyChatError

MAX_LINE = 4 * 1024 * 1024  # a batch of lines, as JSON
HANDSHAKE_S = 3.0
SOON_MAX = 256  # items queued by send_soon before they leave without waiting for the turn


class LinkError(TheyChatError):
    """The other side is not who it says, broke the protocol, or went away."""


def _mac(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


async def _read_json(reader: asyncio.StreamReader, limit: int = 64 * 1024) -> dict[str, Any]:
    try:
        line = await reader.readline()
    except (ValueError, asyncio.LimitOverrunError):
        raise LinkError("line too long") from None
    except (ConnectionError, OSError) as e:
        raise LinkError(f"connection: {e}") from None
    if not line:
        raise LinkError("closed")
    if len(line) > limit:
        raise LinkError("line too long")
    try:
        obj = json.loads(line)
    except ValueError:
        raise LinkError("not JSON") from None
    if not isinstance(obj, dict):
        raise LinkError("not an object")
    return obj


def _write_json(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")


class Link:
    """An authenticated link: `send` and `recv` JSON objects."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 session_key: bytes, peer: str) -> None:
        self.reader, self.writer = reader, writer
        self.peer = peer  # the other host's id
        self._key = session_key
        self._sent = self._received = 0
        self._soon: dict[str, list[Any]] = {}  # what send_soon queued this loop turn
        self._closed = False

    def send(self, obj: dict[str, Any]) -> None:
        body = json.dumps(obj, separators=(",", ":"))
        mac = _mac(self._key, f"{self._sent}|{body}")
        self._sent += 1
        self.writer.write(f"{body} {mac}\n".encode())

    def send_soon(self, kind: str, item: Any) -> None:
        """Queue `item` under `kind`: what is queued in one turn of the event loop leaves
        as one line, {kind: [item, ...], ...}. Under load that is one body, one MAC and
        one write for many requests or replies, not one each."""
        if self._closed:
            return
        if not self._soon:
            asyncio.get_running_loop().call_soon(self._flush_soon)
        self._soon.setdefault(kind, []).append(item)
        if sum(map(len, self._soon.values())) >= SOON_MAX:
            self._flush_soon()

    def _flush_soon(self) -> None:
        soon, self._soon = self._soon, {}
        if soon and not self._closed:
            self.send(soon)

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as e:
            raise LinkError(f"connection: {e}") from None

    async def recv(self) -> dict[str, Any]:
        try:
            line = await self.reader.readline()
        except (ValueError, asyncio.LimitOverrunError):
            raise LinkError("line too long") from None
        except (ConnectionError, OSError) as e:
            raise LinkError(f"connection: {e}") from None
        if not line:
            raise LinkError("closed")
        body, _, mac = line.decode(errors="replace").rstrip("\n").rpartition(" ")
        if not hmac.compare_digest(mac, _mac(self._key, f"{self._received}|{body}")):
            raise LinkError("bad signature")
        self._received += 1
        try:
            obj = json.loads(body)
        except ValueError:
            raise LinkError("not JSON") from None
        if not isinstance(obj, dict):
            raise LinkError("not an object")
        return obj

    def close(self) -> None:
        self._closed, self._soon = True, {}
        with contextlib.suppress(Exception):
            self.writer.close()

    def discard(self) -> None:
        """Close and drop what is not delivered yet, in our buffers and the kernel's
        (a reset, SO_LINGER 0): lines withdrawn must not reach the sequencer when a
        partition heals and TCP would retransmit them."""
        self._closed, self._soon = True, {}
        sock = self.writer.get_extra_info("socket")
        with contextlib.suppress(Exception):
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.writer.transport.abort()


async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes,
                 topic: str) -> Link:
    """The sequencer's side of a new link (its routing line already read)."""
    try:
        async with asyncio.timeout(HANDSHAKE_S):
            ns = secrets.token_hex(16)
            _write_json(writer, {"nonce": ns})
            hello = await _read_json(reader)
            host, nc, mac = hello.get("host"), hello.get("nonce"), hello.get("mac")
            if not all(isinstance(x, str) and x for x in (host, nc, mac)):
                raise LinkError("bad hello")
            assert isinstance(host, str) and isinstance(nc, str) and isinstance(mac, str)
            if not hmac.compare_digest(mac, _mac(key, f"link1|{topic}|{host}|{ns}|{nc}")):
                raise LinkError(f"{host}: does not know the cluster key")
            _write_json(writer, {"mac": _mac(key, f"link2|{topic}|{host}|{nc}|{ns}")})
            await writer.drain()
    except TimeoutError:
        raise LinkError("handshake timed out") from None
    except (ConnectionError, OSError) as e:
        raise LinkError(f"connection: {e}") from None
    reader._limit = MAX_LINE  # type: ignore[attr-defined]  # batches after the handshake
    return Link(reader, writer, bytes.fromhex(_mac(key, f"session|{ns}|{nc}")), host)


async def connect(address: str, key: bytes, host: str, topic: str,
                  timeout_s: float = HANDSHAKE_S) -> Link:
    """A follower's link to the sequencer at `address` (HOST:PORT, its host's router)."""
    where, _, port = address.rpartition(":")
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(where.strip("[]"), int(port),
                                                           limit=MAX_LINE)
            _write_json(writer, {"topic": topic})
            challenge = await _read_json(reader)
            ns = challenge.get("nonce")
            if not isinstance(ns, str) or not ns:
                raise LinkError("no challenge")
            nc = secrets.token_hex(16)
            _write_json(writer, {"host": host, "nonce": nc,
                                 "mac": _mac(key, f"link1|{topic}|{host}|{ns}|{nc}")})
            proof = await _read_json(reader)
            if not hmac.compare_digest(str(proof.get("mac", "")),
                                       _mac(key, f"link2|{topic}|{host}|{nc}|{ns}")):
                writer.close()
                raise LinkError(f"{address}: does not know the cluster key")
    except TimeoutError:
        raise LinkError(f"{address}: handshake timed out") from None
    except (ConnectionError, OSError, ValueError) as e:
        raise LinkError(f"{address}: {e}") from None
    return Link(reader, writer, bytes.fromhex(_mac(key, f"session|{ns}|{nc}")), "sequencer")
