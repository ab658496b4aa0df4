"""`theychat up | down | status | chat` as a user runs them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.process.conftest import (
    THEYCHAT,
    WAIT_S,
    Client,
    Tree,
    make_config,
    processes_of,
    run_cli,
    tear_down,
)


def test_up_status_down(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    rows = t.status()
    assert sorted((r["role"], r["topic"]) for r in rows) == sorted([
        ("router", None), ("router-monitor", None),
        ("server", "rust"), ("server-monitor", "rust"),
        ("server", "python"), ("server-monitor", "python"),
    ])
    assert all(r["state"] == "ready" and r["restarts"] == 0 for r in rows)
    pids = {r["pid"] for r in rows}
    assert len(pids) == 6
    # each daemon is its own session leader: no death takes another with it
    assert all(os.getsid(p) == p for p in pids)
    text = t.cli("status")
    assert text.returncode == 0 and "healthy" in text.stdout
    # a second `up` on the same state directory is refused and changes nothing
    again = t.cli("up")
    assert again.returncode != 0 and "already running" in again.stderr
    assert {r["pid"] for r in t.status()} == pids
    # modes: the state dir and what is in it are private
    assert (t.state.stat().st_mode & 0o777) == 0o700
    assert (t.state / "run" / "router.ctl").stat().st_mode & 0o077 == 0
    assert (t.state / "logs" / "router.log").stat().st_mode & 0o077 == 0
    down = t.cli("down")
    assert down.returncode == 0, down.stderr
    assert processes_of(t.state) == []
    after = t.cli("status", "--json")
    assert after.returncode == 1
    assert t.cli("down").returncode == 0  # idempotent


def test_every_daemon_logs_json_with_role_topic_pid(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    for name, role, topic in (("router", "router", None), ("server@rust", "server", "rust"),
                              ("server-monitor@python", "server-monitor", "python"),
                              ("router-monitor", "router-monitor", None)):
        events = t.log_events(name)
        names = [e["event"] for e in events]
        assert names[0] == "daemon_started" and "daemon_ready" in names
        assert all(e["role"] == role and e["topic"] == topic and e["pid"] == t.pid(name)
                   for e in events)


def test_bad_config_is_one_clear_line(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("heartbeat:\n  interval_ms: fast\n")
    res = run_cli("up", "--config", str(cfg))
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "theychat up: config error: heartbeat.interval_ms: expected an integer, got 'fast'"
    )
    cfg.write_text("listen:\n  prot: 7000\n")
    res = run_cli("status", "--config", str(cfg))
    assert res.returncode == 2 and "listen.prot: unknown key" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_cli("up", "--config", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "cannot read config" in res.stderr


def test_port_taken_fails_clearly_and_leaves_nothing() -> None:
    path, state, port = make_config()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        res = run_cli("up", "--config", str(path))
    assert res.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in res.stderr
    assert "Traceback" not in res.stderr
    assert processes_of(state) == []


def test_unwritable_state_dir_fails_clearly(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"state_dir: {blocker}/state\n")
    res = run_cli("up", "--config", str(cfg))
    assert res.returncode == 1
    assert "Not a directory" in res.stderr and "Traceback" not in res.stderr


def test_chat_client_works_in_a_pipe(make_tree) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    listener = Client(t.port, "ear8")
    listener.join("rust")
    for cmd in ([*THEYCHAT, "chat", "127.0.0.1", str(t.port)],
                [sys.executable, "-m", "theychat.client", "127.0.0.1", str(t.port)]):
        res = subprocess.run(cmd, input="/nick piper8\n/join rust\nthrough a pipe\n/quit\n",
                             capture_output=True, text=True, timeout=WAIT_S)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert lines[0].startswith("* welcome to TheyChat")
        assert "* you are now piper8" in lines and lines[-1] == "* bye"
        assert listener.expect("piper8:") == "[rust] piper8: through a pipe"
    # end of input without /quit: the client half-closes and exits when the server does
    res = subprocess.run([*THEYCHAT, "chat", "127.0.0.1", str(t.port)], input="/who\n",
                         capture_output=True, text=True, timeout=WAIT_S)
    assert res.returncode == 0 and "* in the lobby:" in res.stdout
    refused = subprocess.run([*THEYCHAT, "chat", "127.0.0.1", "1"], capture_output=True,
                             text=True, timeout=WAIT_S)
    assert refused.returncode == 1 and "cannot connect to 127.0.0.1:1" in refused.stderr


def test_up_foreground_shows_logs_and_ctrl_c_stops_all() -> None:
    path, state, port = make_config()
    proc = subprocess.Popen([*THEYCHAT, "up", "--foreground", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert "TheyChat is up" in proc.stdout.readline()
        c = Client(port, "fg9")
        c.close()
        deadline = time.monotonic() + WAIT_S
        seen = ""
        while "nick_changed" not in seen and time.monotonic() < deadline:
            seen += proc.stderr.readline()
        assert "daemon_ready" in seen and "nick_changed" in seen
        assert "{" not in seen  # human lines, not JSON
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            run_cli("down", "--config", str(path))
    assert processes_of(state) == []


@pytest.mark.parametrize("victim", ["server@rust", "server-monitor@rust", "router",
                                    "router-monitor"])
def test_a_killed_daemon_is_restarted_by_its_supervisor(make_tree, victim: str) -> None:  # type: ignore[no-untyped-def]
    t = make_tree()
    others = {n: t.pid(n) for n in ("router", "router-monitor", "server@rust",
                                    "server-monitor@rust", "server@python") if n != victim}
    os.kill(t.pid(victim), signal.SIGKILL)
    rows = t.wait_healthy()
    row = next(r for r in rows if f"{r['role']}@{r['topic']}".removesuffix("@None") == victim)
    assert row["restarts"] == 1
    # one_for_one: nobody else was touched
    assert {n: t.pid(n) for n in others} == others
    supervisor = {"server@rust": "server-monitor@rust", "server-monitor@rust": "router",
                  "router": "router-monitor", "router-monitor": "router"}[victim]
    t.wait_event(supervisor, "restarted", child=victim)
    # and the tree still chats
    a, b = Client(t.port, "a10"), Client(t.port, "b10")
    a.join("rust")
    b.join("rust")
    a.send("after the restart")
    assert b.expect("a10:") == "[rust] a10: after the restart"


def test_a_client_who_connects_during_start_up_is_greeted_once_its_socket_is_kept() -> None:
    """Someone connecting while `theychat up` runs waits in the kernel's backlog: the
    router accepts nobody before its router-monitor can keep a copy of the socket."""
    path, state, port = make_config()
    tree = Tree(path, state, port)
    up = subprocess.Popen([*THEYCHAT, "up", "--config", str(path)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert time.monotonic() < deadline, "the client port never opened"
            try:
                early = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
                break
            except OSError:
                time.sleep(0.005)
        with early:
            early.settimeout(WAIT_S)
            assert b"welcome to TheyChat" in early.recv(4096)
        assert up.wait(timeout=40) == 0, up.stderr.read() if up.stderr else ""
        router = tree.log_events("router")
        assert [e for e in router if e["event"] == "fd_store_failed"] == []
        ready = next(e["ts"] for e in tree.log_events("router-monitor")
                     if e["event"] == "daemon_ready")
        greeted = next(e["ts"] for e in router if e["event"] == "client_connected")
        assert ready < greeted
    finally:
        if up.poll() is None:
            up.kill()
        tear_down(tree)


def test_status_during_start_up_says_starting() -> None:
    """A `status` request that reaches the router before its supervisor exists."""
    import asyncio
    import shutil
    import tempfile

    from tests.unit.fakes import Log
    from theychat.daemons import control, ops
    from theychat.daemons.config import Config
    from theychat.daemons.daemon import Daemon
    from theychat.daemons.paths import StatePaths
    from theychat.daemons.router import Router
    from theychat.daemons.tree import DaemonId, Role

    root = Path(tempfile.mkdtemp(prefix="tc-", dir="/tmp"))  # short: socket paths
    paths = StatePaths(root / "s")
    paths.ensure()
    d = Daemon(DaemonId(Role.ROUTER), Config(), paths, None, Log(), 1)

    async def body() -> None:
        router = Router(d)
        ctl = control.ControlServer(paths.control("router"), router._dispatcher(), d.log)
        await ctl.start()
        try:
            reply = await control.request(paths.control("router"), ops.Status().message())
            assert reply["ok"] and reply["daemon"]["state"] == "starting"
            assert reply["children"] == []
            made = await control.request(paths.control("router"),
                                         ops.CreateTopic(topic="go", sid="ab").message())
            assert made["code"] == "starting"
        finally:
            await ctl.close()
            await router.state.close()

    try:
        asyncio.run(body())
    finally:
        shutil.rmtree(root, ignore_errors=True)
