"""Keeps child daemons running, in Erlang/OTP's terms: one_for_one, each child restarted
as its child spec says (`tree.ChildSpec`: permanent or transient), with a restart
intensity (MaxR restarts in MaxT seconds) and short exponential backoff.

A child is declared dead when its pid exits (pidfd: at once) or when it sends no valid
heartbeat for `heartbeat.timeout_ms` (a hang: SIGSTOP, a deadlock). A hung child is
killed, after checking the pid is still the process we started, before it is replaced.
Decisions come from `policy.decide`; starting processes goes through a
`ProcessManager`, so another backend (systemd) changes how, not when; what the
supervisor asks of the OS (pid files, exits, signals) goes through `Processes`, and its
clock is its event loop's, so a test can drive it with fakes and a virtual clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from theychat.daemons import procs
from theychat.daemons.config import Supervision
from theychat.daemons.heartbeat import PeerWatch
from theychat.daemons.paths import StatePaths
from theychat.daemons.policy import Decision, RestartPolicy, decide, prune
from theychat.daemons.procs import PidRecord
from theychat.daemons.tree import ChildSpec, Restart

STARTING_POLL_MS = 20
PIDFILE_POLL_S = 0.01  # waiting for a child that systemd starts to write its pid file
T = TypeVar("T")


class ProcessManager(Protocol):
    """How children are started; a backend may answer at once or asynchronously."""

    def start(self, spec: ChildSpec) -> int | Awaitable[int | None] | None:
        """Start the child detached and return its pid, or None when the pid is not
        known yet (systemctl --no-block): the supervisor then waits, at most
        start_timeout_ms, for the child's pid file to name a newer incarnation."""
        ...

    def stopped_on_purpose(self, spec: ChildSpec, pid: int) -> bool | Awaitable[bool]:
        """After the child exited: True if it was asked to stop (`systemctl stop`), which
        is no failure: it is not restarted, only adopted again when it comes back."""
        ...

    def prepare_standby(self, spec: ChildSpec) -> int | None:
        """Once the child runs: start its warm standby if it has one; its pid, else None."""
        ...

    def drop_standby(self, spec: ChildSpec) -> None:
        """End the child's standby, if it has one: the child is stopped or given up on."""
        ...


class Processes(Protocol):
    """The OS as a supervisor sees it: `HostProcesses`, or a fake in unit tests."""

    def pid_record(self, name: str) -> PidRecord | None:
        """What the daemon's pid file says (its current or last process)."""
        ...

    def alive(self, rec: PidRecord) -> bool:
        ...

    def start_time(self, pid: int) -> int | None:
        ...

    async def wait_exit(self, pid: int, started: int | None) -> int | None:
        """Return once the process has exited, with its exit status if it is known (a
        child of ours; a signal is minus its number)."""
        ...

    def signal(self, rec: PidRecord, sig: int) -> bool:
        """Send `sig` if `rec` still names that process; False if it does not."""
        ...

    def stopping(self) -> bool:
        """`theychat down` is under way: restart nothing."""
        ...


class HostProcesses:
    """`Processes` of this host: pid files of a state directory, pidfds, signals."""

    def __init__(self, paths: StatePaths) -> None:
        self.paths = paths

    def pid_record(self, name: str) -> PidRecord | None:
        return procs.read_pidfile(self.paths.pidfile(name))

    def alive(self, rec: PidRecord) -> bool:
        return rec.alive()

    def start_time(self, pid: int) -> int | None:
        return procs.start_time(pid)

    async def wait_exit(self, pid: int, started: int | None) -> int | None:
        return await procs.wait_exit(pid, started)

    def signal(self, rec: PidRecord, sig: int) -> bool:
        return procs.signal_process(rec, sig)

    def stopping(self) -> bool:
        return self.paths.stopping.exists()


