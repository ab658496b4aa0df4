"""The Supervisor, with fake processes and a virtual clock (tests/unit/virtual.py).

Nothing is started or signalled for real: `FakeHost` is both the process manager and the
OS (pid files, exits, signals), and its processes send their heartbeats straight into
the supervisor's watches. Time is the event loop's, so a 30 s window takes milliseconds.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.unit import virtual
from theychat.daemons import tree
from theychat.daemons.config import Supervision
from theychat.daemons.heartbeat import Beat, PeerWatch
from theychat.daemons.procs import PidRecord
from theychat.daemons.supervisor import Child, Supervisor
from theychat.daemons.tree import ChildSpec, DaemonId, Restart, Role, RoleSpec

TIMEOUT_MS = 500
BEAT_MS = 100
SERVER = DaemonId(Role.SERVER, "rust")


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[float, str, dict[str, Any]]] = []

    def _add(self, event: str, **fields: Any) -> None:
        self.events.append((asyncio.get_running_loop().time(), event, fields))

    info = warning = error = exception = _add

    def named(self, event: str) -> list[dict[str, Any]]:
        return [f for _, e, f in self.events if e == event]

    def times(self, event: str) -> list[float]:
        return [t for t, e, _ in self.events if e == event]


@dataclass
class Proc:
    pid: int
    start_time: int
    name: str
    incarnation: int
    alive: bool = True
    beating: bool = True
    stopped_cleanly: bool = False
    status: int | None = None  # its exit status, once it exited
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    signals: list[int] = field(default_factory=list)


class FakeHost:
    """ProcessManager and Processes at once. `behaviour(proc)` runs at each start: by
    default the process beats every 100 ms for as long as it lives and is not hung."""

    def __init__(self, watches: dict[str, PeerWatch]) -> None:
        self.watches = watches
        self.procs: dict[int, Proc] = {}
        self.pidfiles: dict[str, PidRecord] = {}
        self.started: list[Proc] = []
        self.next_pid = 100
        self.stop_marker = False
        self.ignores_sigterm = False
        self.behaviour: Callable[[Proc], None] = self.beat
        self.tasks: set[asyncio.Task[None]] = set()

    # -- processes of our own making ---------------------------------------------------

    def launch(self, name: str) -> Proc:
        self.next_pid += 1
        last = self.pidfiles.get(name)
        proc = Proc(self.next_pid, 1000 + self.next_pid, name,
                    (last.incarnation if last else 0) + 1)
        self.procs[proc.pid] = proc
        self.pidfiles[name] = PidRecord(proc.pid, proc.start_time, proc.incarnation)
        self.started.append(proc)
        return proc

    def beat(self, proc: Proc) -> None:
        task = asyncio.ensure_future(self._beats(proc))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _beats(self, proc: Proc) -> None:
        seq = 0
        while proc.alive:
            if proc.beating and proc.name in self.watches:
                now = int(asyncio.get_running_loop().time() * 1000)
                seq += 1
                self.watches[proc.name].offer(
                    Beat("server", "rust", proc.name, proc.pid, proc.incarnation, seq, now), now)
            await asyncio.sleep(BEAT_MS / 1000)

    def die(self, proc: Proc, clean: bool = False, status: int | None = None) -> None:
        proc.alive = False
        proc.status = 0 if clean else status
        if clean:
            proc.stopped_cleanly = True
            rec = self.pidfiles[proc.name]
            if rec.pid == proc.pid:
                self.pidfiles[proc.name] = PidRecord(rec.pid, rec.start_time,
                                                     rec.incarnation, stopped=True)
        proc.exited.set()

    # -- ProcessManager ------------------------------------------------------------------

    def start(self, spec: ChildSpec) -> int:
        proc = self.launch(spec.name)
        self.behaviour(proc)
        return proc.pid

    def stopped_on_purpose(self, spec: ChildSpec, pid: int) -> bool:
        return False

    def prepare_standby(self, spec: ChildSpec) -> int | None:
        return None

    def drop_standby(self, spec: ChildSpec) -> None:
        return None

    # -- Processes -----------------------------------------------------------------------

    def pid_record(self, name: str) -> PidRecord | None:
        return self.pidfiles.get(name)

    def alive(self, rec: PidRecord) -> bool:
        proc = self.procs.get(rec.pid)
        return proc is not None and proc.alive and proc.start_time == rec.start_time

    def start_time(self, pid: int) -> int | None:
        proc = self.procs.get(pid)
        return proc.start_time if proc and proc.alive else None

    async def wait_exit(self, pid: int, started: int | None) -> int | None:
        proc = self.procs.get(pid)
        if proc is None or proc.start_time != started:
            return None
        await proc.exited.wait()
        return proc.status

    def signal(self, rec: PidRecord, sig: int) -> bool:
        if not self.alive(rec):
            return False  # gone, or the pid names another process now: never hit it
        proc = self.procs[rec.pid]
        proc.signals.append(sig)
        if sig == signal.SIGKILL or (sig == signal.SIGTERM and not self.ignores_sigterm):
            self.die(proc, clean=sig == signal.SIGTERM)
        return True

    def stopping(self) -> bool:
        return self.stop_marker


SETTINGS = Supervision(max_restarts=5, window_s=30.0, backoff_initial_ms=0,
                       backoff_step_ms=50, backoff_max_ms=1000, start_timeout_ms=2000,
                       warm_standby=False)


def spec(daemon: DaemonId = SERVER) -> ChildSpec:
    return ChildSpec(daemon, ["-m", daemon.spec.module])


Scenario = Callable[[Supervisor, FakeHost, Log], Awaitable[None]]


def supervise(scenario: Scenario, settings: Supervision = SETTINGS,
              gave_up: list[str] | None = None,
              before: Callable[[FakeHost], None] | None = None) -> tuple[FakeHost, Log]:
    """Run `scenario` against a Supervisor on fakes and a virtual clock."""
    log = Log()
    watches: dict[str, PeerWatch] = {}
    host = FakeHost(watches)

    async def on_gave_up(child: Child) -> None:
        if gave_up is not None:
            gave_up.append(child.spec.name)

    async def main() -> None:
        if before:
            before(host)  # in the loop: what it starts runs on the virtual clock
        sup = Supervisor(None, log, settings, TIMEOUT_MS, watches,  # type: ignore[arg-type]
                         manager=host, on_gave_up=on_gave_up, processes=host)
        try:
            await scenario(sup, host, log)
        finally:
            await sup.close()
            for task in list(host.tasks):
                task.cancel()
            await asyncio.gather(*host.tasks, return_exceptions=True)

    virtual.run(main())
    return host, log


async def until(cond: Callable[[], bool], within_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.001)


def test_a_child_that_exits_is_restarted_at_once_and_proves_alive() -> None:
    async def scenario(sup: Supervisor, host: FakeHost, log: Log) -> None:
        sup.add(spec())
        await until(lambda: len(host.started) == 1)
        await asyncio.sleep(0.3)  # it beats
        host.die(host.started[0])
        await until(lambda: len(log.named("restarted")) == 1)

    host, log = supervise(scenario)
    assert [p.incarnation for p in host.started] == [1, 2]
    dead = log.named("peer_declared_dead")
    assert [d["cause"] for d in dead] == ["exit"]
    assert log.named("restarting")[0]["delay_ms"] == 0
    death, start = log.times("peer_declared_dead")[0], log.times("child_started")[1]
    assert start - death < 0.001  # the first restart in a window waits for nothing
    assert log.named("restarted")[0]["restarts"] == 1


def test_restarts_back_off_then_the_supervisor_gives_up() -> None:
    """5 restarts in 30 s with delays 0, 50, 100, 200, 400 ms; the 6th death gives up."""
    async def scenario(sup: Supervisor, host: FakeHost, log: Log) -> None:
        sup.add(spec())
        for n in range(1, 7):
            await until(lambda n=n: len(host.started) == n)  # type: ignore[misc]
            await asyncio.sleep(0.2)
            host.die(host.started[-1])
        await until(lambda: bool(log.named("gave_up")))
        await asyncio.sleep(5)  # nothing more is started

    gave_up: list[str] = []
    host, log = supervise(scenario, gave_up=gave_up)
    assert [r["delay_ms"] for r in log.named("restarting")] == [0, 50, 100, 200, 400]
    deaths, starts = log.times("peer_declared_dead"), log.times("child_started")[1:]
    for (death, start), delay in zip(zip(deaths, starts, strict=False),
                                     (0, 0.05, 0.1, 0.2, 0.4), strict=True):
        assert start - death == pytest.approx(delay, abs=0.002)
    assert len(host.started) == 6
    assert log.named("gave_up") == [{"child": "server@rust", "restarts_in_window": 5,
                                     "window_s": 30.0}]
    assert gave_up == ["server@rust"]


def test_restarts_outside_the_window_do_not_count() -> None:
    async def scenario(sup: Supervisor, host: FakeHost, log: Log) -> None:
        sup.add(spec())
        for n in range(1, 10):
            await until(lambda n=n: len(host.started) == n)  # type: ignore[misc]
            await asyncio.sleep(8.0)  # four deaths in any 30 s: under the limit of 5
            host.die(host.started[-1])
        await until(lambda: len(host.started) == 10)

    _, log = supervise(scenario)
    assert not log.named("gave_up")
    assert max(r["delay_ms"] for r in log.named("restarting")) <= 200


def test_a_hung_child_is_declared_dead_after_the_timeout_killed_and_replaced() -> None:
    async def scenario(sup: Supervisor, host: FakeHost, log: Log) -> None:
        sup.add(spec())
        await until(lambda: len(host.started) == 1)
        await asyncio.sleep(1.0)
        host.started[0].beating = False  # SIGSTOP: alive, silent
        await until(lambda: len(log.named("restarted")) == 1)

    host, log = supervise(scenario)
    hung = host.started[0]
    dead = log.named("peer_declared_dead")[0]
    assert dead["cause"] == "timeout"
    assert TIMEOUT_MS <= dead["detection_ms"] <= TIMEOUT_MS + BEAT_MS + 25
    assert hung.signals == [signal.SIGKILL] and not hung.alive
    assert log.named("child_killed")[0]["child_pid"] == hung.pid
    killed, started = log.times("child_killed")[0], log.times("child_started")[1]
    assert killed <= started  # never two copies at once


def test_a_child_that_never_beats_gets_the_start_timeout_not_the_short_one() -> None:
    def silent(host: FakeHost) -> None:
        host.behaviour = lambda proc: None  # alive, never a beat

    async def scenario(sup: Supervisor, host: FakeHost, log: Log) -> None:
        sup.add(spec())
        await until(lambda: bool(log.named("peer_declared_dead")))

    host, log = supervise(scenario, before=silent)
    dead = log.named("peer_declared_dead")[0]
    assert dead["cause"] == "timeout"
    assert dead["detection_ms"] == pytest.approx(SETTINGS.start_timeout_ms, abs=25)
    assert host.started[0].signals == [signal.SIGKILL]


def test_a_hung_child_whose_pid_was_reused_is_not_killed() -> None:
    """The kill checks the pid's start time: a process that took over the pid of the one
    we watched is never hit, and the child is still replaced."""
    async def scenario(sup: Supervisor, host: FakeHost, log: Log) -> None:
        sup.add(spec())
        await until(lambda: len(host.started) == 1)
        await asyncio.sleep(0.5)
        first = host.started[0]
        first.beating = False
        # It dies unseen and a stranger gets its pid (another start time).
        stranger = Proc(first.pid, first.start_time + 1, "stranger", 1)
        first.alive = False
        host.procs[first.pid] = stranger
        await until(lambda: len(host.started) == 2)

    host, log = supervise(scenario)
    assert host.procs[host.started[0].pid].name == "stranger"
    assert host.procs[host.started[0].pid].signals == []
    assert not log.named("child_killed")


def test_a_clean_exit_ends_a_transient_child_and_restarts_a_permanent_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(sup: Supervisor, host: FakeHost, log: Log) -> None:
        sup.add(spec())
        await until(lambda: len(host.started) == 1)
        await asyncio.sleep(0.3)
        host.die(host.started[0], clean=True)
        await asyncio.sleep(2.0)

    host, log = supervise(scenario)
    assert len(host.started) == 2 and log.named("peer_declared_dead")  # permanent
    transient = RoleSpec(Role.SERVER, "theychat.daemons.server", Role.SERVER_MONITOR, True,
                         "test", restart=Restart.TRANSIENT)
    monkeypatch.setitem(tree.ROLES, Role.SERVER, transient)
    host, log = supervise(scenario)
    assert len(host.started) == 1
    assert not log.named("peer_declared_dead")
    assert log.named("child_stopped") == [{"child": "server@rust",
                                           "child_pid": host.started[0].pid}]


def test_a_crash_of_a_transient_child_is_still_restarted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    transient = RoleSpec(Role.SERVER, "theychat.daemons.server", Role.SERVER_MONITOR, True,
                         "test", restart=Restart.TRANSIENT)
    monkeypatch.setitem(tree.ROLES, Role.SERVER, transient)

    async def scenario(sup: Supervisor, host: FakeHost, log: Log) -> None:
        sup.add(spec())
        await until(lambda: len(host.started) == 1)
        await asyncio.sleep(0.3)
        host.die(host.started[0])  # a crash: the pid file does not say it stopped
        await until(lambda: len(host.started) == 2)

    supervise(scenario)


def test_a_live_child_is_adopted_and_a_dead_one_is_declared_at_our_start() -> None:
    def alive_before_us(host: FakeHost) -> None:
        proc = host.launch("server@rust")
        host.beat(proc)

    async def adopt(sup: Supervisor, host: FakeHost, log: Log) -> None:
        sup.add(spec())
        await asyncio.sleep(3.0)

    host, log = supervise(adopt, before=alive_before_us)
    assert len(host.started) == 1  # the one that was there
    assert log.named("child_adopted")[0]["child_pid"] == host.started[0].pid
    assert not log.named("peer_declared_dead")

    def died_while_we_were_down(host: FakeHost) -> None:
        host.launch("server@rust").alive = False

    host, log = supervise(adopt, before=died_while_we_were_down)
    assert [d["cause"] for d in log.named("peer_declared_dead")] == ["found_dead"]
    assert len(host.started) == 2 and log.named("restarted")[0]["restarts"] == 1


def test_nothing_is_restarted_while_the_tree_is_stopping() -> None:
    async def scenario(sup: Supervisor, host: FakeHost, log: Log) -> None:
        sup.add(spec())
        await until(lambda: len(host.started) == 1)
        host.stop_marker = True
        host.die(host.started[0])
        await asyncio.sleep(3.0)

    host, log = supervise(scenario)
    assert len(host.started) == 1
    assert not log.named("restarting")


def test_stop_sends_sigterm_then_sigkill_after_the_child_specs_shutdown_time() -> None:
    def stubborn(host: FakeHost) -> None:
        host.ignores_sigterm = True

    async def scenario(sup: Supervisor, host: FakeHost, log: Log) -> None:
        sup.add(spec())
        await until(lambda: len(host.started) == 1)
        t0 = asyncio.get_running_loop().time()
        await sup.stop("server@rust")
        took = asyncio.get_running_loop().time() - t0
        assert took == pytest.approx(SERVER.spec.shutdown_ms / 1000, abs=0.01)
        await asyncio.sleep(2.0)

    host, _ = supervise(scenario, before=stubborn)
    assert host.started[0].signals == [signal.SIGTERM, signal.SIGKILL]
    assert len(host.started) == 1  # stopped for good, not restarted
    assert "server@rust" not in host.watches


def test_a_full_disk_is_no_crash_loop_the_child_is_retried_until_there_is_room() -> None:
    """Exit status 4 (its state's filesystem is full): restarted at the longest backoff,
    never counted against the intensity, however long it lasts."""
    async def scenario(sup: Supervisor, host: FakeHost, log: Log) -> None:
        sup.add(spec())
        for n in range(1, 12):  # twice the intensity limit
            await until(lambda n=n: len(host.started) == n)  # type: ignore[misc]
            await asyncio.sleep(0.05)
            host.die(host.started[-1], status=4)
        await until(lambda: len(host.started) == 12)
        await asyncio.sleep(1.0)  # room again: this one lives
        host.die(host.started[-1])  # and a crash now is a crash, counted from zero
        await until(lambda: len(host.started) == 13)

    gave_up: list[str] = []
    _, log = supervise(scenario, gave_up=gave_up)
    assert gave_up == [] and not log.named("gave_up")
    causes = [d["cause"] for d in log.named("peer_declared_dead")]
    assert causes == ["no_space"] * 11 + ["exit"]
    delays = [r["delay_ms"] for r in log.named("restarting")]
    assert delays == [SETTINGS.backoff_max_ms] * 11 + [0]
