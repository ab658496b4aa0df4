"""The control socket's edges: passed fds never leak into children, and a full backlog
means wait, not fail."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

from theychat.daemons import control


def test_received_fds_are_close_on_exec() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    os.set_inheritable(r, True)
    b.setblocking(False)
    try:
        socket.send_fds(a, [b'{"op":"x"}'], [r])
        data, fds = asyncio.run(control.recv_packet(b))
        assert data and len(fds) == 1
        assert os.get_inheritable(fds[0]) is False
        control.close_fds(fds)
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_a_request_waits_for_room_in_a_full_backlog(tmp_path: Path) -> None:
    """Unix sockets refuse a connect at once (EAGAIN) when the backlog is full; the
    request must wait for room within its timeout, not fail or think it connected."""
    path = tmp_path / "x.ctl"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(str(path))
    server.listen(0)
    fillers = []
    for _ in range(64):  # fill the backlog (its real size varies by kernel)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.setblocking(False)
        try:
            s.connect(str(path))
        except BlockingIOError:
            s.close()
            break
        fillers.append(s)

    def serve() -> None:
        time.sleep(0.2)
        for _ in range(len(fillers) + 1):
            conn, _ = server.accept()
            conn.settimeout(2)
            try:
                data = conn.recv(1000)
                if data:
                    conn.send(b'{"ok":true,"echo":1}')
            except OSError:
                pass
            finally:
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        reply = asyncio.run(control.request(path, {"op": "ping"}, timeout=3.0))
        assert reply == {"ok": True, "echo": 1}
    finally:
        for s in fillers:
            s.close()
        server.close()
