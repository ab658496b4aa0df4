"""TheyChat under systemd: the `systemd` process-manager backend, sd_notify, the installer.

* `SystemdManager` starts and restarts children as units (`systemctl --no-block restart
  theychat-server@rust.service`), so systemd owns every process and cgroup. Detection
  (pidfds, heartbeats) and decisions (restart intensity, backoff) stay in
  `theychat.daemons.supervisor`: the backend changes how, not when.
* `Notifier` speaks sd_notify through the `sdnotify` package: READY=1, a one-line
  STATUS= for `systemctl status`, WATCHDOG=1 from the heartbeat loop. Without
  $NOTIFY_SOCKET (not started by systemd) every call is a no-op.
* `install` writes the unit files of `units/` (with this interpreter's path) and the
  config `/etc/theychat/theychat.yaml`; `theychat install-systemd` runs it.

docs/systemd.md explains the split between systemd's restart policy and ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import sdnotify
import yaml

import theychat.daemons
from theychat.daemons import config, procs
from theychat.daemons.errors import ConfigError, TheyChatError
from theychat.daemons.tree import ChildSpec

UNIT_PREFIX = "theychat-"
TARGET = "theychat.target"
UNIT_FILES = (
    TARGET,
    "theychat-router.service",
    "theychat-router-monitor.service",
    "theychat-server-monitor@.service",
    "theychat-server@.service",
)
CONFIG_PATH = Path("/etc/theychat/theychat.yaml")
UNIT_DIR = Path("/etc/systemd/system")
STATE_DIR = "/var/lib/theychat"  # StateDirectory=theychat in every unit
DEFAULT_PYTHON = "/usr/bin/python3"  # what the unit files in units/ name

SYSTEMCTL_TIMEOUT_S = 5.0
EXIT_RECORDED_WAIT_S = 2.0  # how long systemd may take to record a main process's exit
EXIT_POLL_S = 0.01
STATUS_EVERY_S = 1.0
CLD_EXITED = "1"  # ExecMainCode= of a process that exited (rather than was killed)


class SystemdError(TheyChatError):
    """systemctl failed, or the units cannot be installed."""


def unit_name(daemon_name: str) -> str:
    """`server@rust` -> `theychat-server@rust.service` (topics are valid instance names)."""
    return f"{UNIT_PREFIX}{daemon_name}.service"


# --- the process-manager backend ----------------------------------------------------------


def parse_show(text: str) -> dict[str, str]:
    """`systemctl show -p A -p B` output (KEY=VALUE lines) as a dict."""
    props = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            props[key] = value
    return props


def on_its_way(props: dict[str, str]) -> bool:
    """True if the unit runs, or is being started, with a live main process: a restart
    now would only kill a process that is fine (or about to be)."""
    active, sub = props.get("ActiveState", ""), props.get("SubState", "")
    if active == "activating" and sub != "auto-restart":
        return True
    if active in ("active", "reloading"):
        pid = int(props.get("MainPID", "0") or 0)
        return pid > 0 and procs.alive(pid)
    return False


def exit_outcome(props: dict[str, str], pid: int,
                 alive: Callable[[int], bool] = procs.alive) -> bool | None:
    """Was `pid` stopped on purpose? From the unit's ActiveState and ExecMain* properties:

    * systemd recorded its exit: True if it exited with status 0 (systemctl stop,
      SIGTERM), False for a non-zero status or a signal (a crash, a kill);
    * not yet (`ExecMainCode=0`): None, ask again;
    * systemd already runs another main process: True (only a request, `systemctl
      restart`, starts one at once; our roots' own restarts wait RestartSec=2s);
    * systemd knows no main process: the unit was stopped and then unloaded (systemd
      forgets inactive units at once, with their exit status): True, unless it failed
      (a failed unit is kept, with its status).
    """
    main = int(props.get("ExecMainPID", "0") or 0)
    if main == pid:
        code = props.get("ExecMainCode", "0")
        if code in ("0", ""):
            return None
        return code == CLD_EXITED and props.get("ExecMainStatus") == "0"
    if main == 0:
        return props.get("ActiveState") != "failed"
    return alive(main)


class SystemdManager:
    """Children are systemd units; systemd starts them and owns their processes.

    Restarts go through `systemctl --no-block restart`: no-block because a supervisor
    must never wait on systemd's job queue (it would miss its own heartbeats), and
    restart because it also cuts short a pending automatic restart (`RestartSec=` of
    the root units is our fallback, not our path). The supervisor learns the new pid
    from the child's pid file.
    """

    def __init__(self, log: Any, systemctl: str | None = None) -> None:
        self.log = log
        self.systemctl = systemctl or shutil.which("systemctl") or "systemctl"

    async def run(self, *args: str) -> str:
        try:
            proc = await asyncio.create_subprocess_exec(
                self.systemctl, *args, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as e:
            raise SystemdError(f"cannot run {self.systemctl}: {e.strerror or e}") from None
        try:
            async with asyncio.timeout(SYSTEMCTL_TIMEOUT_S):
                out, err = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise SystemdError(f"systemctl {' '.join(args)}: no answer in "
                               f"{SYSTEMCTL_TIMEOUT_S:.0f}s") from None
        if proc.returncode != 0:
            why = err.decode(errors="replace").strip() or f"exit status {proc.returncode}"
            raise SystemdError(f"systemctl {' '.join(args)}: {why}")
        return out.decode(errors="replace")

    async def show(self, unit: str, *props: str) -> dict[str, str]:
        args = ["show", unit]
        for p in props:
            args += ["-p", p]
        return parse_show(await self.run(*args))

    async def start(self, spec: ChildSpec) -> int | None:
        unit = unit_name(spec.name)
        try:
            props = await self.show(unit, "ActiveState", "SubState", "MainPID")
            if on_its_way(props):
                return None  # its pid file will name it
            await self.run("--no-block", "restart", unit)
        except SystemdError as e:
            self.log.error("systemctl_failed", unit=unit, error=str(e))
            return None  # no process shows up: the supervisor counts a failed start
        self.log.info("unit_restart_requested", unit=unit,
                      unit_state=f"{props.get('ActiveState')}/{props.get('SubState')}")
        return None

    def prepare_standby(self, spec: ChildSpec) -> int | None:
        return None  # systemd starts each unit once: no second copy waits (docs/systemd.md)

    def drop_standby(self, spec: ChildSpec) -> None:
        return None

    async def stopped_on_purpose(self, spec: ChildSpec, pid: int) -> bool:
        """Did the child exit with status 0 (systemctl stop, SIGTERM)? Asked to systemd,
        which reaps it; our pidfd usually fires a few milliseconds before it has."""
        unit = unit_name(spec.name)
        deadline = time.monotonic() + EXIT_RECORDED_WAIT_S
        while True:
            try:
                props = await self.show(unit, "ActiveState", "ExecMainPID", "ExecMainCode",
                                        "ExecMainStatus")
            except SystemdError as e:
                self.log.error("systemctl_failed", unit=unit, error=str(e))
                return False
            outcome = exit_outcome(props, pid)
            if outcome is not None:
                return outcome
            if time.monotonic() > deadline:
                return False  # unknown: a failure is the safe guess (we restart)
            await asyncio.sleep(EXIT_POLL_S)


# --- sd_notify ----------------------------------------------------------------------------


def _when(started_at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started_at))


def _restarts(incarnation: int, started_at: float) -> str:
    if incarnation <= 1:
        return f"up since {_when(started_at)}, never restarted"
    n = incarnation - 1
    return f"restarted {n} time{'s' if n != 1 else ''}, last at {_when(started_at)}"


def _children(children: Any) -> str:
    kids = [c for c in children if isinstance(c, dict)] if isinstance(children, list) else []
    if len(kids) == 1:
        c = kids[0]
        pid = f" (pid {c['pid']})" if c.get("pid") else ""
        return f"{c.get('name')} {c.get('state')}{pid}, {c.get('restarts', 0)} restarts"
    running = sum(1 for c in kids if c.get("state") == "running")
    restarts = sum(int(c.get("restarts") or 0) for c in kids)
    others = [f"{c.get('name')} {c.get('state')}" for c in kids if c.get("state") != "running"]
    return (f"{running}/{len(kids)} children running, {restarts} restarts"
            + (f" ({', '.join(others)})" if others else ""))


def describe(role: str, topic: str | None, incarnation: int, started_at: float,
             facts: dict[str, Any]) -> str:
    """The one-line STATUS= that `systemctl status` shows, from a `status` reply (or the
    fields given to `ready()` before the first one)."""
    since = _restarts(incarnation, started_at)
    if role == "server":
        members, next_seq = facts.get("members", "?"), facts.get("next_seq")
        messages = (f"{next_seq - 1} messages (next seq {next_seq})"
                    if isinstance(next_seq, int) else "messages unknown")
        count = len(members) if isinstance(members, list) else members
        return f"{topic}: {count} members, {messages}; {since}"
    if role == "router":
        if "children" not in facts:
            return f"listening on {facts.get('host')}:{facts.get('port')}; {since}"
        topics = facts.get("topics")
        n_topics = len(topics) if isinstance(topics, list) else "?"
        return (f"{facts.get('lobby', '?')} in the lobby, {n_topics} topics; "
                f"{_children(facts.get('children'))}; {since}")
    if role.endswith("monitor"):
        held = facts.get("fds_held")
        sockets = f"; holding {held} sockets" if isinstance(held, int) else ""
        watched = (_children(facts.get("children")) if "children" in facts
                   else f"{facts.get('child', '?')} starting")
        return f"watching {watched}{sockets}; {since}"
    return since


class Notifier:
    """sd_notify for one daemon. Every method is a no-op when systemd did not ask."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self._n: Any = None
        if self.enabled:
            self._n = sdnotify.SystemdNotifier()
            sock = getattr(self._n, "socket", None)
            if sock is not None:
                # Never block the event loop on a busy PID 1: a dropped ping is retried
                # at the next beat, a blocked loop would stop the heartbeats.
                sock.setblocking(False)
        self.watchdog_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        if usec.isdigit() and env.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid()):
            self.watchdog_s = int(usec) / 1_000_000
        self._last_ping = 0.0
        self._status: str | None = None
        self._task: asyncio.Task[None] | None = None

    def send(self, text: str) -> None:
        if self._n is not None:
            self._n.notify(text)

    def ready(self, status: str) -> None:
        self._status = status
        self.send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        if status != self._status:
            self._status = status
            self.send(f"STATUS={status}")

    def at_least(self, watchdog_s: float) -> None:
        """Make systemd's watchdog no shorter than `watchdog_s`: a long heartbeat timeout
        must leave detection to our supervisor, with systemd as the backstop."""
        if self.watchdog_s is not None and self.watchdog_s < watchdog_s:
            self.watchdog_s = watchdog_s
            self.send(f"WATCHDOG_USEC={round(watchdog_s * 1_000_000)}")

    def tick(self) -> None:
        """Called by the heartbeat loop on each beat: a stuck loop stops both."""
        if self.watchdog_s is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_s / 4:
            self._last_ping = now
            self.send("WATCHDOG=1")

    def follow(self, fetch: Callable[[], Awaitable[dict[str, Any] | None]],
               line: Callable[[dict[str, Any]], str]) -> None:
        """Refresh STATUS= every second from `fetch()` (our own `status` reply)."""
        if self.enabled and self._task is None:
            self._task = asyncio.ensure_future(self._follow(fetch, line))

    async def _follow(self, fetch: Callable[[], Awaitable[dict[str, Any] | None]],
                      line: Callable[[dict[str, Any]], str]) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            with contextlib.suppress(Exception):  # a status line is never worth a crash
                facts = await fetch()
                if facts is not None:
                    self.status(line(facts))

    def stopping(self) -> None:
        self.send("STOPPING=1")
        self.close()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


