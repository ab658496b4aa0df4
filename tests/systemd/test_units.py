"""The unit files and the systemd backend's pure parts, without booting systemd."""

from __future__ import annotations

import io
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from theychat.daemons import systemd
from theychat.daemons.config import from_mapping
from theychat.daemons.errors import ConfigError

UNITS = Path(__file__).resolve().parents[2] / "units"
MAX_EXPOSURE = 2.0


def exposure(unit: Path) -> float:
    """`systemd-analyze security --offline=true --threshold=20`: must pass, and say <= 2.0."""
    res = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=20", "--no-pager",
         str(unit)], capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", res.stdout)
    assert found, res.stdout + res.stderr
    assert res.returncode == 0, f"{unit.name}: over the threshold\n{res.stdout}"
    return float(found[1])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("unit", sorted(p.name for p in UNITS.glob("*.service")))
def test_every_service_is_hardened(unit: str) -> None:
    assert exposure(UNITS / unit) <= MAX_EXPOSURE


def test_the_units_are_the_ones_the_installer_knows() -> None:
    assert sorted(p.name for p in UNITS.iterdir()) == sorted(systemd.UNIT_FILES)
    for name in systemd.UNIT_FILES:
        text = (UNITS / name).read_text()
        if name.endswith(".service"):
            assert "Type=notify" in text and "WatchdogSec=" in text
            assert f"ExecStart={systemd.DEFAULT_PYTHON} -m theychat.daemons." in text
            assert "PYTHONPATH" not in text
            assert "--config /etc/theychat/theychat.yaml" in text
            assert "PartOf=theychat.target" in text
            assert "StateDirectory=theychat" in text and "PYTHONUNBUFFERED=1" in text
        if "@" in name:
            assert "--topic %i" in text


def test_render_writes_our_python_and_shows_home_paths_read_only() -> None:
    text = (UNITS / "theychat-server@.service").read_text()
    inst = systemd.Installation("/root/venv/bin/python", ["/root/src/theychat", "/root/venv"])
    out = systemd.render(text, inst)
    assert "ExecStart=/root/venv/bin/python -m theychat.daemons.server --config" in out
    assert "PYTHONPATH" not in out  # the interpreter finds the package it has installed
    assert "ProtectHome=tmpfs\nBindReadOnlyPaths=/root/src/theychat /root/venv\n" in out
    assert "ProtectHome=yes" not in out and "/usr/bin/python3" not in out
    plain = systemd.render(text, systemd.Installation("/usr/bin/python3", []))
    assert plain == text
    in_tmp = systemd.render(text, systemd.Installation("/usr/bin/python3", ["/tmp/ci/src"]))
    assert "ProtectHome=yes\nBindReadOnlyPaths=/tmp/ci/src\n" in in_tmp


def test_the_installed_config_is_for_systemd() -> None:
    data = systemd.installed_config({"topics": ["rust"], "supervision": {"max_restarts": 9}})
    assert data["state_dir"] == "/var/lib/theychat"
    assert data["supervision"] == {"max_restarts": 9, "backend": "systemd"}
    cfg = from_mapping(data)
    assert cfg.supervision.backend == "systemd"
    with pytest.raises(ConfigError, match="state_dir"):
        systemd.installed_config({"state_dir": "/srv/chat"})
    with pytest.raises(ConfigError, match=r"heartbeat\.interval_ms"):
        systemd.installed_config({"heartbeat": {"interval_ms": "fast"}})


def test_unit_names() -> None:
    assert systemd.unit_name("router") == "theychat-router.service"
    assert systemd.unit_name("server-monitor@rust") == "theychat-server-monitor@rust.service"


def test_a_clean_exit_is_a_stop_anything_else_a_failure() -> None:
    def props(pid: int, code: str, status: str) -> dict[str, str]:
        return systemd.parse_show(f"ExecMainPID={pid}\nExecMainCode={code}\n"
                                  f"ExecMainStatus={status}\n")

    assert systemd.exit_outcome(props(42, "1", "0"), 42) is True  # exited 0: stopped
    assert systemd.exit_outcome(props(42, "1", "1"), 42) is False  # exited 1: crashed
    assert systemd.exit_outcome(props(42, "2", "9"), 42) is False  # SIGKILL
    assert systemd.exit_outcome(props(42, "0", "0"), 42) is None  # not reaped yet
    # systemd runs another main process already: `systemctl restart`, not a crash
    assert systemd.exit_outcome(props(43, "0", "0"), 42, alive=lambda pid: True) is True
    assert systemd.exit_outcome(props(43, "1", "0"), 42, alive=lambda pid: False) is False
    # stopped, then unloaded by systemd (which forgets an inactive unit's exit status)
    assert systemd.exit_outcome({**props(0, "0", "0"), "ActiveState": "inactive"}, 42) is True
    assert systemd.exit_outcome({**props(0, "0", "0"), "ActiveState": "failed"}, 42) is False


