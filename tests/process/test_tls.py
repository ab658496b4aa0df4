"""TLS on the client port: real TLS clients, handoff and restarts of TLS connections."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.process.conftest import WAIT_S, Client, free_port

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    crt, key = d / "cert.pem", d / "key.pem"
    san = "subjectAltName=DNS:localhost,IP:127.0.0.1"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", san,
                    "-keyout", str(key), "-out", str(crt)],
                   check=True, capture_output=True, timeout=60)
    return crt, key


def tls_tree(make_tree: Any, cert: tuple[Path, Path]) -> tuple[Any, int]:
    plain = free_port()
    t = make_tree({"listen": {"tls": {"cert": str(cert[0]), "key": str(cert[1]),
                                      "plain_port": plain}}})
    return t, plain


def tls_client(port: int, cafile: Path, nick: str | None = None) -> Client:
    ctx = ssl.create_default_context(cafile=str(cafile))
    return Client(port, nick, wrap=lambda raw: ctx.wrap_socket(raw, server_hostname="localhost"))


@needs_openssl
def test_tls_clients_chat_through_handoff_and_server_restarts(make_tree, cert) -> None:  # type: ignore[no-untyped-def]
    t, plain = tls_tree(make_tree, cert)
    # the client port speaks TLS only; plain text is on the loopback plain_port
    with socket.create_connection(("127.0.0.1", t.port), timeout=WAIT_S) as s:
        s.sendall(b"/who\n")
        s.settimeout(WAIT_S)
        assert b"welcome" not in s.recv(4096)
    a = tls_client(t.port, cert[0], "a60")
    b = Client(plain, "b60")  # plain, on loopback
    a.join("rust")
    b.join("rust")
    a.send("over tls")
    assert b.expect("a60:") == "[rust] a60: over tls"
    os.kill(t.pid("server@rust"), signal.SIGKILL)  # the TLS session is not in the server
    a.send("still over tls after the server restart")
    assert b.expect("a60: still") == "[rust] a60: still over tls after the server restart"
    b.send("back to you")
    assert a.expect("b60:") == "[rust] b60: back to you"
    a.send("/join python")
    a.expect("you are in python")


@needs_openssl
def test_openssl_s_client_and_ncat_work(make_tree, cert) -> None:  # type: ignore[no-untyped-def]
    t, plain = tls_tree(make_tree, cert)
    listener = Client(plain, "ear61")
    listener.join("python")
    clients = [["openssl", "s_client", "-quiet", "-CAfile", str(cert[0]), "-verify_return_error",
                "-connect", f"127.0.0.1:{t.port}", "-servername", "localhost"]]
    if shutil.which("ncat"):
        clients.append(["ncat", "--ssl", "--ssl-trustfile", str(cert[0]), "--ssl-verify",
                        "localhost", str(t.port)])
    for i, argv in enumerate(clients):
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        assert proc.stdin and proc.stdout
        proc.stdin.write(f"/nick tool{i}\n/join python\nhello from {argv[0]}\n".encode())
        proc.stdin.flush()
        assert listener.expect(f"tool{i}:") == f"[python] tool{i}: hello from {argv[0]}"
        proc.stdin.write(b"/quit\n")
        proc.stdin.flush()
        os.set_blocking(proc.stdout.fileno(), False)
        out, deadline = b"", time.monotonic() + WAIT_S
        while b"* bye" not in out and time.monotonic() < deadline:
            out += proc.stdout.read() or b""
            time.sleep(0.05)
        proc.kill()
        proc.wait(timeout=WAIT_S)
        assert b"welcome to TheyChat" in out and b"* bye" in out


@needs_openssl
def test_line_client_over_tls_resumes_after_the_router_dies(make_tree, cert) -> None:  # type: ignore[no-untyped-def]
    t, plain = tls_tree(make_tree, cert)
    other = Client(plain, "o62", json_mode=True)
    other.send("/join rust")
    other.expect_json(type="joined")
    chat = subprocess.Popen(
        [sys.executable, "-m", "theychat.client", "localhost", str(t.port), "--tls", "--cafile",
         str(cert[0]), "--reconnect-for", "20"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert chat.stdin and chat.stdout and chat.stderr
    try:
        chat.stdin.write(b"/nick c62\n/join rust\nbefore\n")
        chat.stdin.flush()
        other.expect_json(type="message", text="before")
        # Let the router log where c62 went: a router killed within milliseconds of a
        # handoff may not know (docs/recovery.md, known gaps), and that is not this test.
        t.wait_event("router", "handoff", nick="c62")
        time.sleep(0.3)
        # The TLS session lives in the router: killing it ends the session; the client
        # reconnects, resumes, and nothing it typed is lost.
        os.kill(t.pid("router"), signal.SIGKILL)
        t.wait_healthy()
        os.set_blocking(chat.stderr.fileno(), False)
        notes, deadline = b"", time.monotonic() + 3 * WAIT_S
        while b"resumed session" not in notes and time.monotonic() < deadline:
            notes += chat.stderr.read() or b""
            time.sleep(0.05)
        assert b"resumed session" in notes, notes
        other.send("while the router restarted")
        other.expect_json(type="sent")
        chat.stdin.write(b"after\n")
        chat.stdin.flush()
        other.expect_json(type="message", text="after", timeout=2 * WAIT_S)
        chat.stdin.close()
        assert chat.wait(timeout=WAIT_S) == 0
        out = chat.stdout.read().decode().splitlines()
        assert "[rust] o62: while the router restarted" in out
    finally:
        if chat.poll() is None:
            chat.kill()


def test_tls_config_errors_are_clear(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("listen:\n  tls:\n    cert: /nonexistent.pem\n")
    res = subprocess.run([sys.executable, "-m", "theychat.daemons", "status", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=WAIT_S)
    assert res.returncode == 2
    assert "listen.tls: set both cert and key, or neither" in res.stderr
