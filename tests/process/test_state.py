"""State that outlives processes: the write-ahead logs and resumable sessions."""

from __future__ import annotations

import os
import signal
import time

from tests.process.conftest import WAIT_S, Client


def test_down_then_up_brings_back_history_and_nicks(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    alice = Client(t.port, "alice40")
    alice.join("rust")
    for i in range(3):
        alice.send(f"remember me {i}")
    alice.send("/history 3")
    alice.expect("remember me 2")  # all three are in: durable before they are shown
    session = alice.session
    assert t.cli("down").returncode == 0
    assert t.cli("up").returncode == 0
    t.wait_healthy()
    bob = Client(t.port, "bob40")
    bob.join("rust")
    bob.send("/history 3")
    bob.expect(r"\* history of rust: 3")
    assert [bob.expect(r"\[rust #") for _ in range(3)] == [
        f"[rust #{i + 1}] alice40: remember me {i}" for i in range(3)]
    # the nick is still alice40's: reserved for her session, which she can take back
    bob.send("/nick alice40")
    assert bob.expect(r"^! ") == "! the nick alice40 is taken"
    back = Client(t.port)
    back.send(f"/resume {session}")
    assert back.expect("welcome back") == (
        f"* welcome back, alice40 (session {session}); back to rust")
    back.send("and I am back")
    assert bob.expect("alice40:") == "[rust] alice40: and I am back"


def test_sequence_numbers_continue_across_a_server_kill(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    sender = Client(t.port, "s41", json_mode=True)
    reader = Client(t.port, "r41", json_mode=True)
    reader.send("/join rust")
    reader.expect_json(type="joined")
    sender.send("/join rust")
    sender.expect_json(type="joined")
    for i in range(60):
        sender.send(f"m{i}")
        if i in (20, 40):
            os.kill(t.pid("server@rust"), signal.SIGKILL)
        time.sleep(0.01)
    acked: list[int] = []
    while True:  # acknowledgements until none come for a second
        try:
            acked.append(sender.expect_json(timeout=1.0, type="sent")["seq"])
        except AssertionError:
            break
    # Lines the killed server had read but not yet logged may be lost (under load it
    # reads several at once): they were never acknowledged, so a sender knows to
    # resend them. Everything acknowledged arrives.
    assert len(acked) >= 45
    seen = [reader.expect_json(type="message")["seq"] for _ in acked]
    # delivered once each, in order, numbered without a gap or a repeat
    assert seen == acked == list(range(acked[0], acked[0] + len(acked)))
    assert reader.quiet(0.5) == []


def test_server_and_monitor_dying_together_reconcile_and_resume(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    a = Client(t.port, "a42", json_mode=True)
    a.send("/join python")
    a.expect_json(type="joined")
    a.send("before the crash")
    last = a.expect_json(type="sent")["seq"]
    server, monitor = t.pid("server@python"), t.pid("server-monitor@python")
    os.kill(monitor, signal.SIGKILL)
    os.kill(server, signal.SIGKILL)
    # both copies of the socket are gone: the client sees the connection end
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            a.quiet(0.2)
        except (EOFError, ConnectionError):
            break
    else:
        raise AssertionError("the connection should have ended")
    ev = t.wait_event("server@python", "client_left", nick="a42")
    assert ev["reason"] == "connection lost in a restart"
    t.wait_healthy()
    other = Client(t.port, "o42")
    other.join("python")
    other.send("while a42 was away")
    other.send("/who")
    assert other.expect(r"\* in python") == "* in python: o42"
    # the line client's way back: resume the session after the last seq it saw
    again = Client(t.port)
    again.send(f"/resume {a.session} {last}")
    again.expect("welcome back, a42")
    again.expect("you are in python")
    assert again.expect("o42:") == "[python] o42: while a42 was away"


def test_resume_replays_exactly_what_was_missed(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    a = Client(t.port, "a43", json_mode=True)
    b = Client(t.port, "b43")
    b.join("rust")
    a.send("/join rust")
    a.expect_json(type="joined")
    b.send("one")
    last = a.expect_json(type="message")["seq"]
    a.reset()
    b.expect(r"a43 left rust \(connection lost\)")
    for word in ("two", "three"):
        b.send(word)
    c = Client(t.port, json_mode=True)
    c.send(f"/resume {a.session} {last}")
    resumed = c.expect_json(type="resumed")
    assert (resumed["nick"], resumed["topic"]) == ("a43", "rust")
    c.expect_json(type="joined")
    missed = [c.expect_json(type="message") for _ in range(2)]
    assert [(m["seq"], m["text"]) for m in missed] == [(last + 1, "two"), (last + 2, "three")]
    b.send("four")
    assert c.expect_json(type="message")["seq"] == last + 3
    # the newest connection with the (secret) session id wins; the older one is told
    d = Client(t.port)
    d.send(f"/resume {a.session}")
    d.expect("welcome back, a43")
    assert c.expect_json(type="notice")["text"] == "this session was resumed elsewhere"
    d.send("from the new connection")
    assert b.expect("a43:") == "[rust] a43: from the new connection"
    e = Client(t.port)
    e.send("/resume 00000000")
    assert e.expect(r"^! ").startswith("! no session 00000000 to resume")


def test_a_damaged_log_is_repaired_and_the_server_starts(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    a = Client(t.port, "a44")
    a.join("rust")
    for i in range(5):
        a.send(f"line {i}")
    a.send("/history 5")
    a.expect("line 4")
    assert t.cli("down").returncode == 0
    wal = t.state / "wal" / "server@rust.wal"
    with open(wal, "ab") as f:
        f.write(b"\x30\x00\x00\x00garbage, as a crash mid-write leaves it")
    before = t.log_events("server@rust")[-1]["ts"]
    assert t.cli("up").returncode == 0
    ev = t.wait_event("server@rust", "wal_replayed", after=before)
    assert ev["truncated_bytes"] > 0
    b = Client(t.port, "b44")
    b.join("rust")
    b.send("/history 5")
    b.expect(r"\* history of rust: 5")
    assert b.expect(r"\[rust #5\]") == "[rust #5] a44: line 4"
    b.send("after the repair")
    b.send("/history 1")
    assert b.expect(r"\[rust #6\]") == "[rust #6] b44: after the repair"


def test_the_line_client_reconnects_and_resumes_by_itself(make_tree) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    t = make_tree()
    other = Client(t.port, "o45", json_mode=True)
    other.send("/join rust")
    other.expect_json(type="joined")
    chat = subprocess.Popen(
        [sys.executable, "-m", "theychat.client", "127.0.0.1", str(t.port),
         "--reconnect-for", "20"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert chat.stdin and chat.stdout
    try:
        chat.stdin.write(b"/nick c45\n/join rust\nhello before\n")
        chat.stdin.flush()
        other.expect_json(type="message", text="hello before")
        other.send("seen live")
        other.expect_json(type="sent")  # durable, and fanned out to c45
        # both holders of the client's socket die: the connection really ends
        os.kill(t.pid("server-monitor@rust"), signal.SIGKILL)
        os.kill(t.pid("server@rust"), signal.SIGKILL)
        t.wait_healthy()
        other2 = Client(t.port, "p45")
        other2.join("rust")
        other2.send("said while c45 was away")
        chat.stdin.write(b"typed after the crash\n")
        chat.stdin.flush()
        assert other2.expect(r"\] c45: typed") == "[rust] c45: typed after the crash"
        chat.stdin.write(b"/who\n")
        chat.stdin.close()
        assert chat.wait(timeout=WAIT_S) == 0
        out = chat.stdout.read().decode().splitlines()
        assert "[rust] o45: seen live" in out
        assert "[rust] p45: said while c45 was away" in out  # missed, then replayed
        assert out.count("[rust] o45: seen live") == 1  # and nothing shown twice
        assert any(line.startswith("* in rust: c45") for line in out)
        assert out[-1] == "* bye"
        assert "resumed session" in chat.stderr.read().decode()  # type: ignore[union-attr]
    finally:
        if chat.poll() is None:
            chat.kill()
