"""What chat users expect: history on join, topics made on demand, operators, kick and
ban, /me and /nick, all surviving `kill -9` of the daemons that hold them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.process.conftest import WAIT_S, Client


def operator_hash(password: str) -> str:
    out = subprocess.run([sys.executable, "-m", "theychat.daemons", "hash-password"],
                         input=password, capture_output=True, text=True, timeout=WAIT_S, check=True)
    return out.stdout.strip()


def test_history_on_join_then_live_without_loss_or_repeat(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree({"history": {"on_join": 5}})
    talker = Client(t.port, "talk50", json_mode=True)
    talker.send("/join rust")
    talker.expect_json(type="joined")
    for i in range(8):
        talker.send(f"before {i}")
    for _ in range(8):
        talker.expect_json(type="sent")
    reader = Client(t.port, "read50")
    reader.join("rust")
    assert reader.expect(r"\* history of rust") == "* history of rust: 5 message(s)"
    assert [reader.expect(r"\[rust #") for _ in range(5)] == [
        f"[rust #{i + 1}] talk50: before {i}" for i in range(3, 8)]
    # a joiner in JSON mode while messages keep coming: history then live, seamless
    for i in range(30):
        talker.send(f"during {i}")
    bot = Client(t.port, "bot50", json_mode=True)
    bot.send("/join rust")
    bot.expect_json(type="joined")
    hist = bot.expect_json(type="history")
    assert hist["on_join"] is True and all("seq" in m for m in hist["messages"])
    seqs = [m["seq"] for m in hist["messages"]]
    deadline = time.monotonic() + WAIT_S
    while (not seqs or seqs[-1] < 38) and time.monotonic() < deadline:
        seqs.append(bot.expect_json(type="message")["seq"])
    assert seqs == list(range(seqs[0], 39))  # contiguous: no gap, no repeat
    assert reader.quiet(0.3)  # (the text reader got them live too)


def test_history_on_join_can_be_turned_off(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree({"history": {"on_join": 0}})
    a = Client(t.port, "a51")
    a.join("rust")
    a.send("hello")
    a.send("/history 1")
    a.expect("a51: hello")
    b = Client(t.port, "b51")
    b.join("rust")
    b.send("/who")
    assert b.expect(r"^\* ") == "* in rust: a51, b51"  # no history came first


def test_create_topic_makes_a_supervised_topic_that_survives_kills(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree({"topics": {"names": ["rust"], "max": 3}})
    alice = Client(t.port, "alice52")
    alice.send("/create go")
    assert alice.expect(r"created") == "* topic go created; you are its operator"
    alice.expect("you are in go with alice52")
    alice.send("first words in go")
    bob = Client(t.port, "bob52")
    bob.send("/topics")
    assert bob.expect(r"\* topics") == "* topics (members): rust (0), go (1)"
    bob.send("/who go")
    assert bob.expect(r"\* in go") == "* in go: alice52"
    bob.send("/create Go")
    assert bob.expect(r"^! ") == "! topic go already exists"
    bob.send("/create zig")
    bob.expect("you are in zig")
    bob.send("/create ruby")
    assert bob.expect(r"^! ") == "! there are already 3 topics, the most allowed"
    rows = t.wait_healthy()
    assert {r["name"] for r in rows} >= {"server@go", "server-monitor@go", "server@zig"}
    # the topic, its history and its operator survive kill -9 of its server and the router
    os.kill(t.pid("server@go"), signal.SIGKILL)
    os.kill(t.pid("router"), signal.SIGKILL)
    t.wait_healthy()
    carol = Client(t.port, "carol52")
    carol.join("go")
    carol.expect("alice52: first words in go")  # history on join
    alice.send("/kick carol52 testing")  # alice is still go's operator
    assert carol.expect("kicked") == "* you were kicked from go by alice52: testing"
    assert t.cli("down").returncode == 0 and t.cli("up").returncode == 0
    t.wait_healthy()
    dave = Client(t.port, "dave52")
    dave.send("/topics")
    assert dave.expect(r"\* topics") == "* topics (members): rust (0), go (0), zig (0)"


def test_create_can_be_turned_off(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree({"topics": {"allow_create": False}})
    a = Client(t.port, "a53")
    a.send("/create mine")
    assert a.expect(r"^! ") == "! creating topics is turned off here"


def test_operators_kick_and_ban_and_others_cannot(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree({"operators": [{"name": "root", "password_hash": operator_hash("s3cret")}]})
    op, bob, carol = Client(t.port, "op54"), Client(t.port, "bob54"), Client(t.port, "carol54")
    for c in (op, bob, carol):
        c.join("rust")
    op.expect("carol54 joined")
    bob.send("/kick carol54")
    assert bob.expect(r"^! ") == "! only operators of rust can kick"
    op.send("/oper root wrong")
    assert op.expect(r"^! ") == "! wrong operator name or password"
    op.send("/oper nobody s3cret")
    assert op.expect(r"^! ") == "! wrong operator name or password"
    op.send("/oper root s3cret")
    assert op.expect("operator") == "* you are now a server operator"
    op.send("/kick carol54 be nice")
    assert carol.expect("kicked") == "* you were kicked from rust by op54: be nice"
    carol.send("/who")
    assert carol.expect(r"\* in the lobby") == "* in the lobby: carol54"
    assert bob.expect("kicked") == "* carol54 was kicked from rust by op54: be nice"
    carol.join("rust")  # a kick is not a ban
    op.send("/ban carol54")
    assert carol.expect("kicked") == "* you were kicked from rust by op54: banned"
    carol.send("/join rust")
    assert carol.expect(r"^! ") == "! you are banned from rust"
    # the ban and the operator survive kill -9 of the server
    os.kill(t.pid("server@rust"), signal.SIGKILL)
    t.wait_healthy()
    carol.send("/join rust")
    assert carol.expect(r"^! ") == "! you are banned from rust"
    op.send("/kick bob54")
    assert bob.expect("you were kicked") == "* you were kicked from rust by op54"
    ev = t.wait_event("server@rust", "client_banned", nick="carol54")
    assert ev["by"] == "op54"


def test_drop_topic_tells_members_and_forgets_it(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    owner, guest = Client(t.port, "own55"), Client(t.port, "gst55")
    owner.send("/create tmp")
    owner.expect("you are in tmp")
    guest.join("tmp")
    guest.send("/drop tmp")
    assert guest.expect(r"^! ") == "! only operators of tmp can drop it"
    owner.send("/drop tmp")
    assert guest.expect("dropped") == "* topic tmp was dropped by own55; you are in the lobby"
    guest.send("/topics")
    assert guest.expect(r"\* topics") == "* topics (members): rust (0), python (0)"
    deadline = time.monotonic() + WAIT_S
    while any(r["topic"] == "tmp" for r in t.status()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(r["topic"] == "tmp" for r in t.status())
    assert t.cli("status").returncode == 0
    assert not (t.state / "wal" / "server@tmp.wal").exists()


def test_nick_and_me_are_shown_to_the_topic(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    a, b = Client(t.port, "a56"), Client(t.port, "b56")
    a.join("python")
    b.join("python")
    a.send("/nick a56new")
    assert b.expect("known as") == "* a56 is now known as a56new"
    a.send("/me waves")
    assert b.expect(r"\* a56new") == "[python] * a56new waves"
    a.send("/history 1")
    assert a.expect(r"#\d+\]") .endswith("* a56new waves")
