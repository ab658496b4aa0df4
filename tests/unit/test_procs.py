"""Process helpers: a standby waits a moment for its dead predecessor's lock, and spawned
children keep a stable Python path."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from daemons import procs


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


def test_children_of_children_do_not_grow_the_python_path(tmp_path: Path) -> None:
    root = procs._CODE_ROOT
    out = tmp_path / "out"
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([root, "/elsewhere", "/elsewhere", root])
    try:
        pid = procs.spawn(["-c", "import os; print(os.environ['PYTHONPATH'])"], out)
        os.waitpid(pid, 0)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    assert out.read_text().strip() == os.pathsep.join([root, "/elsewhere"])
