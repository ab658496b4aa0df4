"""TheyChat's line client. It behaves like `nc`: stdin lines go to the server, the
server's lines go to stdout, it works in a pipe and in a terminal, and it exits when the
server ends the conversation (after /quit, or when TheyChat shuts down).

Unlike `nc` it does not give up when a connection drops: it reconnects with backoff and
resumes its session (`/resume SESSION LAST_SEQ`), so the person gets back their nick,
their topic and every message they missed. To know the last sequence number it speaks
JSON to the server and shows the same text the server would (theychat.daemons.render).
At the end of input it sends /quit. Standard library only; `python -m theychat.client
[HOST] [PORT]` is the same program as `theychat chat`.
"""

from __future__ import annotations

import argparse
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

from theychat.daemons.render import text_lines

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7000
OUTBOX_MAX = 1000  # lines typed while disconnected, kept for after the reconnect
SESSION_RE = re.compile(r"\(session ([0-9a-f]+)\)")


class Disconnected(Exception):
    pass


class LineClient:
    def __init__(self, host: str, port: int, out: BinaryIO, err: TextIO,
                 reconnect_for: float, tls: ssl.SSLContext | None = None) -> None:
        self.host, self.port = host, port
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
        self.outbox: deque[bytes] = deque(maxlen=OUTBOX_MAX)
        self._inbuf = b""
        self._json_acks = 0  # our own /json requests whose reply we swallow
        self.resuming = False  # typed lines wait until the session is ours again
        self.shutting_down = False
        self._resumes_left = 0

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
        elif kind == "left":
            self.topic, self.last_seq = None, None
        elif kind == "resumed":
            self.session = event.get("session")
            self._note(f"resumed session {self.session}")
            self._resumed()
        elif kind in ("message", "sent") and event.get("topic") == self.topic:
            # our own lines count too, or a resume would replay them to us
            seq = event.get("seq")
            if isinstance(seq, int) and (self.last_seq is None or seq > self.last_seq):
                self.last_seq = seq
        elif kind == "error" and event.get("code") == "session_busy" and self._resumes_left:
            self._resumes_left -= 1  # its server is restarting: ask again shortly
            time.sleep(0.2)
            self._send(self._resume_line(), queue_ok=False)
        elif kind == "error" and event.get("code") in ("no_such_session", "session_busy"):
            self._note(f"could not resume: {event.get('text')}")
            self.session, self.topic, self.last_seq = self.fresh_session, None, None
            self._resumed()
        elif kind == "bye":
            self.finished = True
        elif kind == "notice" and "shutting down" in str(event.get("text")):
            self.shutting_down = True  # reconnect briefly: a restart, or the end

    # -- the connection ---------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=10)
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

    def _resumed(self) -> None:
        """The resume is settled: what was typed meanwhile goes out now, in order."""
        self.resuming = False
        while self.outbox and self.sock is not None:
            self._send(self.outbox.popleft())

    def _resume_line(self) -> bytes:
        after = f" {self.last_seq}" if self.topic and self.last_seq is not None else ""
        return f"/resume {self.session}{after}\n".encode()

    def _reconnect(self) -> socket.socket | None:
        # After a shutdown notice, only a quick restart is worth waiting for.
        patience = min(self.reconnect_for, 3.0) if self.shutting_down else self.reconnect_for
        self.shutting_down = False
        deadline = time.monotonic() + patience
        delay = 0.1
        self._note("connection lost; reconnecting")
        while time.monotonic() < deadline:
            time.sleep(delay)
            try:
                return self._connect()
            except OSError:
                delay = min(delay * 2, 2.0)
        return None

    def _send(self, data: bytes, queue_ok: bool = True) -> None:
        if self.sock is None or (self.resuming and queue_ok):
            self.outbox.append(data)
            return
        try:
            self.sock.sendall(data)
        except OSError:
            self.outbox.append(data)
            raise Disconnected from None

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
        self._send(line if line.endswith(b"\n") else line + b"\n")

    def run(self) -> int:
        try:
            self.sock = self._connect()
        except OSError as e:
            self._note(f"cannot connect to {self.host}:{self.port}: {e.strerror or e}")
            return 1
        sel = selectors.DefaultSelector()
        stdin_fd = sys.stdin.fileno()
        sel.register(stdin_fd, selectors.EVENT_READ, "stdin")
        sel.register(self.sock, selectors.EVENT_READ, "sock")
        pending_in = b""
        try:
            while True:
                for key, _ in sel.select():
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
                        if self.finished or self.quitting:
                            return 0
                        sel.unregister(self.sock)
                        ending = self.shutting_down
                        self.sock = self._reconnect()
                        if self.sock is None:
                            if ending:
                                return 0  # TheyChat was shut down: the conversation is over
                            self._note("could not reconnect; giving up")
                            return 1
                        sel.register(self.sock, selectors.EVENT_READ, "sock")
                        if not self.resuming:
                            self._resumed()
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:
            return 0  # our stdout went away (`| head`): quit quietly, like nc

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


def run(host: str, port: int, reconnect_for: float = 300.0,
        tls: ssl.SSLContext | None = None) -> int:
    try:
        return LineClient(host, port, sys.stdout.buffer, sys.stderr, reconnect_for, tls).run()
    except ssl.SSLError as e:
        print(f"theychat chat: TLS failed: {e.reason or e}", file=sys.stderr)
        return 1


def default_server(env: dict[str, str]) -> tuple[str, int]:
    """HOST and PORT when the command line names none: $THEYCHAT_SERVER (HOST:PORT, what
    `theychat chat --config FILE` sets from the config), else 127.0.0.1:7000."""
    value = env.get("THEYCHAT_SERVER", "")
    host, sep, port = value.rpartition(":")
    if sep and host and port.isdigit():
        return host.strip("[]"), int(port)
    return DEFAULT_HOST, DEFAULT_PORT


def main(argv: list[str] | None = None) -> int:
    host, port = default_server(dict(os.environ))
    p = argparse.ArgumentParser(prog="theychat chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("host", nargs="?", default=host)
    p.add_argument("port", nargs="?", type=int, default=port)
    p.add_argument("--reconnect-for", type=float, default=300.0, metavar="SECONDS",
                   help="keep trying to reconnect this long (0: exit when disconnected)")
    add_tls_options(p)
    args = p.parse_args(argv)
    return run(args.host, args.port, args.reconnect_for, tls_from_args(args))


def add_tls_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--cafile", help="trust this CA (or self-signed) certificate (with --tls)")
    p.add_argument("--insecure", action="store_true",
                   help="with --tls: do not verify the server's certificate")


def tls_from_args(args: argparse.Namespace) -> ssl.SSLContext | None:
    return tls_context(args.cafile, args.insecure) if args.tls else None
