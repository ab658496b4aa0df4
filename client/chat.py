"""A line client that behaves like `nc -N`: stdin lines go to the server, server lines
go to stdout; end of input half-closes the connection and the client exits when the
server closes. Works in a pipe and in a terminal. Standard library only, so it runs
anywhere Python does: `python -m client [HOST] [PORT]`.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7000


def _pump_stdin(sock: socket.socket) -> None:
    stdin = sys.stdin.buffer
    try:
        while True:
            line = stdin.readline()
            if not line:
                break
            sock.sendall(line)
        sock.shutdown(socket.SHUT_WR)  # like `nc -N`: the server sees our end of input
    except OSError:
        pass  # the server went away; the reader notices and ends the program


def run(host: str, port: int) -> int:
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except OSError as e:
        print(f"theychat chat: cannot connect to {host}:{port}: {e.strerror or e}",
              file=sys.stderr)
        return 1
    sock.settimeout(None)
    threading.Thread(target=_pump_stdin, args=(sock,), daemon=True).start()
    out = sys.stdout.buffer
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return 0
            out.write(data)
            out.flush()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout closed under us (`| head`): quit quietly, like nc
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        print(f"theychat chat: connection lost: {e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m client", description=__doc__)
    p.add_argument("host", nargs="?", default=DEFAULT_HOST)
    p.add_argument("port", nargs="?", type=int, default=DEFAULT_PORT)
    args = p.parse_args(argv)
    return run(args.host, args.port)
