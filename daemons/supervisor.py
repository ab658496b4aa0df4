"""Keeps child daemons running, in Erlang/OTP's terms: permanent children, one_for_one,
a restart intensity (MaxR restarts in MaxT seconds) with short exponential backoff.

A child is declared dead when its pid exits (pidfd: at once) or when it sends no valid
heartbeat for `heartbeat.timeout_ms` (a hang: SIGSTOP, a deadlock). A hung child is
killed, after checking the pid is still the process we started, before it is replaced.
Decisions come from `policy.decide`; starting processes goes through a
`ProcessManager`, so another backend (systemd) changes how, not when.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from theychat.daemons import procs
from theychat.daemons.config import Supervision
from theychat.daemons.heartbeat import HeartbeatListener, PeerWatch, monotonic_ms
from theychat.daemons.paths import StatePaths
from theychat.daemons.policy import RestartPolicy, decide, prune

STARTING_POLL_MS = 20
PIDFILE_POLL_S = 0.01  # waiting for a child that systemd starts to write its pid file
T = TypeVar("T")


@dataclass(frozen=True)
class ChildSpec:
    name: str  # daemon name, e.g. `server-monitor@rust`
    role: str
    topic: str | None
    args: list[str]  # python arguments: ["-m", "theychat.daemons.server", ...]


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


# Roles whose restarts are worth an idle process each: a topic's clients wait for them.
STANDBY_ROLES = ("server",)


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
        if not self.warm_standby or spec.role not in STANDBY_ROLES:
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
        listener: HeartbeatListener,
        manager: ProcessManager | None = None,
        on_gave_up: Callable[[Child], Awaitable[None]] | None = None,
    ) -> None:
        self.paths = paths
        self.log = log
        self.policy = RestartPolicy(settings.max_restarts, settings.window_s,
                                    settings.backoff_initial_ms, settings.backoff_step_ms,
                                    settings.backoff_max_ms)
        self.timeout_ms = heartbeat_timeout_ms
        self.start_timeout_ms = max(settings.start_timeout_ms, heartbeat_timeout_ms)
        self.listener = listener
        self.manager = manager or SpawnManager(paths, settings.warm_standby)
        self.on_gave_up = on_gave_up
        self.children: dict[str, Child] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # running ones only: restarts add more

    def stopping(self) -> bool:
        return self.paths.stopping.exists()

    def add(self, spec: ChildSpec) -> Child:
        watch = PeerWatch(spec.name, self.timeout_ms, monotonic_ms())
        self.listener.watches[spec.name] = watch
        child = Child(spec, watch)
        self.children[spec.name] = child
        child.task = self._spawn(self._keep(child))
        return child

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _restarted(self, child: Child, declared: float) -> None:
        """Count a restart begun at `declared`, then follow the new process until it beats
        (`restarted`)."""
        child.restarts += 1
        child.recent.append(declared)
        self._spawn(self._report_restarted(child, declared))

    # -- one child's life ----------------------------------------------------------------

    def _adopt(self, child: Child) -> bool:
        rec = procs.read_pidfile(self.paths.pidfile(child.spec.name))
        if rec is None or not rec.alive():
            return False
        child.pid, child.started, child.state = rec.pid, rec.start_time, "running"
        self.log.info("child_adopted", child=child.spec.name, child_pid=rec.pid)
        return True

    async def _start(self, child: Child) -> None:
        # A start that lost the race for the lock exits at once; the winner's pid file
        # names the process to watch instead.
        if not self._adopt(child):
            before = procs.read_pidfile(self.paths.pidfile(child.spec.name))
            pid = await _settle(self.manager.start(child.spec))
            started = procs.start_time(pid) if pid is not None else None
            if pid is None:  # started by someone else (systemd): its pid file will tell
                rec = await self._new_incarnation(child, before, self.start_timeout_ms / 1000)
                pid, started = (rec.pid, rec.start_time) if rec else (None, None)
            child.pid, child.started, child.state = pid, started, "running"
            if pid is None:
                self.log.warning("child_start_timeout", child=child.spec.name,
                                 timeout_ms=self.start_timeout_ms)
            else:
                self.log.info("child_started", child=child.spec.name, child_pid=pid)
        child.beats_at_start = child.watch.accepted
        child.started_ms = monotonic_ms()
        child.watch.reset(child.started_ms)

    async def _new_incarnation(self, child: Child, before: procs.PidRecord | None,
                               timeout_s: float | None) -> procs.PidRecord | None:
        """The process the child's pid file names once it is newer than `before` (or is
        `before`, alive); None if none appears within `timeout_s` (None: no limit). A
        newer one that already died is returned too: its exit is then seen at once."""
        last = 0 if before is None else before.incarnation
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while deadline is None or time.monotonic() < deadline:
            rec = procs.read_pidfile(self.paths.pidfile(child.spec.name))
            if rec is not None and (rec.incarnation > last or (
                    rec.incarnation == last and rec.alive())):
                return rec
            await asyncio.sleep(PIDFILE_POLL_S)
        return None

    async def _until_back(self, child: Child) -> None:
        """The child was stopped on purpose: no restart; watch it again once it is back."""
        child.state = "stopped"
        self.log.info("child_stopped", child=child.spec.name, child_pid=child.pid)
        gone = procs.read_pidfile(self.paths.pidfile(child.spec.name))
        rec = await self._new_incarnation(child, gone, None)
        assert rec is not None  # no deadline: only a new process ends the wait
        child.pid, child.started, child.state = rec.pid, rec.start_time, "running"
        self.log.info("child_adopted", child=child.spec.name, child_pid=rec.pid)
        child.beats_at_start = child.watch.accepted
        child.started_ms = monotonic_ms()
        child.watch.reset(child.started_ms)

    def _found_dead(self, child: Child) -> float | None:
        """At our own start: a child whose last process died without a clean stop (it
        died with us, or while we were down) is declared dead like any other, so its
        restart is counted and logged; returns when it was declared."""
        rec = procs.read_pidfile(self.paths.pidfile(child.spec.name))
        if rec is None or rec.stopped or rec.alive() or self.stopping():
            return None
        self.log.warning("peer_declared_dead", child=child.spec.name, child_pid=rec.pid,
                         cause="found_dead", detection_ms=None, last_seq=None)
        self.log.info("restarting", child=child.spec.name, cause="found_dead", delay_ms=0)
        return time.monotonic()

    async def _first_beat(self, child: Child) -> bool:
        """Wait (bounded) for the first valid beat of the child's current process; False
        if none came, or if that process was replaced meanwhile (its successor's waits
        are their own)."""
        pid, since = child.pid, child.beats_at_start
        deadline = time.monotonic() + self.start_timeout_ms / 1000
        while child.pid == pid and child.watch.accepted == since:
            if time.monotonic() > deadline:
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
            declared = time.monotonic()
            last = child.watch.last_beat
            self.log.warning("peer_declared_dead", child=child.spec.name, child_pid=child.pid,
                             cause=cause, detection_ms=self._silence_ms(child),
                             last_seq=last.seq if last else None)
            if cause == "timeout":
                await self._kill(child)
            if self.stopping():
                child.state = "stopped"
                return
            child.recent = prune(child.recent, declared, self.policy.window_s)
            decision = decide(self.policy, child.recent, declared)
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
            if self.stopping():
                child.state = "stopped"
                return
            await self._start(child)
            self._restarted(child, declared)
            self._spawn(self._standby_when_alive(child))

    def _silence_ms(self, child: Child) -> int:
        """How long we had heard nothing valid from the child when we declared it dead."""
        now = monotonic_ms()
        if child.watch.accepted == child.beats_at_start:  # not one beat since its start
            return now - child.started_ms
        return child.watch.timeout_ms - child.watch.remaining_ms(now)

    async def _until_dead(self, child: Child) -> str:
        """'exit' when the process ends, 'timeout' when its heartbeats stop,
        'start_timeout' when a start never produced a process."""
        if child.pid is None:
            return "start_timeout"
        exited = asyncio.ensure_future(procs.wait_exit(child.pid, child.started))
        try:
            while True:
                now = monotonic_ms()
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
                    return "exit"
                late = monotonic_ms() - now - wait_ms
                if late > self.timeout_ms:
                    # We were frozen ourselves (SIGSTOP, a stalled host): the silence
                    # is ours, not the child's. Give it a fresh timeout.
                    self.log.warning("supervisor_stalled", child=child.spec.name,
                                     stalled_ms=late)
                    child.watch.reset(monotonic_ms())
        finally:
            exited.cancel()

    async def _kill(self, child: Child) -> None:
        """SIGKILL a hung child, only if its pid still names the process we watched."""
        assert child.pid is not None
        rec = procs.PidRecord(child.pid, child.started or 0)
        if procs.signal_process(rec, signal.SIGKILL):
            self.log.info("child_killed", child=child.spec.name, child_pid=child.pid,
                          signal="SIGKILL")
            try:
                async with asyncio.timeout(5):
                    await procs.wait_exit(child.pid, child.started)
            except TimeoutError:
                self.log.error("child_unkillable", child=child.spec.name, child_pid=child.pid)

    async def _report_restarted(self, child: Child, declared: float) -> None:
        """Log `restarted` once the new process proves alive with a valid heartbeat."""
        if not await self._first_beat(child):
            return  # it died again meanwhile; _keep reports that
        self.log.info("restarted", child=child.spec.name, child_pid=child.pid,
                      restarts=child.restarts,
                      recovery_ms=round((time.monotonic() - declared) * 1000, 1))

    def forget(self, name: str) -> Child | None:
        """Stop watching a child (it will not be restarted); the process is untouched."""
        child = self.children.pop(name, None)
        self.listener.watches.pop(name, None)
        if child is not None and child.task is not None:
            child.task.cancel()
        return child

    async def stop(self, name: str, timeout: float = 10.0) -> None:
        """Forget a child, then end it: SIGTERM, and SIGKILL if it does not go in time."""
        child = self.forget(name)
        if child is not None:
            self.manager.drop_standby(child.spec)  # for good: nothing is to take over
        if child is None or child.pid is None:
            return
        child.state = "stopped"
        rec = procs.PidRecord(child.pid, child.started or 0)
        procs.signal_process(rec, signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout):
                await procs.wait_exit(child.pid, child.started)
        except TimeoutError:
            procs.signal_process(rec, signal.SIGKILL)

    def status(self) -> list[dict[str, Any]]:
        return [c.status() for c in self.children.values()]

    async def close(self) -> None:
        for child in self.children.values():
            self.manager.drop_standby(child.spec)
        for t in list(self._tasks):
            t.cancel()
