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
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from daemons import procs
from daemons.config import Supervision
from daemons.heartbeat import HeartbeatListener, PeerWatch, monotonic_ms
from daemons.paths import StatePaths
from daemons.policy import RestartPolicy, decide, prune

STARTING_POLL_MS = 20


@dataclass(frozen=True)
class ChildSpec:
    name: str  # daemon name, e.g. `server-monitor@rust`
    role: str
    topic: str | None
    args: list[str]  # python arguments: ["-m", "daemons.server", ...]


class ProcessManager(Protocol):
    def start(self, spec: ChildSpec) -> int:
        """Start the child detached and return its pid."""
        ...


class SpawnManager:
    """The default backend: a detached process of our own (its own session)."""

    def __init__(self, paths: StatePaths) -> None:
        self.paths = paths

    def start(self, spec: ChildSpec) -> int:
        return procs.spawn(spec.args, self.paths.stderr(spec.name))


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
        self.manager = manager or SpawnManager(paths)
        self.on_gave_up = on_gave_up
        self.children: dict[str, Child] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def stopping(self) -> bool:
        return self.paths.stopping.exists()

    def add(self, spec: ChildSpec) -> Child:
        watch = PeerWatch(spec.name, self.timeout_ms, monotonic_ms())
        self.listener.watches[spec.name] = watch
        child = Child(spec, watch)
        self.children[spec.name] = child
        self._tasks.append(asyncio.ensure_future(self._keep(child)))
        return child

    # -- one child's life ----------------------------------------------------------------

    def _adopt(self, child: Child) -> bool:
        rec = procs.read_pidfile(self.paths.pidfile(child.spec.name))
        if rec is None or not rec.alive():
            return False
        child.pid, child.started, child.state = rec.pid, rec.start_time, "running"
        self.log.info("child_adopted", child=child.spec.name, child_pid=rec.pid)
        return True

    def _start(self, child: Child) -> None:
        # A start that lost the race for the lock exits at once; the winner's pid file
        # names the process to watch instead.
        if not self._adopt(child):
            pid = self.manager.start(child.spec)
            child.pid, child.started, child.state = pid, procs.start_time(pid), "running"
            self.log.info("child_started", child=child.spec.name, child_pid=pid)
        child.beats_at_start = child.watch.accepted
        child.watch.reset(monotonic_ms())

    async def _keep(self, child: Child) -> None:
        self._start(child)
        while True:
            cause = await self._until_dead(child)
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
            self._start(child)
            child.restarts += 1
            child.recent.append(declared)
            self._tasks.append(asyncio.ensure_future(self._report_restarted(child, declared)))

    def _silence_ms(self, child: Child) -> int:
        """How long we had heard nothing valid from the child when we declared it dead."""
        return child.watch.timeout_ms - child.watch.remaining_ms(monotonic_ms())

    async def _until_dead(self, child: Child) -> str:
        """'exit' when the process ends, 'timeout' when its heartbeats stop."""
        assert child.pid is not None
        exited = asyncio.ensure_future(procs.wait_exit(child.pid, child.started))
        try:
            while True:
                now = monotonic_ms()
                starting = child.watch.accepted == child.beats_at_start
                # A (re)started child gets longer for its first beat: imports, WAL replay.
                grace = self.start_timeout_ms - self.timeout_ms if starting else 0
                remaining = child.watch.remaining_ms(now) + grace
                if remaining <= 0:
                    return "timeout"
                # Once it beats, sleep exactly until its watch would expire (a beat
                # meanwhile pushes that further); while it starts, look again soon so
                # the short timeout applies from its first beat on.
                wait_ms = min(remaining, STARTING_POLL_MS) if starting else remaining
                done, _ = await asyncio.wait({exited}, timeout=wait_ms / 1000)
                if done:
                    return "exit"
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
        deadline = time.monotonic() + self.start_timeout_ms / 1000
        while child.watch.accepted == child.beats_at_start and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if child.watch.accepted == child.beats_at_start:
            return  # it died again meanwhile; _keep reports that
        self.log.info("restarted", child=child.spec.name, child_pid=child.pid,
                      restarts=child.restarts,
                      recovery_ms=round((time.monotonic() - declared) * 1000, 1))

    def status(self) -> list[dict[str, Any]]:
        return [c.status() for c in self.children.values()]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
