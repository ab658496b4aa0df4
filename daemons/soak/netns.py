"""Doing something inside a network namespace from this process: a thread enters it
(setns(2) changes the calling thread only), runs a function and ends. A socket made
there stays in that namespace for good, so the lab's clients (in a namespace of their
own) are sockets made this way, used by the event loop as any other."""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def run_in(netns: str, fn: Callable[[], T]) -> T:
    """`fn()` in network namespace `netns` (a name of `ip netns`); its result or its
    exception."""
    result: list[T] = []
    error: list[BaseException] = []

    def enter_and_run() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns {netns}: {os.strerror(errno)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:  # handed to the caller
            error.append(e)

    thread = threading.Thread(target=enter_and_run, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def connect_in(netns: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection made from inside `netns`."""
    return run_in(netns, lambda: socket.create_connection((host, port), timeout=timeout))
