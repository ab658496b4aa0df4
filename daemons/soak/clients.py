"""The soak's clients: JSON-mode connections that talk at a steady rate in one topic, resume
their session whenever the connection ends, and write down everything they see.

Each client's transcript (one JSON object per line, `t` = time.time()) is all the judge
knows of it: `connected`, `sent` (a line went out), `acked` (the server's `sent`, with the sequence
number the line was given; which line it was is not said: a line the server read but
had not logged when it was killed is never acknowledged), `message`
(with `shown`: false when the client's own resume logic hides a sequence number it has
already shown), `joined`, `resumed`, `resume_failed`, `error`, `disconnected`, `reset`
(the soak cut this connection on purpose) and `gave_up` (it could not reconnect).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from theychat.daemons.soak.netns import connect_in

SESSION_RE = re.compile(r"\(session ([0-9a-f]+)\)")
CONNECT_TIMEOUT_S = 5.0
RECONNECT_DELAY_S = 0.1
BUSY_RETRY_S = 0.2
BUSY_RETRIES = 50  # a restarting server holds a session for well under 10 s


class Transcript:
    def __init__(self, path: Path) -> None:
        self._f: TextIO = open(path, "w", buffering=1 << 16)  # noqa: SIM115 (closed in close)

    def write(self, ev: str, **fields: Any) -> None:
        self._f.write(json.dumps({"t": round(time.time(), 6), "ev": ev, **fields}) + "\n")

    def close(self) -> None:
        self._f.close()


class SoakClient:
    def __init__(self, nick: str, topic: str, host: str, port: int, rate: float,
                 transcript: Path, reconnect_for: float = 30.0, phase: float = 0.0,
                 doors: Sequence[tuple[str, int]] | None = None,
                 netns: str | None = None) -> None:
        self.nick, self.topic = nick, topic
        # Where it connects: one door, or a cluster's (the next one after each drop, as
        # theychat chat does); from inside `netns` (the lab's people) if given.
        self.doors = list(doors) if doors else [(host, port)]
        self.door = 0
        self.netns = netns
        self.interval = 1.0 / rate
        self.phase = phase  # 0..1 of an interval: clients spread their lines evenly
        self.t = Transcript(transcript)
        self.reconnect_for = reconnect_for
        self.session: str | None = None
        self.fresh: str | None = None  # the session this connection was greeted with
        self.last_seq: int | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.in_topic = False
        self.resuming = False
        self.busy_left = 0
        self.counter = 0
        self.stopping = False
        self.was_reset = False
        self.down_since: float | None = None  # monotonic time of the first failed attempt

    # -- the connection -----------------------------------------------------------------

    async def run(self) -> None:
        """Talk until `stop()`; reconnect (bounded) whenever the connection ends."""
        send = asyncio.ensure_future(self._send_loop())
        try:
            while not self.stopping:
                try:
                    await self._connection()
                except (OSError, EOFError, TimeoutError, ValueError) as e:
                    reason = "reset by the soak" if self.was_reset else repr(e)
                    self.t.write("disconnected", reason=reason)
                self._forget_connection()
                self.door = (self.door + 1) % len(self.doors)
                if self.stopping or not await self._reconnect_wait():
                    break
        finally:
            send.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await send
            self.t.close()

    async def _reconnect_wait(self) -> bool:
        """Pause before the next attempt; False once the port has refused us (or we could
        not resume) for reconnect_for seconds in a row."""
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
        if now - self.down_since > self.reconnect_for:
            self.t.write("gave_up", after_s=self.reconnect_for)
            return False
        await asyncio.sleep(RECONNECT_DELAY_S)
        return not self.stopping

    def _forget_connection(self) -> None:
        self.writer = None
        self.in_topic = self.resuming = self.was_reset = False

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = self.doors[self.door]
        if self.netns is None:
            return await asyncio.wait_for(asyncio.open_connection(host, port),
                                          CONNECT_TIMEOUT_S)
        sock = await asyncio.get_running_loop().run_in_executor(
            None, connect_in, self.netns, host, port, CONNECT_TIMEOUT_S)
        sock.setblocking(False)
        return await asyncio.open_connection(sock=sock)

    async def _connection(self) -> None:
        reader, writer = await self._open()
        sock = writer.get_extra_info("socket")
        if sock.getsockname() == sock.getpeername():
            writer.transport.abort()  # connected to itself: nobody listens there now
            raise OSError("connected to itself (nobody listens on the port)")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.writer = writer
        try:
            greeting = (await asyncio.wait_for(reader.readline(), CONNECT_TIMEOUT_S)).decode()
            found = SESSION_RE.search(greeting)
            if found is None:
                raise ValueError(f"unexpected greeting {greeting!r}")
            self.fresh = found[1]
            self.down_since = None
            host, port = self.doors[self.door]
            self.t.write("connected", session=self.fresh, door=f"{host}:{port}")
            if self.session is None:
                self.session = self.fresh
                self._write(f"/json\n/nick {self.nick}\n/join {self.topic}\n")
            else:
                self.resuming, self.busy_left = True, BUSY_RETRIES
                self._write("/json\n" + self._resume_line())
            while True:
                line = await reader.readline()
                if not line.endswith(b"\n"):
                    raise EOFError("the connection was closed")
                self._on_line(line)
        finally:
            writer.transport.abort()

    def _write(self, text: str) -> None:
        if self.writer is not None and not self.writer.transport.is_closing():
            self.writer.write(text.encode())

    def _resume_line(self) -> str:
        after = f" {self.last_seq}" if self.last_seq is not None else ""
        return f"/resume {self.session}{after}\n"

    def reset(self) -> bool:
        """Cut the connection abruptly (RST), as a crashed client or a broken link would."""
        w = self.writer
        if w is None or w.transport.is_closing():
            return False
        sock = w.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.was_reset = True
        self.t.write("reset")
        w.transport.abort()
        return True

    def stop(self) -> None:
        self.stopping = True
        if self.writer is not None:
            self.writer.transport.abort()

    # -- what arrives -------------------------------------------------------------------

    def _on_line(self, raw: bytes) -> None:
        try:
            event = json.loads(raw)
        except ValueError:
            self.t.write("unparsable", line=raw.decode(errors="replace")[:200])
            return
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if kind == "message" and event.get("topic") == self.topic:
            self._message(event)
        elif kind == "history" and event.get("topic") == self.topic:
            for msg in event.get("messages", []):
                if isinstance(msg, dict):
                    self._message(msg, replayed=True)
        elif kind == "sent" and event.get("topic") == self.topic:
            seq = event.get("seq")
            self.t.write("acked", seq=seq)
            if isinstance(seq, int):
                self.last_seq = seq if self.last_seq is None else max(self.last_seq, seq)
        elif kind == "joined":
            self.in_topic = event.get("topic") == self.topic
            self.resuming = False
            self.t.write("joined", topic=event.get("topic"))
        elif kind == "resumed":
            self.session = str(event.get("session"))
            self.t.write("resumed", session=self.session, topic=event.get("topic"))
            if event.get("topic") is None:  # resumed into the lobby: walk back in
                self._write(f"/join {self.topic}\n")
        elif kind == "error":
            self._error(event)
        elif kind in ("left", "notice"):
            if kind == "left":
                self.in_topic = False
            self.t.write(kind, text=event.get("text"), reason=event.get("reason"))

    def _message(self, msg: dict[str, Any], replayed: bool = False) -> None:
        seq = msg.get("seq")
        # The client's own rule (as in client/chat.py): show only what is newer than the
        # last sequence number seen or acknowledged, so a replay shows nothing twice.
        shown = isinstance(seq, int) and (self.last_seq is None or seq > self.last_seq)
        if shown:
            assert isinstance(seq, int)
            self.last_seq = seq
        self.t.write("message", seq=seq, sender=msg.get("from"), text=msg.get("text"),
                     shown=shown, replayed=replayed)

    def _error(self, event: dict[str, Any]) -> None:
        code = event.get("code")
        self.t.write("error", code=code, text=event.get("text"))
        if code == "session_busy" and self.resuming and self.busy_left > 0:
            self.busy_left -= 1
            asyncio.get_running_loop().call_later(
                BUSY_RETRY_S, lambda: self._write(self._resume_line()))
        elif code in ("no_such_session", "session_busy") and self.resuming:
            # The session is gone: carry on as a new member (the judge counts this).
            self.t.write("resume_failed", code=code)
            self.session, self.resuming = self.fresh, False
            self._write(f"/nick {self.nick}\n/join {self.topic}\n")
        elif code == "unavailable" and not self.in_topic:
            asyncio.get_running_loop().call_later(
                BUSY_RETRY_S, lambda: self._write(f"/join {self.topic}\n"))

    # -- what goes out ------------------------------------------------------------------

    async def _send_loop(self) -> None:
        """One line every interval on a fixed schedule: after a stall, the next slot."""
        next_at = time.monotonic() + self.phase * self.interval
        while not self.stopping:
            next_at += self.interval
            now = time.monotonic()
            if next_at < now:
                next_at = now + self.interval
            await asyncio.sleep(next_at - now)
            if self.writer is None or not self.in_topic or self.resuming:
                continue
            self.counter += 1
            self._write(f"soak {self.nick} {self.counter}\n")
            self.t.write("sent", n=self.counter)