def test_on_its_way() -> None:
    assert systemd.on_its_way({"ActiveState": "activating", "SubState": "start"})
    assert not systemd.on_its_way({"ActiveState": "activating", "SubState": "auto-restart"})
    assert not systemd.on_its_way({"ActiveState": "failed", "SubState": "failed"})
    assert not systemd.on_its_way({"ActiveState": "active", "MainPID": "0"})


def test_status_lines() -> None:
    line = systemd.describe("server", "rust", 3, 0.0, {"members": 2, "next_seq": 42})
    assert line == ("rust: 2 members, 41 messages (next seq 42); "
                    "restarted 2 times, last at 1970-01-01 00:00:00 UTC")
    kids = [{"name": "router-monitor", "state": "running", "pid": 7, "restarts": 1},
            {"name": "server-monitor@rust", "state": "gave_up", "pid": None, "restarts": 5}]
    line = systemd.describe("router", None, 1, 0.0,
                            {"lobby": 3, "topics": ["rust"], "children": kids})
    assert line.startswith("3 in the lobby, 1 topics; 1/2 children running, 6 restarts "
                           "(server-monitor@rust gave_up); up since")
    line = systemd.describe("server-monitor", "rust", 1, 0.0,
                            {"children": kids[:1], "fds_held": 4})
    assert line.startswith("watching router-monitor running (pid 7), 1 restarts; "
                           "holding 4 sockets")


def test_the_notifier_is_silent_without_systemd() -> None:
    n = systemd.Notifier(env={})
    assert not n.enabled and n.watchdog_s is None
    n.ready("x")
    n.tick()
    n.status("y")
    n.at_least(10)
    n.close()


def test_install_writes_config_and_units(tmp_path: Path) -> None:
    src = tmp_path / "mine.yaml"
    src.write_text("topics: [rust]\nlisten: {port: 7100}\n")
    conf, units = tmp_path / "etc" / "theychat.yaml", tmp_path / "system"
    units.mkdir()
    out = io.StringIO()
    systemd.install(src, units, conf, reload=False, out=out)
    assert "systemctl enable --now theychat.target" in out.getvalue()
    installed = yaml.safe_load(conf.read_text())
    assert installed == {"topics": ["rust"], "listen": {"port": 7100},
                         "state_dir": "/var/lib/theychat", "supervision": {"backend": "systemd"}}
    assert oct(conf.stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in units.iterdir()) == sorted(systemd.UNIT_FILES)
    router = (units / "theychat-router.service").read_text()
    assert f"ExecStart={sys.executable} -m theychat.daemons.router" in router
    # a second run with the installed config changes nothing
    out = io.StringIO()
    systemd.install(None, units, conf, reload=False, out=out)
    assert "changed: nothing" in out.getvalue()


def test_up_and_down_refuse_a_systemd_config(tmp_path: Path) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text(f"state_dir: {tmp_path / 's'}\nsupervision: {{backend: systemd}}\n")
    for command in ("up", "down"):
        res = subprocess.run([sys.executable, "-m", "theychat.daemons", command, "--config",
                              str(conf)], capture_output=True, text=True, timeout=30)
        assert res.returncode == 1
        assert "systemctl" in res.stderr and "theychat.target" in res.stderr


def test_the_notifier_speaks_sd_notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as pid1:
        pid1.bind(str(path))
        pid1.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "400000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        n = systemd.Notifier()
        assert n.enabled and n.watchdog_s == 0.4
        n.ready("rust: 0 members")
        assert pid1.recv(4096) == b"READY=1\nSTATUS=rust: 0 members"
        n.tick()
        n.tick()  # throttled: a quarter of the watchdog interval between pings
        n.status("rust: 0 members")  # unchanged: not sent
        n.status("rust: 1 members")
        n.at_least(2.0)  # a heartbeat timeout of 500 ms wants at least 2 s
        got = [pid1.recv(4096) for _ in range(3)]
        assert got == [b"WATCHDOG=1", b"STATUS=rust: 1 members", b"WATCHDOG_USEC=2000000"]
        n.stopping()
        assert pid1.recv(4096) == b"STOPPING=1"
