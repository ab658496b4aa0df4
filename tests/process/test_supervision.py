"""Detection and the supervision tree: SIGSTOP (a hang) and SIGKILL of every role,
restart intensity ending in `gave_up`, and heartbeats that cannot be forged or replayed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.process.conftest import WAIT_S, Client
from theychat.daemons.heartbeat import Beat, encode

SUPERVISOR = {"server@rust": "server-monitor@rust", "server-monitor@rust": "router",
              "router": "router-monitor", "router-monitor": "router"}


@pytest.mark.parametrize("victim", list(SUPERVISOR))
def test_a_hung_daemon_is_detected_killed_and_replaced(make_tree, victim: str) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    a, b = Client(t.port, "a30"), Client(t.port, "b30")
    a.join("rust")
    b.join("rust")
    hung = t.pid(victim)
    os.kill(hung, signal.SIGSTOP)
    try:
        ev = t.wait_event(SUPERVISOR[victim], "peer_declared_dead", child=victim)
        assert ev["cause"] == "timeout"
        assert 450 <= ev["detection_ms"] <= 1500  # heartbeat.timeout_ms is 500
        t.wait_event(SUPERVISOR[victim], "child_killed", child=victim)
        t.wait_event(SUPERVISOR[victim], "restarted", child=victim)
        rows = t.wait_healthy()
        row = next(r for r in rows if r["name"] == victim)
        assert row["pid"] != hung and row["restarts"] == 1
        # the hung process was killed, not left behind
        deadline = time.monotonic() + WAIT_S
        while os.path.exists(f"/proc/{hung}") and time.monotonic() < deadline:
            with open(f"/proc/{hung}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.05)
        # and the people in rust kept talking, across the restart
        a.send("after the hang")
        assert b.expect("a30:") == "[rust] a30: after the hang"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung, signal.SIGKILL)


@pytest.mark.parametrize("victim", list(SUPERVISOR))
def test_an_exit_is_seen_at_once(make_tree, victim: str) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    os.kill(t.pid(victim), signal.SIGKILL)
    ev = t.wait_event(SUPERVISOR[victim], "peer_declared_dead", child=victim)
    assert ev["cause"] == "exit"
    done = t.wait_event(SUPERVISOR[victim], "restarted", child=victim)
    assert done["recovery_ms"] < 5000
    t.wait_healthy()


def test_restart_intensity_ends_in_gave_up_and_the_topic_is_unavailable(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree({"supervision": {"max_restarts": 3, "window_s": 60}})
    member = Client(t.port, "stuck31")
    member.join("rust")
    # Break the server's start for good: a directory where its control socket goes.
    ctl = t.state / "run" / "server@rust.ctl"
    ctl.unlink()
    ctl.mkdir()
    os.kill(t.pid("server@rust"), signal.SIGKILL)
    ev = t.wait_event("server-monitor@rust", "gave_up", child="server@rust", timeout=30)
    assert ev["restarts_in_window"] == 3
    t.wait_event("router", "topic_unavailable", unavailable="rust")
    # the member is not left hanging: back in the lobby, told why
    assert "unavailable" in member.expect("unavailable")
    member.send("/join rust")
    assert member.expect(r"^! ") == "! topic rust is unavailable: its server keeps failing"
    member.send("/topics")
    assert "rust (0, unavailable)" in member.expect(r"\* topics")
    member.send("/join python")
    member.expect("you are in python")
    rows = t.status()
    assert next(r for r in rows if r["name"] == "server@rust")["state"] == "gave_up"
    assert t.cli("status").returncode == 1
    ctl.rmdir()


def test_forged_and_replayed_heartbeats_do_not_keep_a_hung_server_alive(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    hb = json.loads((t.state / "run" / "server-monitor@rust.hb").read_text())
    target = (hb["host"], hb["port"])
    key = (t.state / "heartbeat.key").read_bytes()
    server = t.pid("server@rust")
    inc = json.loads((t.state / "run" / "server@rust.pid").read_text())["incarnation"]
    os.kill(server, signal.SIGSTOP)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        deadline = time.monotonic() + 3
        seq = 0
        while time.monotonic() < deadline:
            now = int(time.time() * 1000)
            seq += 1
            beat = Beat("server", "rust", "server@rust", server, inc, 10**9 + seq, now)
            forged = encode(beat, b"k" * 32)  # not our key
            replayed = encode(Beat("server", "rust", "server@rust", server, inc, 1, now), key)
            stale = encode(Beat("server", "rust", "server@rust", server, inc + 1, seq,
                                now - 60_000), key)
            unsigned = json.dumps(beat.__dict__).encode()
            for datagram in (forged, replayed, stale, unsigned, b"\xff" * 2000):
                sock.sendto(datagram, target)
            time.sleep(0.02)
    finally:
        sock.close()
    ev = t.wait_event("server-monitor@rust", "peer_declared_dead", child="server@rust")
    assert ev["cause"] == "timeout"
    t.wait_event("server-monitor@rust", "heartbeat_rejected")
    rows = t.wait_healthy()
    monitor = next(r for r in rows if r["name"] == "server-monitor@rust")
    rejected = monitor["heartbeats_rejected"]
    for reason in ("bad_signature", "replayed", "stale", "unsigned", "malformed"):
        assert rejected.get(reason, 0) > 10, rejected


def test_router_and_its_monitor_dying_together_are_restarted_by_the_manager(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    a, b = Client(t.port, "a32"), Client(t.port, "b32")
    a.join("rust")
    b.join("rust")
    os.kill(t.pid("router-monitor"), signal.SIGKILL)
    os.kill(t.pid("router"), signal.SIGKILL)
    # topics never depended on the router: the conversation goes on meanwhile
    a.send("nobody at the front door")
    assert b.expect("a32:", timeout=0.5) == "[rust] a32: nobody at the front door"
    ev = t.wait_event("manager", "peer_declared_dead", child="router")
    assert ev["both_roots"] is True
    back = t.wait_event("manager", "restarted", child="router")
    assert back["recovery_ms"] > 0
    # the new router finds its monitor dead too, and says so before restarting it
    found = t.wait_event("router", "peer_declared_dead", child="router-monitor")
    assert found["cause"] == "found_dead"
    t.wait_event("router", "restarted", child="router-monitor")
    rows = t.wait_healthy()
    assert {r["name"]: r["restarts"] for r in rows}["router"] == 1
    newcomer = Client(t.port, "n32")
    newcomer.send("/topics")
    assert "rust (2)" in newcomer.expect(r"\* topics")  # learnt again from the servers
    assert "process manager pid" in t.cli("status").stdout


def test_a_server_dying_with_its_monitor_is_declared_dead_and_restarted(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    a = Client(t.port, "a33")
    a.join("rust")
    os.kill(t.pid("server@rust"), signal.SIGKILL)
    os.kill(t.pid("server-monitor@rust"), signal.SIGKILL)
    t.wait_event("router", "peer_declared_dead", child="server-monitor@rust")
    t.wait_event("router", "restarted", child="server-monitor@rust")
    found = t.wait_event("server-monitor@rust", "peer_declared_dead", child="server@rust")
    assert found["cause"] == "found_dead" and found["detection_ms"] is None
    t.wait_event("server-monitor@rust", "restarted", child="server@rust")
    t.wait_healthy()


def test_a_clean_stop_is_not_found_dead(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    os.kill(t.pid("server@rust"), signal.SIGSTOP)  # its monitor must not restart it...
    os.kill(t.pid("server-monitor@rust"), signal.SIGKILL)
    server = t.pid("server@rust")
    os.kill(server, signal.SIGTERM)  # ...before it ends cleanly, while nobody watches
    os.kill(server, signal.SIGCONT)
    t.wait_event("router", "restarted", child="server-monitor@rust")
    t.wait_event("server-monitor@rust", "child_started", child="server@rust")
    events = [e for e in t.log_events("server-monitor@rust")
              if e["event"] == "peer_declared_dead"]
    assert events == []


def test_a_warm_standby_takes_over_a_dead_server_and_a_new_one_waits(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    a, b = Client(t.port, "a34"), Client(t.port, "b34")
    a.join("rust")
    b.join("rust")
    standby = t.wait_event("server-monitor@rust", "standby_started", child="server@rust")
    os.kill(t.pid("server@rust"), signal.SIGKILL)
    dead = t.wait_event("server-monitor@rust", "peer_declared_dead", child="server@rust")
    back = t.wait_event("server-monitor@rust", "child_started", child="server@rust",
                        after=dead["ts"])
    assert back["child_pid"] == standby["standby_pid"]
    t.wait_event("server-monitor@rust", "restarted", child="server@rust")
    a.send("still here")
    assert b.expect("a34:") == "[rust] a34: still here"  # the sockets came along
    # a new standby waits behind the new server
    later = [e for e in t.log_events("server-monitor@rust") if e["event"] == "standby_started"]
    deadline = time.monotonic() + WAIT_S
    while len(later) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        later = [e for e in t.log_events("server-monitor@rust")
                 if e["event"] == "standby_started"]
    assert len(later) == 2 and later[1]["standby_pid"] != standby["standby_pid"]


def test_a_standby_leaves_with_its_monitor(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    standby = t.wait_event("server-monitor@rust", "standby_started", child="server@rust")
    os.kill(t.pid("server-monitor@rust"), signal.SIGKILL)
    deadline = time.monotonic() + WAIT_S
    while os.path.exists(f"/proc/{standby['standby_pid']}/cmdline") and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(standby["standby_pid"], os.WNOHANG)
        time.sleep(0.05)
    stat = Path(f"/proc/{standby['standby_pid']}/stat")
    assert not stat.exists() or stat.read_text().split(") ")[1][0] == "Z"
    t.wait_event("router", "restarted", child="server-monitor@rust")
    t.wait_healthy()
