"""Sockets passed over a control socket must not leak into the daemons we spawn."""

from __future__ import annotations

import asyncio
import os
import socket

from daemons import control


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