# --- the installer ------------------------------------------------------------------------

PROTECTED = ("/home", "/root", "/run/user")  # what ProtectHome= hides
PRIVATE_TMP = ("/tmp", "/var/tmp")  # what PrivateTmp= replaces


@dataclass(frozen=True)
class Installation:
    python: str  # the interpreter that has the `theychat` package installed
    visible: list[str]  # paths the sandbox hides (home, /tmp) that the units must see


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r + "/") for r in roots)


def _minimal(paths: list[str]) -> list[str]:
    kept: list[str] = []
    for p in sorted(set(paths)):
        if not any(_under(p, (k,)) for k in kept):
            kept.append(p)
    return kept


def _package_dirs() -> list[str]:
    """Where this interpreter finds the `theychat` package: the folder holding its
    subpackages as imported (site-packages/theychat, or the checkout an editable install
    maps them to) and every import path with a `theychat` directory (site-packages, or
    the link tree of a strict editable install)."""
    found = [str(Path(theychat.daemons.__file__).resolve().parent.parent)]
    found += [p for p in sys.path if p and (Path(p) / "theychat").is_dir()]
    return found


def this_installation() -> Installation:
    """What the units need to run `python -m theychat.daemons.X` as this interpreter does.

    The units set no PYTHONPATH: the interpreter finds `theychat` the way it does here
    (installed, or an editable install's finder); the sandbox only has to show it."""
    import structlog

    needed = [sys.prefix, sys.base_prefix, sys.exec_prefix,
              str(Path(sys.executable).resolve().parent), *_package_dirs()]
    for mod in (yaml, structlog, sdnotify):
        if mod.__file__:
            needed.append(str(Path(mod.__file__).resolve().parent.parent))
    needed = [str(Path(p).resolve()) for p in needed]
    for p in needed:
        if re.search(r"\s", p):
            raise SystemdError(f"{p}: a path with white space cannot go in a unit file")
    return Installation(sys.executable,
                        _minimal([p for p in needed if _under(p, PROTECTED + PRIVATE_TMP)]))


