"""TheyChat's line client. It behaves like `nc`: stdin lines go to the server, the
server's lines go to stdout, it works in a pipe and in a terminal, and it exits when the
server ends the conversation (after /quit, or when TheyChat shuts down).

Unlike `nc` it does not give up when a connection drops: it reconnects with backoff and
resumes its session (`/resume SESSION LAST_SEQ`), so the person gets back their nick,
their topic and every message they missed. It may know several front doors (a cluster:
`HOST:PORT,HOST:PORT,...`): when one host is gone it resumes on the next.

Nothing typed is lost on the way: every message goes out numbered (`/say N TEXT`) and
is kept until the server acknowledges it (`sent` with its `line`). After a resume, or a
restart of the topic's server, the server says which line it took last (`caught_up`)
and the client sends again what came after; the server takes a line once, so a line
that did arrive is not repeated. To know these numbers it speaks JSON to the server and
shows the same text the server would (theychat.daemons.render).

At the end of input it sends /quit. Standard library only; `python -m theychat.client
[HOST] [PORT]` is the same program as `theychat chat`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import selectors
import socket
import ssl
import sys
import time
from collections import deque
from typing import Any, BinaryIO, TextIO

from theychat.daemons.protocol import MAX_LINE_BYTES
from theychat.daemons.render import text_lines

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7000
OUTBOX_MAX = 1000  # lines typed while disconnected, kept for after the reconnect
UNACKED_MAX = 1000  # messages sent but not yet acknowledged, kept to send again
CAUGHT_UP_WAIT_S = 10.0  # a resume that never says where it got to: send on anyway
SESSION_RE = re.compile(r"\(session ([0-9a-f]+)\)")
# The commands after which lines typed before them belong to another topic.
MOVES = (b"/join ", b"/create ", b"/leave")

Door = tuple[str, int]


class Disconnected(Exception):
    pass


class Pacer:
    """A token bucket a little below the server's (`clients.rate_per_second` and
    `rate_burst`): what the client sends is never dropped for flooding, even a paste or
    the lines sent again after a resume."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate * 0.9
        self.burst = max(1.0, burst - 2.0)
        self.tokens = self.burst
        self.at = time.monotonic()

    @classmethod
    def of(cls, limits: Any) -> Pacer | None:
        if not isinstance(limits, dict):
            return None  # an older server: send as typed
        rate, burst = limits.get("rate_per_second"), limits.get("rate_burst")
        if not isinstance(rate, int | float) or not isinstance(burst, int) or rate <= 0:
            return None
        return cls(float(rate), burst)

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def wait_s(self, now: float) -> float:
        self._refill(now)
        return max(0.0, (1 - self.tokens) / self.rate)


def parse_doors(text: str, default_port: int = DEFAULT_PORT) -> list[Door]:
    """`HOST[:PORT],HOST[:PORT],...` (an IPv6 host in brackets: `[::1]:7000`)."""
    doors = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        host, port = part, str(default_port)
        if part.startswith("["):
            host, _, rest = part[1:].partition("]")
            if rest.startswith(":"):
                port = rest[1:]
        elif part.count(":") == 1:
            host, _, port = part.partition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{part!r} is not HOST:PORT")
        doors.append((host, int(port)))
    if not doors:
        raise ValueError("no server given")
    return doors


