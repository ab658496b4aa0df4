"""Nothing typed into `theychat chat` is lost or repeated while the topic's server dies
(docs/protocol.md, `/say N TEXT`): the real line client types a steady stream of lines
while its server is SIGKILLed, alone (the socket stays: the new server's `caught_up`
says what to send again) and together with its monitor (the connection goes: the
client resumes and sends again what came after the last line taken)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.lineclient import LineClientProcess
from tests.process.conftest import WAIT_S, Client

LINES = 120


def kills(tree, names: list[str], at: list[int], progress: list[int]) -> threading.Thread:  # type: ignore[no-untyped-def]
    """SIGKILL these daemons together each time the writer reaches a line in `at`."""

    def run() -> None:
        deadline = time.monotonic() + 60
        for n in at:
            while progress[0] < n and time.monotonic() < deadline:
                time.sleep(0.002)
            pids = [tree.pid(name) for name in names]
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.3)  # let it come back before the next kill

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("together", [False, True], ids=["server", "server+monitor"])
def test_every_line_typed_arrives_once_in_order_through_server_kills(
        make_tree, together: bool) -> None:  # type: ignore[no-untyped-def]
    t = make_tree({"clients": {"rate_per_second": 1000, "rate_burst": 1000}})
    ear = Client(t.port, "ear", json_mode=True)
    ear.send("/join rust")
    ear.expect_json(type="joined", topic="rust")
    writer = LineClientProcess(f"127.0.0.1:{t.port}", "writer")
    try:
        writer.join("rust")
        ear.expect_json(type="presence", nick="writer", event="joined")
        progress = [0]
        names = ["server@rust"] + (["server-monitor@rust"] if together else [])
        killer = kills(t, names, [20, 60, 100], progress)
        for i in range(1, LINES + 1):
            writer.type(f"line {i}")
            progress[0] = i
            time.sleep(0.01)
        killer.join(timeout=WAIT_S * 6)
        expected = [f"line {i}" for i in range(1, LINES + 1)]
        # Whoever joins finds every line once, in order, in the topic's history (an
        # acknowledgement may have died with a server; the next one's caught_up said
        # the line was taken).
        late = Client(t.port, "late", json_mode=True)
        for _ in range(50):  # the last kill may still be restarting the topic
            late.send("/join rust")
            answer = late.expect(r'"type":"(joined|error)"')
            if '"joined"' in answer:
                break
            time.sleep(0.1)
        deadline = time.monotonic() + 30
        while True:
            late.send(f"/history {LINES + 50}")
            history = late.expect_json(type="history", topic="rust", on_join=None)
            said = [m["text"] for m in history["messages"] if m["from"] == "writer"]
            if len(said) >= LINES or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert said == expected, writer.notes()
        seqs = [m["seq"] for m in history["messages"]]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap, no repeat
        assert "may not have been delivered" not in writer.notes()
        if not together:  # the ear's socket stayed through every restart
            assert [m["text"] for m in ear_messages(ear, "writer", LINES)] == expected
        assert writer.quit() == 0
    finally:
        writer.kill()


def ear_messages(ear: Client, by: str, count: int) -> list[dict]:  # type: ignore[type-arg]
    """Messages of `by` the ear got until its `count`th (bounded)."""
    import json

    got: list[dict] = []  # type: ignore[type-arg]
    deadline = time.monotonic() + 30
    while len(got) < count and time.monotonic() < deadline:
        line = ear._read_line(deadline)
        if line is None:
            break
        ev = json.loads(line)
        if ev.get("type") == "message" and ev.get("from") == by:
            got.append(ev)
    return got