def units_dir() -> Path:
    """units/ of a checkout (or editable install), else the copy a wheel installs."""
    for d in (Path(theychat.daemons.__file__).resolve().parent.parent / "units",
              Path(sys.prefix) / "share" / "theychat" / "units"):
        if (d / TARGET).is_file():
            return d
    raise SystemdError("cannot find the unit files (units/ of TheyChat)")


def render(text: str, inst: Installation) -> str:
    """A unit of units/ for this machine: our interpreter, and what it must see."""
    out = []
    for line in text.splitlines():
        if line.startswith(f"ExecStart={DEFAULT_PYTHON} "):
            line = f"ExecStart={inst.python} " + line[len(f"ExecStart={DEFAULT_PYTHON} "):]
            out.append(line)
            continue
        if line == "ProtectHome=yes" and inst.visible:
            out.append("# Python or TheyChat lives where the sandbox hides (a home directory,")
            out.append("# /tmp): show only that, read-only, in an otherwise empty /home, /root,")
            out.append("# /run/user (and private /tmp).")
            homes = any(_under(p, PROTECTED) for p in inst.visible)
            out.append("ProtectHome=tmpfs" if homes else line)
            out.append("BindReadOnlyPaths=" + " ".join(inst.visible))
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def installed_config(source: dict[str, Any]) -> dict[str, Any]:
    """The config the units read: `source` with the two keys systemd decides."""
    data = dict(source)
    state = data.get("state_dir")
    if state not in (None, STATE_DIR):
        raise ConfigError(f"state_dir: under systemd the state is in {STATE_DIR} "
                          f"(StateDirectory=theychat), not {state!r}; remove the key")
    data["state_dir"] = STATE_DIR
    sup = data.get("supervision") or {}
    if not isinstance(sup, dict):
        raise ConfigError("supervision: expected a mapping")
    data["supervision"] = {**sup, "backend": "systemd"}
    config.from_mapping(data)  # validate the result, naming the key
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    config.load(path)  # validates, with the usual messages
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    assert isinstance(data, dict)
    return data


