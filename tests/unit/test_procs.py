"""Process helpers: a standby waits a moment for its dead predecessor's lock, and spawned
children keep a stable Python path."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from theychat.daemons import procs


def test_the_lock_is_taken_once_the_holder_lets_go_within_the_grace(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    holder = os.open(path, os.O_RDWR | os.O_CREAT)
    waiter = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        assert procs.lock(waiter, 0.0) is False  # held: a plain start fails at once
        threading.Timer(0.1, os.close, args=(holder,)).start()
        assert procs.lock(waiter, 2.0) is True
    finally:
        os.close(waiter)


def test_a_lock_held_beyond_the_grace_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    holder = os.open(path, os.O_RDWR | os.O_CREAT)
    waiter = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        assert procs.lock(waiter, 0.05) is False
    finally:
        os.close(holder)
        os.close(waiter)


def test_a_spawned_daemon_finds_our_package_without_help_on_its_path(tmp_path: Path) -> None:
    """Children import `theychat` the way we do (installed or editable): spawn() adds
    nothing to PYTHONPATH, and passes the caller's environment on as it is."""
    out = tmp_path / "out"
    old = os.environ.pop("PYTHONPATH", None)
    try:
        pid = procs.spawn(["-c", "import os, theychat.daemons.procs as p; "
                                 "print(p.__file__, os.environ.get('PYTHONPATH'))"], out)
        os.waitpid(pid, 0)
    finally:
        if old is not None:
            os.environ["PYTHONPATH"] = old
    assert out.read_text().split() == [procs.__file__, "None"]
