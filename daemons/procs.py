"""OS process plumbing: detached spawns, pid files, identity checks and pidfd watches.

A pid alone is not an identity (pids are reused), so every pid we keep travels with the
process start time from /proc; `alive()` checks both.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# How a daemon's process ends, for its supervisor (and systemd's RestartPreventExitStatus).
EXIT_CONFIG = 2  # the config is invalid: restarting cannot fix it
EXIT_LOCKED = 3  # another incarnation holds the lock: not a failure to restart for
EXIT_NO_SPACE = 4  # its state's filesystem is full: restart when there is room again
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def no_space(e: BaseException | None) -> bool:
    """Is this the error of a full filesystem (or a used-up quota)?"""
    while e is not None:
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return True
        e = e.__cause__ or e.__context__
    return False


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a pid, or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def start_time(pid: int) -> int | None:
    st = proc_stat(pid)
    return st[1] if st else None


def alive(pid: int, started: int | None = None) -> bool:
    """True if `pid` runs (not a zombie) and, when given, started at `started`."""
    st = proc_stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    return started is None or st[1] == started


@dataclass(frozen=True)
class PidRecord:
    pid: int
    start_time: int
    incarnation: int = 1
    stopped: bool = False  # the process ended cleanly (SIGTERM, `theychat down`, /drop)

    def alive(self) -> bool:
        return alive(self.pid, self.start_time)


def write_pidfile(path: Path, incarnation: int, stopped: bool = False) -> PidRecord:
    pid = os.getpid()
    rec = PidRecord(pid, start_time(pid) or 0, incarnation, stopped)
    tmp = path.with_suffix(f".tmp{pid}")
    tmp.write_text(json.dumps(rec.__dict__))
    os.replace(tmp, path)
    return rec


def read_pidfile(path: Path) -> PidRecord | None:
    try:
        data = json.loads(path.read_text())
        return PidRecord(int(data["pid"]), int(data["start_time"]), int(data["incarnation"]),
                         data.get("stopped") is True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


# Where a standby finds the read end of the pipe its supervisor says "go" on.
STANDBY_FD = 3


def spawn(args: list[str], stderr_path: Path, go_fd: int | None = None) -> int:
    """Start `python ARGS...` in its own session: no death of ours takes it along.

    stdin is /dev/null; stdout and stderr go to `stderr_path`, where a crash that got
    past the logger (or a message for `theychat up` to show) ends up. `go_fd`, if given,
    becomes the child's fd STANDBY_FD (a standby's pipe from its supervisor).
    """
    # The same interpreter and environment find the same `theychat` package, installed,
    # editable or not: nothing is added to the import path here.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(stderr_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    if go_fd is not None:
        actions.append((os.POSIX_SPAWN_DUP2, go_fd, STANDBY_FD))
    return os.posix_spawn(
        sys.executable, [sys.executable, *args], env, file_actions=actions, setsid=True
    )


def reap(pid: int) -> int | None:
    """Collect the exit status of a child of ours (a signal: minus its number); None for
    a process we adopted (not ours) or one still running."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        return None
    return os.waitstatus_to_exitcode(status) if done == pid else None


async def wait_exit(pid: int, started: int | None) -> int | None:
    """Return when the process exits (pidfd: within a millisecond of its death), with its
    exit status if it was a child of ours."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return reap(pid)
    try:
        # pidfd_open may have caught a reused pid: check identity now the fd pins it.
        if alive(pid, started):
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()

            def exited() -> None:
                if not fut.done():
                    fut.set_result(None)

            loop.add_reader(pidfd, exited)
            try:
                await fut
            finally:
                loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)
    return reap(pid)


def signal_process(rec: PidRecord, sig: int) -> bool:
    """Send `sig` only if the pid still belongs to the process we recorded."""
    if not rec.alive():
        return False
    try:
        pidfd = os.pidfd_open(rec.pid)
    except ProcessLookupError:
        return False
    try:
        if not alive(rec.pid, rec.start_time):
            return False
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)


def lock(fd: int, grace_s: float) -> bool:
    """Take an exclusive flock on `fd`, trying for up to `grace_s` seconds."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)


def wait_for_go(fd: int) -> bool:
    """A standby's wait: True once its supervisor says go (it decided to restart the
    child, which is dead), False when the pipe closes without a word: the supervisor is
    gone, and its successor decides for itself."""
    try:
        while True:
            try:
                return os.read(fd, 1) == b"g"
            except InterruptedError:
                continue
    finally:
        os.close(fd)
