"""Sockets that outlive a restart: SIGKILL any daemon and the people chatting through it
see at most a pause (shared/DESIGN.md section 3)."""

from __future__ import annotations

import os
import signal
import socket
import time

from tests.process.conftest import WAIT_S, Client


def pair(port: int, topic: str, tag: str) -> tuple[Client, Client]:
    a, b = Client(port, f"a{tag}"), Client(port, f"b{tag}")
    a.join(topic)
    b.join(topic)
    a.expect(f"b{tag} joined")
    return a, b


def test_server_killed_clients_stay_and_lines_sent_meanwhile_arrive(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    a, b = pair(t.port, "rust", "20")
    os.kill(t.pid("server@rust"), signal.SIGKILL)
    a.send("sent while the server was dead")  # waits in the kernel, in the kept socket
    t0 = time.monotonic()
    assert b.expect("a20:") == "[rust] a20: sent while the server was dead"
    outage = time.monotonic() - t0
    assert outage < WAIT_S
    b.send("/who")
    assert b.expect(r"\* in rust") == "* in rust: a20, b20"
    ev = t.wait_event("server@rust", "fds_restored", count=2)
    assert ev["count"] == 2
    # nobody saw anyone leave: it was a pause, not a disconnect
    assert not [ln for ln in a.lines + b.lines if " left " in ln]


def test_router_killed_topics_do_not_pause_and_lobby_stays(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    a, b = pair(t.port, "python", "21")
    lobby = Client(t.port, "lobby21")
    os.kill(t.pid("router"), signal.SIGKILL)
    a.send("the router is dead")
    # the router is off the data path: this is not held up by its restart
    assert b.expect("a21:", timeout=0.5) == "[python] a21: the router is dead"
    lobby.send("/who")
    assert lobby.expect(r"\* in the lobby") == "* in the lobby: lobby21"
    # new people are queued, not refused, while the router restarts
    newcomer = Client(t.port)
    newcomer.send("/topics")
    assert "python (2)" in newcomer.expect(r"\* topics")
    t.wait_healthy()
    a.send("/msg lobby21 still here")
    assert lobby.expect(r"\[dm") == "[dm from a21] still here"


def test_monitor_killed_child_untouched_and_new_monitor_keeps_sockets(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    a, b = pair(t.port, "rust", "22")
    server = t.pid("server@rust")
    os.kill(t.pid("server-monitor@rust"), signal.SIGKILL)
    t.wait_healthy()
    assert t.pid("server@rust") == server  # the child kept running
    t.wait_event("server-monitor@rust", "fds_resync_requested", count=2)
    # the new monitor holds the sockets: the server can now die without losing anyone
    os.kill(server, signal.SIGKILL)
    a.send("after both restarts")
    assert b.expect("a22:") == "[rust] a22: after both restarts"


def test_router_monitor_killed_then_router_killed_lobby_survives(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    lobby = Client(t.port, "lobby23")
    os.kill(t.pid("router-monitor"), signal.SIGKILL)
    t.wait_healthy()
    t.wait_event("router-monitor", "fds_resync_requested")
    deadline = time.monotonic() + WAIT_S
    while t.status()[1]["restarts"] != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(t.pid("router"), signal.SIGKILL)
    lobby.send("/who")
    assert lobby.expect(r"\* in the lobby") == "* in the lobby: lobby23"


def test_client_port_never_refuses_during_router_restarts(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    for _ in range(3):
        os.kill(t.pid("router"), signal.SIGKILL)
        s = socket.create_connection(("127.0.0.1", t.port), timeout=WAIT_S)
        s.settimeout(WAIT_S)
        assert s.recv(100).startswith(b"* welcome")
        s.close()
        t.wait_healthy()
