"""TheyChat under a real systemd as PID 1 of private namespaces (tests/systemd/lab).

The tests of this module share one lab and run in order: `theychat install-systemd`,
`systemctl enable --now theychat.target`, people chatting through `nc`, every daemon
killed with SIGKILL and stopped with SIGSTOP (the right supervisor restarts it through
systemctl, the tree is healthy again, and people in a topic keep chatting through the
restart of their server), the journal, a deliberate restart, and a clean shutdown that
leaves no process and no cgroup behind. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

LAB = Path(__file__).resolve().parent / "lab" / "lab.sh"
SYSTEMD_BINARY = next((p for p in ("/usr/lib/systemd/systemd", "/lib/systemd/systemd")
                       if os.access(p, os.X_OK)), None)
PORT = 7000  # the lab has a network namespace of its own
WAIT_S = 15.0
TOPICS = ["rust", "python", "go"]  # go ends in a crash loop, near the end
TREE = ["router", "router-monitor"] + [f"{r}@{t}" for t in TOPICS
                                       for r in ("server-monitor", "server")]
SUPERVISOR = {"server@rust": "server-monitor@rust", "server-monitor@rust": "router",
              "router": "router-monitor", "router-monitor": "router"}


def unit(name: str) -> str:
    return f"theychat-{name}.service"


def lab_root() -> Path | None:
    """Where the lab's overlay upper layers can go: not on an overlayfs (as / often is in
    a container), which the kernel refuses as an upper layer."""
    for candidate in ("/tmp", "/run", "/dev/shm"):
        res = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", candidate],
                             capture_output=True, text=True, timeout=30)
        if res.returncode == 0 and res.stdout.strip() != "overlay" and os.access(
                candidate, os.W_OK):
            return Path(candidate)
    return None


def why_no_lab() -> str | None:
    """Why namespaces for a private systemd cannot be made here (None: they can)."""
    if sys.platform != "linux":
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (namespaces, mounts, cgroups)"
    for tool in ("unshare", "nsenter", "findmnt"):
        if shutil.which(tool) is None:
            return f"no {tool} (util-linux)"
    if SYSTEMD_BINARY is None:
        return "no systemd binary (/usr/lib/systemd/systemd)"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--cgroup", "--net",
         "--mount-proc", "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot create namespaces: {probe.stderr.strip()}"
    mounts = subprocess.run(["findmnt", "-n", "-t", "cgroup2", "-o", "TARGET"],
                            capture_output=True, text=True, timeout=30).stdout.split()
    if not mounts:
        return "no cgroup2 mounted (the lab needs a cgroup subtree of its own)"
    own = Path("/proc/self/cgroup").read_text()
    path = next((ln[3:] for ln in own.splitlines() if ln.startswith("0::")), "/")
    trial = Path(mounts[0] + path.rstrip("/")) / f"theychat-probe-{os.getpid()}"
    try:
        trial.mkdir()
        trial.rmdir()
    except OSError as e:
        return f"cannot create a cgroup under {trial.parent}: {e.strerror}"
    if lab_root() is None:
        return "no /tmp, /run or /dev/shm outside overlayfs for the lab's overlay layers"
    return None


class Lab:
    """tests/systemd/lab/lab.sh for one instance, from Python."""

    def __init__(self, root: Path) -> None:
        self.name = f"tc{os.getpid()}"
        self.state = root / self.name
        self.env = {**os.environ, "LAB_NAME": self.name, "LAB_STATE_ROOT": str(root),
                    "LAB_PYTHON": sys.executable, "LAB_SYSTEMD": str(SYSTEMD_BINARY)}
        if os.environ.get("THEYCHAT_KEEP"):  # keep the lab's state to debug a failure
            self.env["LAB_KEEP_STATE"] = "1"
        self.running = False

    def sh(self, *args: str, timeout: float = 60, check: bool = True
           ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([str(LAB), *args], env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"lab.sh {' '.join(args)}: exit {res.returncode}\n"
                                 f"{res.stdout}\n{res.stderr}")
        return res

    def start(self) -> None:
        self.running = True
        self.sh("start")

    def stop(self) -> subprocess.CompletedProcess[str]:
        self.running = False
        return self.sh("stop", timeout=120, check=False)

    def sc(self, *args: str, check: bool = True) -> str:
        return self.sh("sc", *args, check=check).stdout

    def prop(self, unit_name: str, name: str) -> str:
        return self.sc("show", "-p", name, "--value", unit_name).strip()

    def wait_prop(self, unit_name: str, name: str, pattern: str, timeout: float = WAIT_S
                  ) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, value := self.prop(unit_name, name)):
            assert time.monotonic() < deadline, f"{unit_name} {name}={value!r}, not {pattern!r}"
            time.sleep(0.1)
        return value

    def theychat(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The CLI inside the lab, as an administrator runs it: the interpreter that has
        `theychat` installed (the lab sees our filesystem), nothing on PYTHONPATH."""
        return self.sh("exec", sys.executable, "-m", "theychat.daemons", *args, check=check)

    @property
    def netns(self) -> str:
        return f"/proc/{self.sh('pid').stdout.strip()}/ns/net"

    @property
    def var_lib(self) -> Path:
        """/var/lib/theychat inside, seen from here (the upper layer of the /var overlay)."""
        return self.state / "var.upper" / "lib" / "theychat"

    def events(self, name: str) -> list[dict[str, Any]]:
        path = self.var_lib / "logs" / f"{name}.log"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def wait_event(self, name: str, event: str, after: str = "", timeout: float = WAIT_S,
                   **fields: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events(name):
                if ev.get("event") == event and ev.get("ts", "") > after and all(
                        ev.get(k) == v for k, v in fields.items()):
                    return ev
            time.sleep(0.05)
        raise AssertionError(f"no {event} {fields} after {after} in {name}'s log in {timeout}s")

    def wait_healthy(self, timeout: float = WAIT_S) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            res = self.theychat("status", "--config", "/etc/theychat/theychat.yaml", "--json",
                                check=False)
            with contextlib.suppress(ValueError):
                rows = json.loads(res.stdout)
            if res.returncode == 0 and rows and all(r["state"] == "ready" for r in rows):
                return rows
            time.sleep(0.2)
        raise AssertionError(f"tree not healthy in {timeout}s: {rows}")


class Nc:
    """A person with `nc`, inside the lab's network namespace; every read is bounded."""

    def __init__(self, netns: str, nick: str) -> None:
        self.proc = subprocess.Popen(
            ["nsenter", f"--net={netns}", "--", "nc", "127.0.0.1", str(PORT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.out, self.inp = self.proc.stdout.fileno(), self.proc.stdin
        os.set_blocking(self.out, False)
        self.buf = b""
        self.lines: list[str] = []
        self.expect(r"welcome to TheyChat")
        self.send(f"/nick {nick}")
        self.expect(rf"you are now {nick}")

    def send(self, line: str) -> None:
        self.inp.write(line.encode() + b"\n")
        self.inp.flush()

    def expect(self, pattern: str, timeout: float = WAIT_S) -> str:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        seen: list[str] = []
        while True:
            while b"\n" in self.buf:
                raw, _, self.buf = self.buf.partition(b"\n")
                line = raw.decode(errors="replace")
                self.lines.append(line)
                seen.append(line)
                if rx.search(line):
                    return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern!r} in {timeout}s: {seen}")
            ready, _, _ = select.select([self.out], [], [], remaining)
            if ready:
                data = os.read(self.out, 65536)
                if not data:
                    raise AssertionError(f"connection closed waiting for {pattern!r}: {seen}")
                self.buf += data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def now() -> str:
    """The time as log lines stamp it (the lab shares our clock)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    reason = why_no_lab()
    if reason:
        pytest.skip(f"no private systemd here: {reason}")
    root = Path(tempfile.mkdtemp(prefix="tc-lab-", dir=lab_root()))
    lab = Lab(root)
    try:
        lab.start()
        yield lab
    finally:
        if lab.running:
            lab.stop()
        if not os.environ.get("THEYCHAT_KEEP"):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def people() -> Iterator[dict[str, Nc]]:
    """ann and ben chat in rust all along; lou stays in the lobby. The tests that use them
    name this fixture first, so that without `nc` they skip before a lab is booted."""
    if shutil.which("nc") is None:
        pytest.skip("no nc (netcat-openbsd): the people of these tests chat through it")
    found: dict[str, Nc] = {}
    yield found
    for p in found.values():
        p.close()


def test_install_and_enable_bring_the_whole_tree_up(lab: Lab) -> None:
    with tempfile.NamedTemporaryFile("w", prefix="theychat-", suffix=".yaml",
                                     dir="/tmp") as cfg:  # /tmp: seen inside the lab too
        cfg.write(yaml.safe_dump({
            "topics": TOPICS, "listen": {"port": PORT},
            "clients": {"rate_per_second": 1000, "rate_burst": 1000}}))
        cfg.flush()
        res = lab.theychat("install-systemd", "--config", cfg.name)
    assert "systemctl enable --now theychat.target" in res.stdout
    installed = yaml.safe_load(lab.sh("exec", "cat", "/etc/theychat/theychat.yaml").stdout)
    assert installed["supervision"]["backend"] == "systemd"
    assert installed["state_dir"] == "/var/lib/theychat"
    t0 = time.monotonic()
    lab.sc("enable", "--now", "theychat.target")
    rows = lab.wait_healthy()
    assert sorted(r["name"] for r in rows) == sorted(TREE)
    for name in TREE:
        assert lab.prop(unit(name), "ActiveState") == "active", name
        # systemd's idea of the main process is the daemon's own
        assert int(lab.prop(unit(name), "MainPID")) == next(
            r["pid"] for r in rows if r["name"] == name)
    assert time.monotonic() - t0 < WAIT_S
    # the router started every server-monitor through systemctl, and each its server
    ev = lab.wait_event("router", "unit_restart_requested",
                        unit="theychat-server-monitor@rust.service")
    assert ev["unit_state"] == "inactive/dead"
    lab.wait_event("server-monitor@rust", "child_started", child="server@rust")


def test_installed_units_are_hardened(lab: Lab) -> None:
    for name in ("theychat-router.service", "theychat-router-monitor.service",
                 "theychat-server-monitor@.service", "theychat-server@.service"):
        res = lab.sh("exec", "systemd-analyze", "security", "--offline=true", "--threshold=20",
                     "--no-pager", f"/etc/systemd/system/{name}", check=False)
        level = re.search(r"Overall exposure level for \S+: (\d+\.\d)", res.stdout)
        assert res.returncode == 0 and level and float(level[1]) <= 2.0, res.stdout


def test_status_line_and_watchdog(lab: Lab) -> None:
    lab.wait_prop(unit("server@rust"), "StatusText",
                  r"^rust: 0 members, 0 messages \(next seq 1\); up since .*, never restarted$")
    lab.wait_prop(unit("server-monitor@rust"), "StatusText",
                  r"^watching server@rust running \(pid \d+\), 0 restarts; holding 0 sockets")
    lab.wait_prop(unit("router"), "StatusText", r"^0 in the lobby, 3 topics; 4/4 children")
    status = lab.sc("status", unit("server@rust"), check=False)
    assert re.search(r'Status: "rust: 0 members', status)  # what an administrator sees
    assert lab.prop(unit("router"), "WatchdogUSec") == "5s"
    first = lab.prop(unit("server@rust"), "WatchdogTimestampMonotonic")
    deadline = time.monotonic() + 5
    while lab.prop(unit("server@rust"), "WatchdogTimestampMonotonic") == first:
        assert time.monotonic() < deadline, "no WATCHDOG=1 in 5 s"
        time.sleep(0.2)


def test_people_chat_through_nc(people: dict[str, Nc], lab: Lab) -> None:
    netns = lab.netns
    for nick in ("ann", "ben", "lou"):
        people[nick] = Nc(netns, nick)
    ann, ben = people["ann"], people["ben"]
    ann.send("/join rust")
    ann.expect("you are in rust")
    ben.send("/join rust")
    ben.expect("you are in rust")
    ann.expect("ben joined rust")
    ann.send("hello ben")
    assert ben.expect("ann:") == "[rust] ann: hello ben"
    ben.send("hi ann")
    assert ann.expect("ben:") == "[rust] ben: hi ann"
    lab.wait_prop(unit("server@rust"), "StatusText", r"^rust: 2 members, 2 messages")


@pytest.mark.parametrize("sig", ["KILL", "STOP"])
@pytest.mark.parametrize("victim", list(SUPERVISOR))
def test_a_dead_or_hung_daemon_is_restarted_through_systemd(
        people: dict[str, Nc], lab: Lab, victim: str, sig: str) -> None:
    assert people, "test_people_chat_through_nc did not run"
    ann, ben, lou = people["ann"], people["ben"], people["lou"]
    supervisor = SUPERVISOR[victim]
    old = int(lab.prop(unit(victim), "MainPID"))
    assert old > 0
    t0 = now()
    lab.sh("exec", "kill", f"-{sig}", str(old))
    dead = lab.wait_event(supervisor, "peer_declared_dead", after=t0, child=victim)
    assert dead["cause"] == ("exit" if sig == "KILL" else "timeout")
    if sig == "STOP":
        lab.wait_event(supervisor, "child_killed", after=t0, child=victim)
    lab.wait_event(supervisor, "unit_restart_requested", after=t0, unit=unit(victim))
    done = lab.wait_event(supervisor, "restarted", after=t0, child=victim)
    assert done["recovery_ms"] < 5000
    new = int(lab.prop(unit(victim), "MainPID"))
    assert new not in (0, old) and done["child_pid"] == new
    lab.wait_healthy()
    # the stopped process was killed, not left behind (systemd reaped it)
    assert lab.sh("exec", "kill", "-0", str(old), check=False).returncode != 0
    # people in rust went on talking, and the one in the lobby is still there
    ann.send(f"after {sig} of {victim}")
    assert ben.expect("ann:") == f"[rust] ann: after {sig} of {victim}"
    lou.send("/who")
    assert lou.expect(r"\* in the lobby") == "* in the lobby: lou"
    assert not [ln for ln in ann.lines + ben.lines if " left " in ln]


def test_the_journal_has_the_json_lines_of_the_log_files(lab: Lab) -> None:
    in_file = (lab.var_lib / "logs" / "server@rust.log").read_text().splitlines()
    deadline = time.monotonic() + WAIT_S
    while True:  # journald takes the stream a moment after the file has the line
        journal = lab.sh("jc", "-u", unit("server@rust"), "-o", "cat").stdout.splitlines()
        lines = [ln for ln in journal if ln.startswith("{")]
        if lines == in_file or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert lines == in_file
    events = [json.loads(ln) for ln in lines]
    assert [e["incarnation"] for e in events if e["event"] == "daemon_ready"] == [1, 2, 3]
    # levels reach the journal as priorities
    warnings = lab.sh("jc", "-u", unit("server-monitor@rust"), "-p", "warning", "-o", "cat")
    assert '"event": "peer_declared_dead"' in warnings.stdout
    assert '"event": "daemon_ready"' not in warnings.stdout
    shown = lab.sh("jc", "-u", unit("server@rust"), "-n", "3").stdout
    assert re.search(r"theychat-server@rust\[\d+\]: \{", shown), shown


def test_a_deliberate_stop_or_restart_is_not_a_failure(lab: Lab) -> None:
    """An exit with status 0 is a request: the supervisor does not restart the child,
    and watches it again when it is back."""
    t0 = now()
    lab.sc("stop", unit("server@python"))
    lab.wait_event("server-monitor@python", "child_stopped", after=t0, child="server@python")
    time.sleep(1.0)  # a supervisor fighting the stop would have restarted it by now
    assert lab.prop(unit("server@python"), "ActiveState") == "inactive"
    lab.sc("start", unit("server@python"))
    back = lab.wait_event("server-monitor@python", "child_adopted", after=t0,
                          child="server@python")
    assert back["child_pid"] == int(lab.prop(unit("server@python"), "MainPID"))
    t1 = now()
    old = back["child_pid"]
    lab.sc("restart", unit("server@python"))
    lab.wait_event("server-monitor@python", "child_stopped", after=t1, child="server@python")
    back = lab.wait_event("server-monitor@python", "child_adopted", after=t1,
                          child="server@python")
    assert back["child_pid"] == int(lab.prop(unit("server@python"), "MainPID")) != old
    lab.wait_healthy()
    assert not [e for e in lab.events("server-monitor@python")
                if e["ts"] > t0 and e["event"] in ("peer_declared_dead", "restarting",
                                                   "unit_restart_requested")]


def test_both_roots_dead_at_once_are_restarted_by_systemd(
        people: dict[str, Nc], lab: Lab) -> None:
    """No supervisor is left to see it: systemd's Restart=on-failure (RestartSec=2s)."""
    roots = ["router", "router-monitor"]
    before = {n: (int(lab.prop(unit(n), "MainPID")), int(lab.prop(unit(n), "NRestarts")))
              for n in roots}
    t0 = time.monotonic()
    lab.sh("exec", "kill", "-KILL", *(str(pid) for pid, _ in before.values()))
    for name in roots:
        lab.wait_prop(unit(name), "NRestarts", rf"^{before[name][1] + 1}$")
    lab.wait_healthy()
    took = time.monotonic() - t0
    assert 1.8 < took < 10, took  # RestartSec=2s: later than any supervisor of ours
    for name in roots:
        assert int(lab.prop(unit(name), "MainPID")) != before[name][0]
    # the people in a topic never noticed; the lobby's sockets died with both holders
    ann, ben = people["ann"], people["ben"]
    ann.send("both roots died")
    assert ben.expect("ann:") == "[rust] ann: both roots died"
    people.pop("lou").close()
    people["lou2"] = Nc(lab.netns, "lou2")


def test_a_crash_loop_ends_in_our_gave_up_not_in_systemds_start_limit(
        people: dict[str, Nc], lab: Lab) -> None:
    """systemd's default (5 starts in 10 s) would refuse the 6th start half a second
    into the loop; StartLimitIntervalSec=0 leaves the decision to our policy."""
    t0 = now()
    # Break server@go's start for good: a directory where its control socket goes.
    lab.sh("exec", "sh", "-c", "cd /var/lib/theychat/run && rm -f server@go.ctl && "
           "mkdir server@go.ctl")
    lab.sh("exec", "kill", "-KILL", lab.prop(unit("server@go"), "MainPID"))
    gave_up = lab.wait_event("server-monitor@go", "gave_up", after=t0, child="server@go",
                             timeout=30)
    assert gave_up["restarts_in_window"] == 5
    requests = [e for e in lab.events("server-monitor@go")
                if e["ts"] > t0 and e["event"] == "unit_restart_requested"]
    assert len(requests) == 5
    assert not [e for e in lab.events("server-monitor@go")
                if e["ts"] > t0 and e["event"] == "systemctl_failed"]
    assert lab.prop(unit("server@go"), "Result") == "exit-code"  # not start-limit-hit
    lab.wait_event("router", "topic_unavailable", after=t0, unavailable="go")
    lou = people["lou2"]
    lou.send("/join go")
    assert "unavailable" in lou.expect(r"unavailable")
    # repaired, a restart of its monitor and of the router (which forgets the topic's
    # unavailability) brings the topic back; the lobby keeps its people meanwhile
    lab.sh("exec", "rmdir", "/var/lib/theychat/run/server@go.ctl")
    lab.sc("restart", unit("server-monitor@go"), unit("router"))
    lab.wait_healthy()
    lou.send("/join go")
    lou.expect(r"you are in go")


def test_stop_then_shutdown_leave_nothing_behind(people: dict[str, Nc], lab: Lab) -> None:
    t0 = now()
    lab.sc("stop", "theychat.target")
    deadline = time.monotonic() + WAIT_S
    while any(lab.prop(unit(n), "ActiveState") != "inactive" for n in TREE):
        assert time.monotonic() < deadline, lab.sc("list-units", "theychat*", "--all")
        time.sleep(0.1)
    time.sleep(0.5)  # a supervisor fighting the stop would restart something now
    for name in TREE:
        assert lab.prop(unit(name), "ActiveState") == "inactive", name
        assert not [e for e in lab.events(name) if e["ts"] > t0 and e["event"] in (
            "peer_declared_dead", "unit_restart_requested", "restarting")], name
    # people were told (the socket is closed too, but nc only notices when we type)
    people["ben"].expect(r"the server of rust is shutting down")
    people["lou2"].expect(r"the server of go is shutting down")
    res = lab.stop()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no process left; cgroup removed" in res.stderr
    assert os.environ.get("THEYCHAT_KEEP") or not lab.state.exists()