def _write(path: Path, text: str, mode: int) -> bool:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    if not path.parent.exists():
        path.parent.mkdir(parents=True)
        os.chmod(path.parent, 0o755)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


def install(source: Path | None, unit_dir: Path = UNIT_DIR, config_path: Path = CONFIG_PATH,
            reload: bool = True, out: TextIO = sys.stdout) -> None:
    inst = this_installation()
    if source is not None:
        data = _read_yaml(source)
    elif config_path.exists():
        data = _read_yaml(config_path)
    else:
        data = {}
    data = installed_config(data)
    header = ("# TheyChat under systemd, written by `theychat install-systemd`; every key is\n"
              "# documented in config/theychat.yaml. Restart theychat.target after a change.\n")
    text = header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    if config_path.exists() and _read_yaml(config_path) == data:
        text = config_path.read_text(encoding="utf-8")  # same settings: keep its comments
    changed = [str(config_path)] if _write(config_path, text, 0o600) else []
    src = units_dir()
    for name in UNIT_FILES:
        if _write(unit_dir / name, render((src / name).read_text(encoding="utf-8"), inst), 0o644):
            changed.append(str(unit_dir / name))
    print(f"config {config_path}; units in {unit_dir} run {inst.python}"
          + (f" (can see {', '.join(inst.visible)})" if inst.visible else ""), file=out)
    print("changed: " + (", ".join(changed) if changed else "nothing"), file=out)
    if reload:
        try:
            subprocess.run(["systemctl", "daemon-reload"], check=True, timeout=60,
                           capture_output=True, text=True)
        except (OSError, subprocess.SubprocessError) as e:
            err = getattr(e, "stderr", None) or str(e)
            raise SystemdError(f"systemctl daemon-reload failed: {err.strip()}") from None
    print("start it: systemctl enable --now theychat.target", file=out)
