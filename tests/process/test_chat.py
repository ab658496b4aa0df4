"""Chatting through a real tree: several clients, one of them the real `nc` binary."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.process.conftest import WAIT_S, Client, Tree

needs_nc = pytest.mark.skipif(shutil.which("nc") is None, reason="netcat-openbsd not installed")


class Nc:
    """The real netcat-openbsd, as a person would run it."""

    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen(
            ["nc", "127.0.0.1", str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        assert self.proc.stdin and self.proc.stdout
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        import os

        os.set_blocking(self.stdout.fileno(), False)
        self.buf = b""

    def send(self, line: str) -> None:
        self.stdin.write(line.encode() + b"\n")
        self.stdin.flush()

    def expect(self, needle: str, timeout: float = WAIT_S) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = self.stdout.read()
            if chunk:
                self.buf += chunk
            while b"\n" in self.buf:
                line, _, self.buf = self.buf.partition(b"\n")
                if needle in line.decode(errors="replace"):
                    return line.decode()
            time.sleep(0.02)
        raise AssertionError(f"nc never printed {needle!r}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=WAIT_S)


@needs_nc
def test_two_topics_stay_separate_and_nc_takes_part(tree: Tree) -> None:
    alice = Client(tree.port, "alice1")
    bob = Client(tree.port, "bob1")
    carol = Nc(tree.port)
    carol.expect("welcome to TheyChat")
    carol.send("/nick carol1")
    carol.expect("you are now carol1")
    alice.join("rust")
    bob.join("rust")
    alice.expect("bob1 joined rust")
    carol.send("/join python")
    carol.expect("you are in python")

    alice.send("rust is fast")
    assert bob.expect(r"\[rust\] alice1: rust is fast")
    carol.send("python is nice")
    # bob and alice are in rust: carol's line must not reach them, alice's not carol
    assert all("python is nice" not in line for line in alice.quiet() + bob.quiet())
    bob.send("/who")
    assert bob.expect(r"\* in rust: ") == "* in rust: alice1, bob1"
    carol.send("/who")
    carol.expect("* in python: carol1")
    carol.send("/topics")
    line = carol.expect("* topics")
    assert "rust (2)" in line and "python (1)" in line
    carol.kill()
    for c in (alice, bob):
        c.close()


def test_direct_message_crosses_topics_and_the_lobby(tree: Tree) -> None:
    alice = Client(tree.port, "alice2")
    carol = Client(tree.port, "carol2")
    dave = Client(tree.port, "dave2")  # stays in the lobby
    alice.join("rust")
    carol.join("python")
    alice.send("/msg carol2 meet me in python")
    assert carol.expect(r"\[dm from alice2\]") == "[dm from alice2] meet me in python"
    alice.expect(r"\* sent to carol2")
    carol.send("/msg dave2 hi from python")
    assert dave.expect(r"\[dm") == "[dm from alice2] hi from python".replace("alice2", "carol2")
    dave.send("/msg ALICE2 case does not matter")
    alice.expect(r"\[dm from dave2\] case does not matter")
    dave.send("/msg nobody2 hello?")
    assert dave.expect(r"^! ") == "! no one is called nobody2"
    for c in (alice, carol, dave):
        c.close()


def test_join_and_message_in_one_packet_lose_nothing(tree: Tree) -> None:
    bob = Client(tree.port, "bob3")
    bob.join("rust")
    alice = Client(tree.port, "alice3")
    alice.send(b"/join rust\nfirst words\n/join python\nin python now\n/leave\n/who\n")
    assert bob.expect(r"alice3:") == "[rust] alice3: first words"
    bob.expect(r"alice3 left rust \(went to python\)")
    alice.expect(r"you are in rust")
    alice.expect(r"you are in python")
    alice.expect(r"you left python")
    assert "alice3" in alice.expect(r"\* in the lobby: ")
    python = Client(tree.port, "eve3")
    python.join("python")
    python.send("/history")
    python.expect(r"\* history of python")
    assert python.expect(r"alice3: in python now").startswith("[python #")
    for c in (alice, bob, python):
        c.close()


@needs_nc
def test_a_killed_client_is_reported_and_no_longer_sent_to(tree: Tree) -> None:
    alice = Client(tree.port, "alice4")
    alice.join("python")
    victim = Nc(tree.port)
    greeting = victim.expect("welcome")
    victim_session = greeting.split("(session ")[1].split(")")[0]
    victim.send("/nick victim4")
    victim.send("/join python")
    alice.expect("victim4 joined python")
    victim.kill()
    alice.expect(r"\* victim4 left python \(connection lost\)")
    resetter = Client(tree.port, "reset4")
    resetter.join("python")
    alice.expect("reset4 joined python")
    resetter.reset()
    alice.expect(r"\* reset4 left python \(connection lost\)")
    alice.send("/who")
    assert alice.expect(r"\* in python") == "* in python: alice4"
    ev = tree.wait_event("server@python", "client_left", nick="victim4")
    assert ev["reason"] == "connection lost"
    # nothing more is sent to the dead connection: alice talks on, nobody errs
    alice.send("anyone there?")
    # the session keeps its nick for a while: nobody else can take it, its owner can
    again = Client(tree.port)
    again.send("/nick victim4")
    assert again.expect(r"victim4") == "! the nick victim4 is taken"
    again.send(f"/resume {victim_session}")
    assert again.expect(r"welcome back") == (
        f"* welcome back, victim4 (session {victim_session}); back to python"
    )
    again.expect(r"you are in python")
    alice.expect("victim4 joined python")
    alice.close()
    again.close()


def test_json_mode_gives_every_command_a_reply(tree: Tree) -> None:
    bot = Client(tree.port, "bot5", json_mode=True)
    human = Client(tree.port, "human5")
    human.join("rust")
    bot.send("/join rust")
    joined = bot.expect_json(type="joined")
    assert joined["topic"] == "rust" and "human5" in joined["members"]
    seqs = []
    for text in ("one", "two"):
        bot.send(text)
        seqs.append(bot.expect_json(type="sent")["seq"])
    assert seqs[1] == seqs[0] + 1
    human.send("three")
    msg = bot.expect_json(type="message")
    assert set(msg) == {"type", "topic", "from", "text", "seq", "ts"}
    assert (msg["topic"], msg["from"], msg["text"], msg["seq"]) == ("rust", "human5", "three",
                                                                   seqs[1] + 1)
    assert abs(msg["ts"] - time.time()) < 60
    for cmd, kind in (("/who", "who"), ("/topics", "topics"), ("/history 2", "history"),
                      ("/help", "help"), ("/nosuch", "error"), ("/nick bot5b", "ok"),
                      ("/msg human5 hi", "ok")):
        bot.send(cmd)
        reply = bot.expect_json()
        assert reply["type"] == kind, (cmd, reply)
    bot.send("/history 2")
    hist = bot.expect_json(type="history")
    assert [m["text"] for m in hist["messages"]] == ["two", "three"]
    bot.send("/nosuch")
    err = bot.expect_json(type="error")
    assert err["code"] == "unknown_command" and "/help" in err["text"]
    bot.send("/json off")
    assert bot.expect(r"JSON mode") == "* JSON mode off"  # replies come in the new mode
    bot.send("/who")
    assert bot.expect(r"^\* in rust") == "* in rust: bot5b, human5"
    bot.close()
    human.close()


def test_bad_input_gets_errors_and_never_hurts_the_daemons(tree: Tree) -> None:
    alice = Client(tree.port, "alice6")
    bob = Client(tree.port, "bob6")
    alice.join("rust")
    bob.join("rust")
    alice.expect("bob6 joined")
    # over-long line: one error, connection stays, the next line works
    bob.send(b"x" * 5000 + b"\n")
    assert bob.expect(r"^! ").startswith("! line too long")
    bob.send(b"y" * 10000)  # no newline yet
    bob.send(b"\nafter long\n")
    assert bob.expect(r"^! ").startswith("! line too long")
    assert alice.expect(r"bob6:") == "[rust] bob6: after long"
    # invalid UTF-8
    bob.send(b"bad \xff\xfe bytes\n")
    assert bob.expect(r"^! ") == "! line is not valid UTF-8; ignored"
    # escapes and control characters never reach another terminal
    bob.send(b"\x1b[2J\x1b]0;owned\x07red \x1b[31mtext\x1b[0m\x07\x08\r\n")
    got = alice.expect(r"bob6:")
    assert got == "[rust] bob6: red text"
    assert not any(ch in got for ch in "\x1b\x07\x08\r")
    # empty lines are ignored: nothing comes back, nothing is sent
    bob.send(b"\n\r\n   \n")
    assert bob.quiet() == [] and alice.quiet() == []
    # an unknown command names /help
    bob.send("/frobnicate")
    assert "/help" in bob.expect(r"^! ")
    # bad arguments
    bob.send("/nick bad name!")
    assert bob.expect(r"^! ").startswith("! usage: /nick")
    bob.send("/join no/such")
    assert "invalid topic name" in bob.expect(r"^! ")
    bob.send("/join nosuch")
    assert bob.expect(r"^! ") == "! no topic nosuch; topics: rust, python"
    bob.send("/nick alice6")
    assert bob.expect(r"^! ") == "! the nick alice6 is taken"
    # still in the topic and talking after all that
    bob.send("still here")
    assert alice.expect(r"bob6:") == "[rust] bob6: still here"
    assert all(r["state"] == "ready" for r in tree.status())
    alice.close()
    bob.close()


def test_flooding_is_refused_with_an_error(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree({"clients": {"rate_per_second": 5, "rate_burst": 10}})
    spammer = Client(t.port, "spam7")
    listener = Client(t.port, "ear7")
    listener.join("rust")
    spammer.join("rust")
    spammer.send(b"".join(f"line {i}\n".encode() for i in range(30)))
    assert spammer.expect(r"^! ").startswith("! too many lines; slow down")
    got = [ln for ln in listener.quiet(1.0) if "spam7:" in ln]
    assert 5 <= len(got) <= 15, got  # the burst (minus the /join) passes, the rest does not
    # a flood far past the burst is abuse: the connection is closed and logged
    flood = b"".join(f"f {i}\n".encode() for i in range(200))
    with pytest.raises((EOFError, ConnectionError)):
        spammer.send(flood)
        spammer.quiet(2.0)
    ev = t.wait_event("server@rust", "client_left", nick="spam7")
    assert ev["reason"] == "flooding"
    listener.expect(r"spam7 left rust \(flooding\)")


def test_one_address_gets_at_most_max_per_address_connections(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree({"clients": {"max_per_address": 2}})
    first, second = Client(t.port, "pa1"), Client(t.port, "pa2")
    second.join("rust")  # in a topic it still counts
    with socket.create_connection(("127.0.0.1", t.port), timeout=WAIT_S) as third:
        third.settimeout(WAIT_S)
        got = b""
        while chunk := third.recv(1024):
            got += chunk
    assert got == b"! too many connections from your address; try again later\n"
    ev = t.wait_event("router", "client_refused", reason="too many from this address")
    assert ev["peer"].startswith("127.0.0.1:")
    first.send("/quit")
    first.expect("bye")
    Client(t.port, "pa3")  # a place is free again
    first.close()


def test_control_socket_answers_garbage_and_survives(tree: Tree) -> None:
    import socket

    for name in ("router", "server@rust", "server-monitor@rust", "router-monitor"):
        path = tree.state / "run" / f"{name}.ctl"
        for payload, code in ((b"{not json", "bad_json"), (b"[1,2]", "bad_request"),
                              (b'{"op": 5}', "bad_request"), (b'{"op": "nope"}', "unknown_op"),
                              (b'{"op": "adopt"}', "bad_request")):
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.settimeout(WAIT_S)
                s.connect(str(path))
                s.send(payload)
                reply = json.loads(s.recv(65536))
            if "monitor" in name and code == "bad_request" and b"adopt" in payload:
                code = "unknown_op"
            assert reply["ok"] is False and reply["code"] == code, (name, payload, reply)
    assert all(r["state"] == "ready" for r in tree.status())


def test_a_client_that_stops_reading_is_cut_off(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree({"clients": {"rate_per_second": 1_000_000, "rate_burst": 1_000_000,
                               "output_queue_bytes": 65536}})
    import socket

    sleeper = Client(t.port, "sleepy11")
    sleeper.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sleeper.join("rust")
    talker = Client(t.port, "talker11")
    talker.join("rust")
    watcher = Client(t.port, "watch11")
    watcher.join("rust")
    line = b"z" * 1000 + b"\n"
    deadline = time.monotonic() + 30
    cut = None
    while cut is None and time.monotonic() < deadline:
        talker.send(line * 200)  # the sleeper never reads a byte of this
        watcher.buf = b""  # the watcher reads; keep only what is new
        for ln in watcher.quiet(0.05):
            if "sleepy11 left rust" in ln:
                cut = ln
    assert cut == "* sleepy11 left rust (too slow: output queue full)"
    ev = t.wait_event("server@rust", "client_left", nick="sleepy11")
    assert ev["reason"] == "too slow: output queue full"
    # the server's memory did not grow without bound meanwhile, and it still serves
    status = Path(f"/proc/{t.pid('server@rust')}/status").read_text().splitlines()
    rss_kib = int(next(ln.split()[1] for ln in status if ln.startswith("VmRSS")))
    assert rss_kib < 200_000
    talker.send("still fine")
    assert watcher.expect("talker11: still") == "[rust] talker11: still fine"


@pytest.mark.skipif(shutil.which("ss") is None, reason="iproute2's ss not installed")
def test_tcp_keepalive_watches_every_client_socket(tree: Tree) -> None:
    c = Client(tree.port, "kept12")
    c.join("python")  # the option travels with the socket to the server
    local = c.sock.getsockname()[1]
    deadline = time.monotonic() + WAIT_S
    out = ""
    # e.g. timer:(keepalive,14sec,0) once the line is idle (before, a send timer shows)
    while "timer:(keepalive," not in out and time.monotonic() < deadline:
        time.sleep(0.1)
        out = subprocess.run(["ss", "-tnoH", "state", "established", f"( dport = :{local} )"],
                             capture_output=True, text=True, timeout=WAIT_S).stdout
    assert "timer:(keepalive," in out, out
    seconds = int(out.split("timer:(keepalive,")[1].split("sec")[0].split("min")[0])
    assert seconds <= 15
    c.close()
