"""On a machine without `nc`, the lab's tests that need it skip and say why.

The meta-test runs them under a PATH that has every program but `nc` (and no netcat at
all): they must be reported as skipped, with the reason, and no lab is booted for them
(the fixture that needs `nc` comes first in their signatures).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NETCATS = {"nc", "netcat", "nc.openbsd", "nc.traditional", "ncat"}


def path_without_nc(bin_dir: Path) -> str:
    bin_dir.mkdir()
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not d or not os.path.isdir(d):
            continue
        for entry in Path(d).iterdir():
            link = bin_dir / entry.name
            if entry.name not in NETCATS and not link.exists() and not link.is_symlink():
                link.symlink_to(entry)
    return str(bin_dir)


def test_without_nc_the_lab_tests_that_chat_skip_with_the_reason(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": path_without_nc(tmp_path / "bin")}
    tests = [f"{HERE / 'test_systemd.py'}::{name}" for name in (
        "test_people_chat_through_nc", "test_stop_then_shutdown_leave_nothing_behind")]
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p",
                          "no:cacheprovider", *tests], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 skipped" in res.stdout, res.stdout
    assert "no nc (netcat-openbsd)" in res.stdout
