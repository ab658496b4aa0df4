"""Keeps child daemons running: adopt or spawn each, watch it, restart it when it exits.

Children are OTP-style `permanent` and handled one_for_one: one child's death touches
no other. A restarted supervisor adopts the children that are still alive (their pid
files name them) instead of starting duplicates.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from daemons import procs
from daemons.paths import StatePaths


@dataclass(frozen=True)
class ChildSpec:
    name: str  # daemon name, e.g. `server-monitor@rust`
    role: str
    topic: str | None
    args: list[str]  # python arguments: ["-m", "daemons.server", ...]


@dataclass
class Child:
    spec: ChildSpec
    pid: int | None = None
    started: int | None = None  # /proc start time: the pid's identity
    since: float = field(default_factory=time.time)
    restarts: int = 0
    state: str = "starting"  # starting | running | restarting | stopped

    def status(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "role": self.spec.role,
            "topic": self.spec.topic,
            "pid": self.pid,
            "state": self.state,
            "restarts": self.restarts,
        }


class Supervisor:
    def __init__(
        self,
        paths: StatePaths,
        log: Any,
        restart_delay_s: float,
        on_restarted: Callable[[Child], None] | None = None,
    ) -> None:
        self.paths = paths
        self.log = log
        self.restart_delay_s = restart_delay_s
        self.children: dict[str, Child] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._on_restarted = on_restarted

    def stopping(self) -> bool:
        return self.paths.stopping.exists()

    def add(self, spec: ChildSpec) -> Child:
        child = Child(spec)
        self.children[spec.name] = child
        self._tasks.append(asyncio.ensure_future(self._keep(child)))
        return child

    def _adopt(self, child: Child) -> bool:
        rec = procs.read_pidfile(self.paths.pidfile(child.spec.name))
        if rec is None or not rec.alive():
            return False
        child.pid, child.started, child.state = rec.pid, rec.start_time, "running"
        self.log.info("child_adopted", child=child.spec.name, child_pid=rec.pid)
        return True

    def _spawn(self, child: Child) -> None:
        pid = procs.spawn(child.spec.args, self.paths.stderr(child.spec.name))
        child.pid, child.started, child.state = pid, procs.start_time(pid), "running"
        child.since = time.time()
        self.log.info("child_started", child=child.spec.name, child_pid=pid)

    async def _keep(self, child: Child) -> None:
        if not self._adopt(child):
            self._spawn(child)
        while True:
            assert child.pid is not None
            await procs.wait_exit(child.pid, child.started)
            if self.stopping():
                child.state = "stopped"
                self.log.info("child_exited", child=child.spec.name, child_pid=child.pid,
                              restart=False, reason="stopping")
                return
            self.log.info("child_exited", child=child.spec.name, child_pid=child.pid,
                          restart=True)
            child.state = "restarting"
            t0 = time.monotonic()
            await asyncio.sleep(self.restart_delay_s)
            if self.stopping():
                child.state = "stopped"
                return
            # A spawn that lost the race for the lock exits at once; the winner's pid
            # file names the process to watch instead.
            if not self._adopt(child):
                self._spawn(child)
            child.restarts += 1
            self.log.info("child_restarted", child=child.spec.name, child_pid=child.pid,
                          restarts=child.restarts,
                          ms=round((time.monotonic() - t0) * 1000, 1))
            if self._on_restarted:
                self._on_restarted(child)

    def status(self) -> list[dict[str, Any]]:
        return [c.status() for c in self.children.values()]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