class SpawnManager:
    """The default backend: a detached process of our own (its own session), and, for
    servers, a warm standby: started ahead, waiting on a pipe for our go (`--standby`)."""

    def __init__(self, paths: StatePaths, warm_standby: bool = False) -> None:
        self.paths = paths
        self.warm_standby = warm_standby
        self.standbys: dict[str, tuple[int, int]] = {}  # name -> (pid, our end of its pipe)

    def start(self, spec: ChildSpec) -> int:
        standby = self.standbys.pop(spec.name, None)
        if standby is not None:
            pid, go = standby
            try:
                os.write(go, b"g")  # it was started long ago: only its own start-up is left
                return pid
            except OSError:
                procs.reap(pid)  # it died meanwhile: start from scratch
            finally:
                os.close(go)
        return procs.spawn(spec.args, self.paths.stderr(spec.name))

    def stopped_on_purpose(self, spec: ChildSpec, pid: int) -> bool:
        return False  # `theychat down` says so with the stopping marker instead

    def prepare_standby(self, spec: ChildSpec) -> int | None:
        if not self.warm_standby or not spec.standby:  # worth it where clients wait
            return None
        if spec.name in self.standbys:
            pid, go = self.standbys[spec.name]
            if procs.alive(pid):
                return pid
            self.drop_standby(spec)
        read, go = os.pipe()  # both close-on-exec: the child gets `read` as its fd 3 only
        try:
            pid = procs.spawn([*spec.args, "--standby"], self.paths.stderr(spec.name), read)
        except OSError:
            os.close(go)
            raise
        finally:
            os.close(read)
        self.standbys[spec.name] = (pid, go)
        return pid

    def drop_standby(self, spec: ChildSpec) -> None:
        standby = self.standbys.pop(spec.name, None)
        if standby is not None:
            pid, go = standby
            os.close(go)  # it reads EOF and leaves; the kill only makes sure
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            procs.reap(pid)


async def _settle(value: T | Awaitable[T]) -> T:
    if inspect.isawaitable(value):
        return await value
    return value


@dataclass
class Child:
    spec: ChildSpec
    watch: PeerWatch
    pid: int | None = None
    started: int | None = None  # /proc start time: the pid's identity
    restarts: int = 0
    recent: list[float] = field(default_factory=list)  # monotonic times of restarts
    state: str = "starting"  # starting | running | restarting | gave_up | stopped
    beats_at_start: int = 0  # watch.accepted when the current process was started
    started_ms: int = 0  # monotonic ms when the current process was started
    exit_status: int | None = None  # of the process that just ended, when known
    task: asyncio.Task[None] | None = None

    def status(self) -> dict[str, Any]:
        return {"name": self.spec.name, "role": self.spec.role, "topic": self.spec.topic,
                "pid": self.pid, "state": self.state, "restarts": self.restarts}