class LineClient:
    def __init__(self, doors: list[Door], out: BinaryIO, err: TextIO,
                 reconnect_for: float, tls: ssl.SSLContext | None = None) -> None:
        self.doors = doors
        self.door = 0  # the one we use now
        self.tls = tls
        self.out, self.err = out, err
        self.reconnect_for = reconnect_for
        self.sock: socket.socket | None = None
        self.session: str | None = None  # the session we hold (to resume)
        self.fresh_session: str | None = None  # the one a new connection was given
        self.topic: str | None = None
        self.last_seq: int | None = None
        self.show_json = False  # the person typed /json: show raw JSON lines
        self.quitting = False
        self.finished = False  # the server ended the conversation on purpose
        # Lines not sent yet, as (line number, line): held while (re)connecting, then
        # paced to stay under the server's input limits (told in the /json answer).
        self.outbox: deque[tuple[int | None, bytes]] = deque()
        self.paced: deque[tuple[int | None, bytes]] = deque()
        self.pacer: Pacer | None = None
        self._inbuf = b""
        self._json_acks = 0  # our own /json requests whose reply we swallow
        self.resuming = False  # typed lines wait until the session is ours again
        self.shutting_down = False
        self._resumes_left = 0
        self.next_line = 1  # the number of the next message typed
        self.unacked: dict[int, bytes] = {}  # sent, not yet acknowledged: number -> line
        self.queued: set[int] = set()  # numbered lines not sent yet (outbox or paced)
        self.moved_at: int | None = None  # last line number before a /join etc.
        self.caught_up_by: float | None = None  # a resume waits for `caught_up` until
        self.exit_status = 0

    @property
    def host(self) -> str:
        return self.doors[self.door][0]

    @property
    def port(self) -> int:
        return self.doors[self.door][1]

    # -- output ---------------------------------------------------------------------------

    def _print(self, line: str) -> None:
        self.out.write(line.encode() + b"\n")
        self.out.flush()

    def _note(self, text: str) -> None:
        print(f"theychat chat: {text}", file=self.err, flush=True)

    def _show(self, raw: str) -> None:
        try:
            event = json.loads(raw)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            found = SESSION_RE.search(raw)  # the greeting comes before /json takes effect
            if found:
                self.fresh_session = found[1]
                if self.session is None:
                    self.session = found[1]
                elif self.session != found[1]:
                    return  # a reconnect's greeting: we are about to resume instead
            self._print(raw)
            return
        kind = event.get("type")
        if kind == "ok" and event.get("cmd") == "json" and self._json_acks:
            self._json_acks -= 1
            self.pacer = Pacer.of(event.get("limits"))
            return
        self._track(event)
        if self.show_json:
            self._print(raw)
        else:
            for line in text_lines(event):
                self._print(line)

    def _track(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "joined":
            self.topic = event.get("topic")
            if self.moved_at is not None:  # what was typed before the move was answered
                self._forget(lambda n: n <= self.moved_at)
                self.moved_at = None
        elif kind == "left":
            self.topic, self.last_seq = None, None
            self._forget(lambda n: True)
        elif kind == "resumed":
            self.session = event.get("session")
            self._note(f"resumed session {self.session}")
            if event.get("topic"):  # back into it: wait to hear which line it took last
                self.caught_up_by = time.monotonic() + CAUGHT_UP_WAIT_S
            else:
                self._lost_unacked("the session is in the lobby")
                self._resumed()
        elif kind == "caught_up":
            self._caught_up(event.get("last_line"))
        elif kind in ("sent", "error") and isinstance(event.get("line"), int):
            # Every numbered line gets one answer: taken, or refused (each its own; a
            # line sent again after a restart may be answered after later ones).
            self.unacked.pop(event["line"], None)
        elif kind == "error" and self.caught_up_by is not None:
            self._lost_unacked("the topic could not take the session back")
            self._resumed()  # the move back into the topic failed: we are in the lobby
        if kind in ("message", "sent") and event.get("topic") == self.topic:
            # our own lines count too, or a resume would replay them to us
            seq = event.get("seq")
            if isinstance(seq, int) and (self.last_seq is None or seq > self.last_seq):
                self.last_seq = seq
        if kind == "error" and event.get("code") == "session_busy" and self._resumes_left:
            self._resumes_left -= 1  # its server is restarting: ask again shortly
            time.sleep(0.2)
            self._send(self._resume_line(), queue_ok=False)
        elif kind == "error" and event.get("code") in ("no_such_session", "session_busy"):
            self._note(f"could not resume: {event.get('text')}")
            self.session, self.topic, self.last_seq = self.fresh_session, None, None
            self._lost_unacked("its session is gone")
            self._resumed()
        elif kind == "bye":
            self.finished = True
        elif kind == "notice" and "shutting down" in str(event.get("text")):
            self.shutting_down = True  # reconnect briefly: a restart, or the end

    # -- the connection ---------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        # Several doors: do not wait long for one that is gone.
        sock = socket.create_connection((self.host, self.port),
                                        timeout=10 if len(self.doors) == 1 else 3)
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        sock.settimeout(None)
        hello = b"/json\n"
        self._json_acks = 1
        if self.session is not None:
            self._resumes_left = 25
            self.resuming = True
            hello += self._resume_line()
        sock.sendall(hello)
        return sock

    def _forget(self, which: Any) -> None:
        for n in [n for n in self.unacked if which(n)]:
            del self.unacked[n]

    def _lost_unacked(self, why: str) -> None:
        sent = [n for n in self.unacked if n not in self.queued]
        if sent:
            self._note(f"{len(sent)} message(s) you typed may not have been delivered ({why})")
        self._forget(lambda n: n in sent)

    def _caught_up(self, last_line: Any) -> None:
        """The server took our lines up to `last_line`: send again those after it."""
        if isinstance(last_line, int):
            self._forget(lambda n: n <= last_line)
        again = [n for n in self.unacked if n not in self.queued]
        self.caught_up_by = None
        if self.resuming:
            self.resuming = False  # our lines first, in their order, then the rest
            self.outbox.extendleft(reversed([(n, self.unacked[n]) for n in again]))
            self.queued.update(again)
            self._resumed()
        else:  # a restart of the topic's server: the socket stayed, lines may not have
            for n in again:
                self._offer(n, self.unacked[n])

    def _resumed(self) -> None:
        """The resume is settled: what was typed meanwhile goes out now, in order."""
        self.resuming = False
        self.caught_up_by = None
        if self.sock is not None:
            self.paced.extend(self.outbox)
            self.outbox.clear()
            self._pump()

    def _resume_line(self) -> bytes:
        after = f" {self.last_seq}" if self.topic and self.last_seq is not None else ""
        return f"/resume {self.session}{after}\n".encode()

    def _connect_any(self, first: int) -> socket.socket:
        """Each door once, from `first` on; the last error if none answers."""
        error: OSError = OSError("no door")
        for i in range(len(self.doors)):
            self.door = (first + i) % len(self.doors)
            try:
                return self._connect()
            except OSError as e:
                error = e
        raise error

    def _reconnect(self) -> socket.socket | None:
        # After a shutdown notice, only a quick restart is worth waiting for.
        patience = min(self.reconnect_for, 3.0) if self.shutting_down else self.reconnect_for
        self.shutting_down = False
        deadline = time.monotonic() + patience
        delay = 0.1
        self._note("connection lost; reconnecting")
        # The host we were on first only if it is the only one: it may be gone, or cut
        # off from its cluster (it closed us to send us elsewhere).
        first = (self.door + 1) % len(self.doors)
        while time.monotonic() < deadline:
            time.sleep(delay)
            try:
                sock = self._connect_any(first)
                if len(self.doors) > 1:
                    self._note(f"connected to {self.host}:{self.port}")
                return sock
            except OSError:
                delay = min(delay * 2, 2.0)
        return None

    def _send(self, data: bytes, queue_ok: bool = True, line: int | None = None) -> None:
        if self.sock is None or (self.resuming and queue_ok):
            self._queue(line, data)
            return
        self._offer(line, data)

    def _queue(self, line: int | None, data: bytes) -> None:
        if len(self.outbox) + len(self.paced) >= OUTBOX_MAX:
            self._note(f"{OUTBOX_MAX} lines wait to be sent already; this one is dropped")
            if line is not None:
                self.unacked.pop(line, None)
            return
        self.outbox.append((line, data))
        if line is not None:
            self.queued.add(line)

    def _offer(self, line: int | None, data: bytes) -> None:
        """Send now, or as soon as the server's rate limit allows (in order)."""
        if line is not None:
            self.queued.add(line)
        self.paced.append((line, data))
        self._pump()

    def _pump(self) -> None:
        """Send what the rate limit allows of the paced lines."""
        while self.paced and self.sock is not None:
            if self.pacer is not None and not self.pacer.take(time.monotonic()):
                return
            line, data = self.paced[0]
            try:
                self.sock.sendall(data)
            except OSError:
                self._unsent()
                raise Disconnected from None
            self.paced.popleft()
            self.queued.discard(line)

    def _unsent(self) -> None:
        """The connection is gone: what was not sent waits for the next one, in order."""
        self.outbox.extendleft(reversed(self.paced))
        self.paced.clear()

    def _numbered(self, line: bytes) -> tuple[int | None, bytes]:
        """A message goes out as `/say N TEXT`, kept until acknowledged; commands as
        typed."""
        if line.startswith(b"/") and not line.startswith(b"//"):
            if line.lower().startswith(MOVES) or line.strip().lower() == b"/leave":
                self.moved_at = self.next_line - 1
            return None, line
        if not line.strip():
            return None, line
        text = line[1:] if line.startswith(b"//") else line
        if len(text) + 30 > MAX_LINE_BYTES:
            return None, line  # too long to number: the server says so
        n = self.next_line
        self.next_line += 1
        data = b"/say %d %s" % (n, text)
        if len(self.unacked) >= UNACKED_MAX:
            del self.unacked[next(iter(self.unacked))]
        self.unacked[n] = data
        return n, data

    def _typed(self, line: bytes) -> None:
        text = line.decode("utf-8", errors="replace").strip().lower()
        if text in ("/json", "/json on", "/json off"):
            # The wire stays JSON (we need the sequence numbers); only the display changes.
            self.show_json = text != "/json off"
            event = {"type": "ok", "cmd": "json", "json": self.show_json,
                     "text": f"JSON mode {'on' if self.show_json else 'off'}"}
            self._print(json.dumps(event) if self.show_json else text_lines(event)[0])
            return
        if text == "/quit":
            self.quitting = True
        n, data = self._numbered(line if line.endswith(b"\n") else line + b"\n")
        self._send(data, line=n)

    def run(self) -> int:
        try:
            self.sock = self._connect_any(0)
        except OSError as e:
            where = ", ".join(f"{h}:{p}" for h, p in self.doors)
            self._note(f"cannot connect to {where}: {e.strerror or e}")
            return 1
        sel = selectors.DefaultSelector()
        stdin_fd = sys.stdin.fileno()
        sel.register(stdin_fd, selectors.EVENT_READ, "stdin")
        sel.register(self.sock, selectors.EVENT_READ, "sock")
        pending_in = b""
        try:
            while True:
                try:
                    self._pump()
                    if self.caught_up_by is not None and time.monotonic() > self.caught_up_by:
                        self._note("the server did not say which line it took last; "
                                   "sending on")
                        self._caught_up(None)
                except Disconnected:
                    if not self._recover(sel):
                        return self.exit_status
                    continue
                for key, _ in sel.select(self._wait()):
                    try:
                        if key.data == "stdin":
                            chunk = os.read(stdin_fd, 65536)
                            if not chunk:  # end of input: say goodbye, read to the end
                                sel.unregister(stdin_fd)
                                if pending_in:
                                    self._typed(pending_in)
                                self._typed(b"/quit\n")
                                continue
                            pending_in += chunk
                            while b"\n" in pending_in:
                                line, _, pending_in = pending_in.partition(b"\n")
                                self._typed(line + b"\n")
                        else:
                            self._read()
                    except Disconnected:
                        if not self._recover(sel):
                            return self.exit_status
                        break  # the selector changed
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:
            return 0  # our stdout went away (`| head`): quit quietly, like nc

    def _wait(self) -> float | None:
        """How long select() may wait: until the next paced line may go, or the
        deadline of a resume's caught_up."""
        waits = []
        if self.paced and self.pacer is not None:
            waits.append(self.pacer.wait_s(time.monotonic()))
        if self.caught_up_by is not None:
            waits.append(max(0.0, self.caught_up_by - time.monotonic()))
        return min(waits) if waits else None

    def _recover(self, sel: selectors.BaseSelector) -> bool:
        """The connection dropped: reconnect and resume; False to end (`exit_status`)."""
        self._unsent()
        if self.finished or self.quitting:
            self.exit_status = 0
            return False
        assert self.sock is not None
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(self.sock)
        ending = self.shutting_down
        self.sock = self._reconnect()
        if self.sock is None:
            if ending:
                self.exit_status = 0  # TheyChat was shut down: the conversation is over
                return False
            self._note("could not reconnect; giving up")
            self.exit_status = 1
            return False
        sel.register(self.sock, selectors.EVENT_READ, "sock")
        if not self.resuming:
            self._resumed()
        return True

    def _read(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(65536)
            # TLS may hold decrypted bytes that select() cannot see: take them now.
            while data and isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
                data += self.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.sock.close()
            raise Disconnected
        self._inbuf += data
        while b"\n" in self._inbuf:
            line, _, self._inbuf = self._inbuf.partition(b"\n")
            self._show(line.decode("utf-8", errors="replace"))


def tls_context(cafile: str | None, insecure: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    if insecure:  # a self-signed test server: encrypted, but not authenticated
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def run(doors: list[Door], reconnect_for: float = 300.0,
        tls: ssl.SSLContext | None = None) -> int:
    try:
        return LineClient(doors, sys.stdout.buffer, sys.stderr, reconnect_for, tls).run()
    except ssl.SSLError as e:
        print(f"theychat chat: TLS failed: {e.reason or e}", file=sys.stderr)
        return 1


def default_doors(env: dict[str, str]) -> str:
    """The server when the command line names none: $THEYCHAT_SERVER (HOST:PORT or a
    list of them, what `theychat chat --config FILE` sets from the config), else
    127.0.0.1:7000."""
    return env.get("THEYCHAT_SERVER", "").strip() or f"{DEFAULT_HOST}:{DEFAULT_PORT}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="theychat chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("server", nargs="?", default=default_doors(dict(os.environ)),
                   help="HOST, HOST:PORT, or several front doors: HOST:PORT,HOST:PORT,...")
    p.add_argument("port", nargs="?", type=int, help="the port, after a single HOST")
    p.add_argument("--reconnect-for", type=float, default=300.0, metavar="SECONDS",
                   help="keep trying to reconnect this long (0: exit when disconnected)")
    add_tls_options(p)
    args = p.parse_args(argv)
    try:
        server = args.server
        if args.port is not None:  # the classic `HOST PORT`
            server = f"[{server}]:{args.port}" if ":" in server else f"{server}:{args.port}"
        doors = parse_doors(server)
    except ValueError as e:
        p.error(str(e))
    return run(doors, args.reconnect_for, tls_from_args(args))


def add_tls_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--cafile", help="trust this CA (or self-signed) certificate (with --tls)")
    p.add_argument("--insecure", action="store_true",
                   help="with --tls: do not verify the server's certificate")


def tls_from_args(args: argparse.Namespace) -> ssl.SSLContext | None:
    return tls_context(args.cafile, args.insecure) if args.tls else None
