"""What every daemon does the same way, top to bottom:

parse arguments -> load config -> prepare the state dir -> take the daemon's lock ->
write the pid file -> log `daemon_started` -> run the role's coroutine until SIGTERM ->
log `daemon_stopped`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from theychat.daemons import config, control, logs, ops, procs, systemd
from theychat.daemons.config import Config
from theychat.daemons.errors import TheyChatError
from theychat.daemons.heartbeat import (
    Beat,
    HeartbeatListener,
    HeartbeatSender,
    load_or_create_key,
    read_endpoint,
    write_endpoint,
)
from theychat.daemons.paths import StatePaths
from theychat.daemons.protocol import MAX_NAME, valid_name
from theychat.daemons.supervisor import Child, Supervisor
from theychat.daemons.tree import ChildSpec, DaemonId, Role, command, spec_of

HEARTBEAT_HOST = "127.0.0.1"  # supervisors and children share a host today


@dataclass
class Daemon:
    id: DaemonId
    cfg: Config
    paths: StatePaths
    config_path: str | None
    log: Any
    incarnation: int
    started_at: float = field(default_factory=time.time)
    state: str = "starting"
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    failed: str | None = None  # why we stop on our own (a crash for our supervisor)
    failed_status: int = 1  # the exit status that tells our supervisor why
    key: bytes = b""
    listener: HeartbeatListener | None = None
    sender: HeartbeatSender | None = None
    notifier: systemd.Notifier = field(default_factory=systemd.Notifier)

    @property
    def role(self) -> Role:
        return self.id.role

    @property
    def topic(self) -> str | None:
        return self.id.topic

    @property
    def name(self) -> str:
        return self.id.name

    def child_spec(self, child: DaemonId) -> ChildSpec:
        """How to start another daemon of this tree, on our state dir and config."""
        return ChildSpec(child, command(child, str(self.paths.root), self.config_path))

    async def listen(self) -> HeartbeatListener:
        """Receive heartbeats from our children; publish where they should send them."""
        def rejected(reason: str, addr: Any) -> None:
            self.log.warning("heartbeat_rejected", reason=reason, peer=str(addr))

        listener = HeartbeatListener(self.key, on_reject=rejected)
        port = await listener.start(HEARTBEAT_HOST)
        write_endpoint(self.paths.heartbeat(self.name), HEARTBEAT_HOST, port)
        self.listener = listener
        return listener

    def supervisor(self, on_gave_up: Callable[[Child], Awaitable[None]] | None = None
                   ) -> Supervisor:
        assert self.listener is not None, "listen() first"
        manager = (systemd.SystemdManager(self.log)
                   if self.cfg.supervision.backend == "systemd" else None)
        return Supervisor(self.paths, self.log, self.cfg.supervision,
                          self.cfg.heartbeat.timeout_ms, self.listener.watches,
                          manager=manager, on_gave_up=on_gave_up)

    def _start_heartbeats(self) -> None:
        supervisor = self.id.supervisor
        targets = [self.paths.heartbeat(supervisor.name)] if supervisor else []
        template = Beat(self.role, self.topic, self.name, os.getpid(), self.incarnation, 0, 0)

        def endpoints() -> list[tuple[str, int]]:
            return [ep for path in targets if (ep := read_endpoint(path)) is not None]

        # Each beat also pings systemd's watchdog: a stuck event loop stops both.
        self.sender = HeartbeatSender(template, self.key, self.cfg.heartbeat.interval_ms,
                                      endpoints, on_tick=self.notifier.tick)
        self.sender.start()

    def status(self) -> dict[str, Any]:
        rejected = self.listener.rejections.as_dict() if self.listener else {}
        return {
            "name": self.name,
            "role": self.role,
            "topic": self.topic,
            "pid": os.getpid(),
            "state": self.state,
            "incarnation": self.incarnation,
            "uptime_s": round(time.time() - self.started_at, 1),
            "heartbeats_rejected": rejected,
        }

    def fail(self, reason: str, status: int = 1) -> None:
        """Stop now and exit non-zero (`status`): our supervisor restarts us, we replay."""
        if self.failed is None:
            self.failed, self.failed_status = reason, status
            self.log.error("daemon_failed", error=reason)
        self.stop.set()

    def ready(self, **fields: Any) -> None:
        """Initialisation is over: say so, and start proving we are alive."""
        self.state = "ready"
        self._start_heartbeats()
        self.log.info("daemon_ready", **fields)
        # No-ops unless systemd started us with Type=notify (NOTIFY_SOCKET set): READY=1
        # with a STATUS= line kept fresh from our own `status` reply, and a watchdog
        # never shorter than our supervisor's own hang detection needs.
        self.notifier.at_least(4 * self.cfg.heartbeat.timeout_ms / 1000)
        self.notifier.ready(self._status_line(fields))
        self.notifier.follow(self._own_status, self._status_line)

    def _status_line(self, facts: dict[str, Any]) -> str:
        return systemd.describe(self.role, self.topic, self.incarnation, self.started_at, facts)

    async def _own_status(self) -> dict[str, Any] | None:
        try:
            return control.check(await control.request(self.paths.control(self.name),
                                                       ops.Status().message(), timeout=1.0))
        except TheyChatError:
            return None


def _fail(name: str, text: str, code: int) -> int:
    # stderr goes to logs/NAME.stderr, which `theychat up` shows when a start fails (and
    # which a full disk may refuse: the exit status says it all the same).
    with contextlib.suppress(OSError):
        print(f"{name}: {text}", file=sys.stderr, flush=True)
    return code


LOCK_GRACE_S = 2.0


def run(role: Role, body: Callable[[Daemon], Awaitable[None]],
        argv: list[str] | None = None) -> int:
    spec = spec_of(role)
    parser = argparse.ArgumentParser(prog=f"python -m {spec.module}", description=spec.summary)
    parser.add_argument("--config")
    parser.add_argument("--state-dir")
    parser.add_argument("--topic", required=spec.per_topic,
                        help="its topic" if spec.per_topic else argparse.SUPPRESS)
    parser.add_argument("--standby", action="store_true",
                        help="start, then wait for the supervisor's go on fd 3 to take over")
    args = parser.parse_args(argv)
    if args.topic is not None and not (spec.per_topic and valid_name(args.topic)):
        parser.error(f"--topic: expected a topic name (1-{MAX_NAME} of A-Z a-z 0-9 _ -)"
                     if spec.per_topic else f"--topic: {role} has no topic")
    me = DaemonId(role, args.topic)
    os.umask(0o077)  # logs, pid files and sockets are private to the user
    name = me.name
    try:
        cfg = config.load(args.config)
        paths = StatePaths(Path(args.state_dir) if args.state_dir else cfg.resolved_state_dir())
        paths.ensure()
    except TheyChatError as e:
        return _fail(name, str(e), procs.EXIT_CONFIG)
    if paths.stopping.exists():
        return 0  # `theychat down` is under way: starting now would only race it
    lock_fd = os.open(paths.lockfile(name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if args.standby and (not procs.wait_for_go(procs.STANDBY_FD) or paths.stopping.exists()):
        return 0  # our supervisor is gone, or TheyChat is stopping: nothing to take over
    # A standby is told to go the moment its predecessor is seen dead, which can be a
    # moment before the kernel has let go of that process's lock: wait that moment out.
    if not procs.lock(lock_fd, LOCK_GRACE_S if args.standby else 0.0):
        return _fail(name, "already running (its lock is held)", procs.EXIT_LOCKED)
    previous = procs.read_pidfile(paths.pidfile(name))
    incarnation = previous.incarnation + 1 if previous else 1
    log = logs.configure(paths.log(name), cfg.log.level, role=role, topic=args.topic,
                         pid=os.getpid(), incarnation=incarnation)
    try:
        procs.write_pidfile(paths.pidfile(name), incarnation)
    except OSError as e:
        log.error("daemon_failed", error=f"cannot write its pid file: {e.strerror or e}")
        status = procs.EXIT_NO_SPACE if procs.no_space(e) else 1
        return _fail(name, f"cannot write its pid file: {e.strerror or e}", status)
    d = Daemon(me, cfg, paths, args.config and os.path.abspath(args.config), log, incarnation)
    try:
        d.key = load_or_create_key(paths.heartbeat_key)
    except TheyChatError as e:
        log.error("daemon_failed", error=str(e))
        return _fail(name, str(e), 1)
    log.info("daemon_started", state_dir=str(paths.root))
    try:
        asyncio.run(_main(d, body))
        if d.failed:
            return _fail(name, d.failed, d.failed_status)
        # A clean end: a supervisor that finds us gone at its own start need not
        # declare us dead.
        procs.write_pidfile(paths.pidfile(name), incarnation, stopped=True)
    except TheyChatError as e:
        log.error("daemon_failed", error=str(e))
        return _fail(name, str(e), procs.EXIT_NO_SPACE if procs.no_space(e) else 1)
    except OSError as e:
        if not procs.no_space(e):
            log.exception("daemon_crashed", error=repr(e))
            return 1
        log.error("daemon_failed", error=f"no space left: {e}")
        return _fail(name, f"no space left: {e}", procs.EXIT_NO_SPACE)
    except Exception as e:
        log.exception("daemon_crashed", error=repr(e))
        return 1
    finally:
        # The pid file stays: its incarnation counts restarts, and `alive()` checks the
        # start time, so a stale one names no one. `theychat down` clears them.
        log.info("daemon_stopped")
    return 0


async def _main(d: Daemon, body: Callable[[Daemon], Awaitable[None]]) -> None:
    loop = asyncio.get_running_loop()
    d.stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, d.stop.set)
    try:
        await body(d)
    finally:
        d.notifier.stopping()
        if d.sender:
            d.sender.stop()
        if d.listener:
            d.listener.close()
