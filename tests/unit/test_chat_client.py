"""The line client's bookkeeping (client/chat.py): its front doors, and the numbered
lines it keeps until they are acknowledged and sends again after a resume. The server
is the test, at the other end of a socket pair."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from theychat.client.chat import LineClient, parse_doors


@pytest.mark.parametrize(
    ("text", "doors"),
    [
        ("127.0.0.1", [("127.0.0.1", 7000)]),
        ("a:1", [("a", 1)]),
        ("a:1, b:2 ,c", [("a", 1), ("b", 2), ("c", 7000)]),
        ("[::1]:7001,[fe80::1]", [("::1", 7001), ("fe80::1", 7000)]),
        ("::1", [("::1", 7000)]),
    ],
)
def test_front_doors(text: str, doors: list[tuple[str, int]]) -> None:
    assert parse_doors(text) == doors


@pytest.mark.parametrize("text", ["", " , ", "a:x", "a:0", "a:65536", ":7000"])
def test_bad_front_doors(text: str) -> None:
    with pytest.raises(ValueError):
        parse_doors(text)


class Wire:
    """A LineClient connected to the test through a socket pair."""

    def __init__(self) -> None:
        self.server, theirs = socket.socketpair()
        self.server.settimeout(2)
        self.out, self.err = io.BytesIO(), io.StringIO()
        self.client = LineClient([("h", 1)], self.out, self.err, reconnect_for=0)
        self.client.sock = theirs
        self.buf = b""

    def typed(self, *lines: str) -> None:
        for line in lines:
            self.client._typed(line.encode() + b"\n")

    def tell(self, **event: Any) -> None:
        self.client._show(json.dumps(event))

    def received(self) -> list[str]:
        self.server.setblocking(False)
        try:
            while True:
                self.buf += self.server.recv(65536)
        except BlockingIOError:
            pass
        *lines, rest = self.buf.split(b"\n")
        self.buf = rest
        return [line.decode() for line in lines]


@pytest.fixture
def wire() -> Iterator[Wire]:
    w = Wire()
    yield w
    w.server.close()
    assert w.client.sock is not None
    w.client.sock.close()


def test_messages_go_out_numbered_and_commands_as_typed(wire: Wire) -> None:
    wire.typed("hello", "/who", "//usr/bin", "  spaced", "again")
    assert wire.received() == ["/say 1 hello", "/who", "/say 2 /usr/bin", "/say 3   spaced",
                               "/say 4 again"]


def test_after_a_restart_the_lines_the_server_did_not_take_are_sent_again(
        wire: Wire) -> None:
    wire.tell(type="joined", topic="rust", members=["me"])
    wire.typed("one", "two", "three")
    wire.received()
    wire.tell(type="sent", topic="rust", seq=5, line=1)
    # The server was killed after logging line 2 but before answering it; the new one
    # says so: line 3 goes out again, line 2 does not.
    wire.tell(type="caught_up", topic="rust", last_line=2)
    assert wire.received() == ["/say 3 three"]
    wire.tell(type="sent", topic="rust", seq=7, line=3)
    wire.tell(type="caught_up", topic="rust", last_line=None)
    assert wire.received() == []  # nothing is waiting any more


def test_each_line_is_settled_by_its_own_answer_in_any_order(wire: Wire) -> None:
    wire.tell(type="joined", topic="rust", members=["me"])
    wire.typed("one", "two", "three", "four", "x" * 5000)
    assert wire.received()[-1] == "x" * 5000  # too long to number: sent as typed
    wire.tell(type="sent", topic="rust", seq=1, line=2)
    wire.tell(type="error", code="rate_limited", text="dropped", line=1)
    wire.tell(type="error", code="not_saved", text="not saved", line=4)
    wire.tell(type="caught_up", topic="rust", last_line=None)
    assert wire.received() == ["/say 3 three"]


def test_a_resume_sends_again_after_caught_up_then_what_was_typed_meanwhile(
        wire: Wire) -> None:
    c = wire.client
    c.session = "ab12"
    wire.tell(type="joined", topic="rust", members=["me"])
    wire.typed("one", "two")
    wire.received()
    c.resuming = True  # as after a reconnect: typed lines wait
    wire.typed("three")
    assert wire.received() == []
    wire.tell(type="resumed", session="ab12", nick="me", topic="rust")
    wire.tell(type="joined", topic="rust", members=["me"])
    assert wire.received() == []  # until the server says where it got to
    wire.tell(type="caught_up", topic="rust", last_line=1)
    assert wire.received() == ["/say 2 two", "/say 3 three"]


def test_a_resume_that_ends_in_the_lobby_says_what_may_be_lost(wire: Wire) -> None:
    c = wire.client
    c.session = "ab12"
    wire.tell(type="joined", topic="rust", members=["me"])
    wire.typed("one")
    wire.received()
    c.resuming = True
    wire.tell(type="resumed", session="ab12", nick="me", topic=None)
    assert "1 message(s) you typed may not have been delivered" in wire.err.getvalue()
    wire.tell(type="caught_up", topic="rust", last_line=None)
    assert wire.received() == []


def test_lines_typed_before_a_move_are_not_sent_again_in_the_new_topic(wire: Wire) -> None:
    wire.tell(type="joined", topic="rust", members=["me"])
    wire.typed("one", "/join go", "two")
    wire.received()
    wire.tell(type="joined", topic="go", members=["me"])
    wire.tell(type="caught_up", topic="go", last_line=None)
    assert wire.received() == ["/say 2 two"]


def test_lines_are_paced_under_the_servers_limits(wire: Wire) -> None:
    import time

    wire.client._json_acks = 1  # the answer to our own /json, with the server's limits
    wire.tell(type="ok", cmd="json", json=True, text="JSON mode on",
              limits={"rate_per_second": 100, "rate_burst": 5})
    wire.tell(type="joined", topic="rust", members=["me"])
    wire.typed(*[f"l{i}" for i in range(6)])
    assert wire.received() == ["/say 1 l0", "/say 2 l1", "/say 3 l2"]  # the burst, less 2
    assert 0 < (wire.client._wait() or 0) <= 0.02
    time.sleep(0.05)
    wire.client._pump()
    assert wire.received() == ["/say 4 l3", "/say 5 l4", "/say 6 l5"]