class Supervisor:
    def __init__(
        self,
        paths: StatePaths,
        log: Any,
        settings: Supervision,
        heartbeat_timeout_ms: int,
        watches: dict[str, PeerWatch],
        manager: ProcessManager | None = None,
        on_gave_up: Callable[[Child], Awaitable[None]] | None = None,
        processes: Processes | None = None,
    ) -> None:
        self.log = log
        self.policy = RestartPolicy(settings.max_restarts, settings.window_s,
                                    settings.backoff_initial_ms, settings.backoff_step_ms,
                                    settings.backoff_max_ms)
        self.timeout_ms = heartbeat_timeout_ms
        self.start_timeout_ms = max(settings.start_timeout_ms, heartbeat_timeout_ms)
        self.watches = watches  # the heartbeat listener's: a child's beats land in its watch
        self.manager = manager or SpawnManager(paths, settings.warm_standby)
        self.os = processes or HostProcesses(paths)
        self.on_gave_up = on_gave_up
        self.children: dict[str, Child] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # running ones only: restarts add more

    @staticmethod
    def now() -> float:
        """Seconds on the event loop's clock (monotonic; virtual in tests)."""
        return asyncio.get_running_loop().time()

    def now_ms(self) -> int:
        return int(self.now() * 1000)

    def add(self, spec: ChildSpec) -> Child:
        watch = PeerWatch(spec.name, self.timeout_ms, self.now_ms())
        self.watches[spec.name] = watch
        child = Child(spec, watch)
        self.children[spec.name] = child
        child.task = self._spawn(self._keep(child))
        return child

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _restarted(self, child: Child, declared: float, counted: bool = True) -> None:
        """Count a restart begun at `declared` (against the intensity too, if `counted`),
        then follow the new process until it beats (`restarted`)."""
        child.restarts += 1
        if counted:
            child.recent.append(declared)
        self._spawn(self._report_restarted(child, declared))

    def _running(self, child: Child, rec: PidRecord) -> None:
        """From now on `child` is the process `rec` names: watch it afresh."""
        child.pid, child.started, child.state = rec.pid, rec.start_time, "running"
        self._watch_from_now(child)

    def _watch_from_now(self, child: Child) -> None:
        child.beats_at_start = child.watch.accepted
        child.started_ms = self.now_ms()
        child.watch.reset(child.started_ms)

    # -- one child's life ----------------------------------------------------------------

    def _adopt(self, child: Child) -> bool:
        rec = self.os.pid_record(child.spec.name)
        if rec is None or not self.os.alive(rec):
            return False
        child.pid, child.started, child.state = rec.pid, rec.start_time, "running"
        self.log.info("child_adopted", child=child.spec.name, child_pid=rec.pid)
        return True

    async def _start(self, child: Child) -> None:
        # A start that lost the race for the lock exits at once; the winner's pid file
        # names the process to watch instead.
        if not self._adopt(child):
            before = self.os.pid_record(child.spec.name)
            pid = await _settle(self.manager.start(child.spec))
            started = self.os.start_time(pid) if pid is not None else None
            if pid is None:  # started by someone else (systemd): its pid file will tell
                rec = await self._new_incarnation(child, before, self.start_timeout_ms / 1000)
                pid, started = (rec.pid, rec.start_time) if rec else (None, None)
            child.pid, child.started, child.state = pid, started, "running"
            if pid is None:
                self.log.warning("child_start_timeout", child=child.spec.name,
                                 timeout_ms=self.start_timeout_ms)
            else:
                self.log.info("child_started", child=child.spec.name, child_pid=pid)
        self._watch_from_now(child)

    async def _new_incarnation(self, child: Child, before: PidRecord | None,
                               timeout_s: float | None) -> PidRecord | None:
        """The process the child's pid file names once it is newer than `before` (or is
        `before`, alive); None if none appears within `timeout_s` (None: no limit). A
        newer one that already died is returned too: its exit is then seen at once."""
        last = 0 if before is None else before.incarnation
        deadline = None if timeout_s is None else self.now() + timeout_s
        while deadline is None or self.now() < deadline:
            rec = self.os.pid_record(child.spec.name)
            if rec is not None and (rec.incarnation > last or (
                    rec.incarnation == last and self.os.alive(rec))):
                return rec
            await asyncio.sleep(PIDFILE_POLL_S)
        return None

    async def _until_back(self, child: Child) -> None:
        """The child was stopped on purpose: no restart; watch it again once it is back."""
        child.state = "stopped"
        self.log.info("child_stopped", child=child.spec.name, child_pid=child.pid)
        gone = self.os.pid_record(child.spec.name)
        rec = await self._new_incarnation(child, gone, None)
        assert rec is not None  # no deadline: only a new process ends the wait
        self._running(child, rec)
        self.log.info("child_adopted", child=child.spec.name, child_pid=rec.pid)

    def _ended_cleanly(self, child: Child) -> bool:
        """The child's last process exited on its own, cleanly (its pid file says so)."""
        rec = self.os.pid_record(child.spec.name)
        return rec is not None and rec.pid == child.pid and rec.stopped

    def _found_dead(self, child: Child) -> float | None:
        """At our own start: a child whose last process died without a clean stop (it
        died with us, or while we were down) is declared dead like any other, so its
        restart is counted and logged; returns when it was declared."""
        rec = self.os.pid_record(child.spec.name)
        if rec is None or rec.stopped or self.os.alive(rec) or self.os.stopping():
            return None
        self.log.warning("peer_declared_dead", child=child.spec.name, child_pid=rec.pid,
                         cause="found_dead", detection_ms=None, last_seq=None)
        self.log.info("restarting", child=child.spec.name, cause="found_dead", delay_ms=0)
        return self.now()

    async def _first_beat(self, child: Child) -> bool:
        """Wait (bounded) for the first valid beat of the child's current process; False
        if none came, or if that process was replaced meanwhile (its successor's waits
        are their own)."""
        pid, since = child.pid, child.beats_at_start
        deadline = self.now() + self.start_timeout_ms / 1000
        while child.pid == pid and child.watch.accepted == since:
            if self.now() > deadline:
                return False
            await asyncio.sleep(0.005)
        return child.pid == pid

    async def _standby_when_alive(self, child: Child) -> None:
        """A warm standby is started only once the child beats: a child that never comes
        up needs a fresh start, not a second copy of what just failed."""
        if not await self._first_beat(child) or child.state != "running":
            return
        pid = self.manager.prepare_standby(child.spec)
        if pid is not None:
            self.log.info("standby_started", child=child.spec.name, standby_pid=pid)

    async def _keep(self, child: Child) -> None:
        found_dead = self._found_dead(child)
        await self._start(child)
        if found_dead is not None:
            self._restarted(child, found_dead)
        self._spawn(self._standby_when_alive(child))
        while True:
            cause = await self._until_dead(child)
            if cause == "exit" and child.pid is not None and await _settle(
                self.manager.stopped_on_purpose(child.spec, child.pid)
            ):
                await self._until_back(child)
                continue
            if (cause == "exit" and child.spec.restart is Restart.TRANSIENT
                    and self._ended_cleanly(child)):
                self.manager.drop_standby(child.spec)
                child.state = "stopped"
                self.log.info("child_stopped", child=child.spec.name, child_pid=child.pid)
                return  # a transient child that finished is not restarted
            declared = self.now()
            if cause == "exit" and child.exit_status == procs.EXIT_NO_SPACE:
                cause = "no_space"
            last = child.watch.last_beat
            self.log.warning("peer_declared_dead", child=child.spec.name, child_pid=child.pid,
                             cause=cause, detection_ms=self._silence_ms(child),
                             last_seq=last.seq if last else None)
            if cause == "timeout":
                await self._kill(child)
            if self.os.stopping():
                child.state = "stopped"
                return
            child.recent = prune(child.recent, declared, self.policy.window_s)
            decision = decide(self.policy, child.recent, declared)
            if cause == "no_space":
                # Its filesystem is full: not a crash loop to give up on. Try again at
                # the longest backoff until there is room (it starts, or exits 4 again).
                decision = Decision("restart", self.policy.backoff_max_ms / 1000,
                                    decision.restarts_in_window)
            if decision.action == "give_up":
                self.manager.drop_standby(child.spec)
                child.state = "gave_up"
                self.log.error("gave_up", child=child.spec.name,
                               restarts_in_window=decision.restarts_in_window,
                               window_s=self.policy.window_s)
                if self.on_gave_up:
                    await self.on_gave_up(child)
                return
            child.state = "restarting"
            self.log.info("restarting", child=child.spec.name, cause=cause,
                          delay_ms=round(decision.delay_s * 1000))
            await asyncio.sleep(decision.delay_s)
            if self.os.stopping():
                child.state = "stopped"
                return
            await self._start(child)
            self._restarted(child, declared, counted=cause != "no_space")
            self._spawn(self._standby_when_alive(child))

    def _silence_ms(self, child: Child) -> int:
        """How long we had heard nothing valid from the child when we declared it dead."""
        now = self.now_ms()
        if child.watch.accepted == child.beats_at_start:  # not one beat since its start
            return now - child.started_ms
        return child.watch.timeout_ms - child.watch.remaining_ms(now)

    async def _until_dead(self, child: Child) -> str:
        """'exit' when the process ends, 'timeout' when its heartbeats stop,
        'start_timeout' when a start never produced a process."""
        child.exit_status = None
        if child.pid is None:
            return "start_timeout"
        exited = asyncio.ensure_future(self.os.wait_exit(child.pid, child.started))
        try:
            while True:
                now = self.now_ms()
                if child.watch.accepted == child.beats_at_start:
                    # Not a beat yet from this process: it gets longer (imports, replay),
                    # and we look again soon so the short timeout applies once it beats.
                    remaining = child.started_ms + self.start_timeout_ms - now
                    wait_ms = min(remaining, STARTING_POLL_MS)
                else:
                    remaining = wait_ms = child.watch.remaining_ms(now)
                if remaining <= 0:
                    return "timeout"
                done, _ = await asyncio.wait({exited}, timeout=wait_ms / 1000)
                if done:
                    child.exit_status = exited.result()
                    return "exit"
                late = self.now_ms() - now - wait_ms
                if late > self.timeout_ms:
                    # We were frozen ourselves (SIGSTOP, a stalled host): the silence
                    # is ours, not the child's. Give it a fresh timeout.
                    self.log.warning("supervisor_stalled", child=child.spec.name,
                                     stalled_ms=late)
                    child.watch.reset(self.now_ms())
        finally:
            exited.cancel()

    async def _kill(self, child: Child) -> None:
        """SIGKILL a hung child, only if its pid still names the process we watched."""
        assert child.pid is not None
        rec = PidRecord(child.pid, child.started or 0)
        if self.os.signal(rec, signal.SIGKILL):
            self.log.info("child_killed", child=child.spec.name, child_pid=child.pid,
                          signal="SIGKILL")
            try:
                async with asyncio.timeout(5):
                    await self.os.wait_exit(child.pid, child.started)
            except TimeoutError:
                self.log.error("child_unkillable", child=child.spec.name, child_pid=child.pid)

    async def _report_restarted(self, child: Child, declared: float) -> None:
        """Log `restarted` once the new process proves alive with a valid heartbeat."""
        if not await self._first_beat(child):
            return  # it died again meanwhile; _keep reports that
        self.log.info("restarted", child=child.spec.name, child_pid=child.pid,
                      restarts=child.restarts,
                      recovery_ms=round((self.now() - declared) * 1000, 1))

    def forget(self, name: str) -> Child | None:
        """Stop watching a child (it will not be restarted); the process is untouched."""
        child = self.children.pop(name, None)
        self.watches.pop(name, None)
        if child is not None and child.task is not None:
            child.task.cancel()
        return child

    async def stop(self, name: str) -> None:
        """Forget a child, then end it: SIGTERM, and SIGKILL if it has not gone within its
        child spec's shutdown time."""
        child = self.forget(name)
        if child is not None:
            self.manager.drop_standby(child.spec)  # for good: nothing is to take over
        if child is None or child.pid is None:
            return
        child.state = "stopped"
        rec = PidRecord(child.pid, child.started or 0)
        self.os.signal(rec, signal.SIGTERM)
        try:
            async with asyncio.timeout(child.spec.shutdown_s):
                await self.os.wait_exit(child.pid, child.started)
        except TimeoutError:
            self.os.signal(rec, signal.SIGKILL)

    def status(self) -> list[dict[str, Any]]:
        return [c.status() for c in self.children.values()]

    async def close(self) -> None:
        for child in self.children.values():
            self.manager.drop_standby(child.spec)
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
