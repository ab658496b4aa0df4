"""`theychat soak` end to end: a real tree, real faults, judged from its logs.

The first test is the soak CI runs: 60 seconds, a fixed seed, every kind of fault. The
second proves the soak can fail: the same judge, run against a copy of TheyChat whose
write-ahead log loses its last record on replay, must find what that breaks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.checkout import copy_tree, put_first
from tests.process.conftest import processes_of
from theychat.daemons.soak import plan as planning

ROOT = Path(__file__).resolve().parents[2]
CI_SEED = 7


def soak(report: Path, *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
         timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "theychat.daemons", "soak", "--report",
                           str(report), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def tree_processes(report: Path) -> list[str]:
    """Daemons of the soak's tree still running (every daemon_started line names its
    state dir)."""
    events = map(json.loads, (report / "logs" / "router.log").read_text().splitlines())
    state = next(ev["state_dir"] for ev in events if ev.get("event") == "daemon_started")
    return processes_of(Path(state))


def test_a_sixty_second_soak_with_every_kind_of_fault_passes(tmp_path: Path) -> None:
    report = tmp_path / "report"
    res = soak(report, "--duration", "60", "--clients", "12", "--fault-every", "2",
               "--seed", str(CI_SEED))
    text = (report / "report.md").read_text() if (report / "report.md").exists() else ""
    assert res.returncode == 0, res.stdout + res.stderr + text
    assert text.startswith("# TheyChat soak: PASS")
    for check in ("| gaps | 0 | ok |", "| duplicates shown | 0 | ok |",
                  "| false suspicions | 0 | ok |"):
        assert check in text
    faults = [json.loads(x) for x in (report / "faults.jsonl").read_text().splitlines()]
    assert {f["kind"] for f in faults} == set(planning.KINDS)
    assert (report / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tree_processes(report) == []


def broken_copy(dest: Path) -> Path:
    """TheyChat with a write-ahead log that forgets its last record when replayed."""
    copy_tree(dest)
    wal = dest / "theychat" / "daemons" / "wal.py"
    good = "replay = Replay(snapshot, records, "
    src = wal.read_text()
    assert good in src, "wal.py changed: update the sabotage"
    wal.write_text(src.replace(good, "replay = Replay(snapshot, records[:-1], "))
    return dest


def test_the_soak_fails_a_build_whose_log_loses_its_last_record(tmp_path: Path) -> None:
    seed, duration, every = 3, 20.0, 2.0
    planned = planning.plan(seed, duration, every, ["general", "random"], [], ("kill",))
    assert any(f.targets[0].startswith("server@") for f in planned)  # a server dies
    code = broken_copy(tmp_path / "broken")
    report = tmp_path / "report"
    env = put_first(code, {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    res = soak(report, "--duration", str(duration), "--clients", "6", "--fault-every",
               str(every), "--seed", str(seed), "--faults", "kill", cwd=code, env=env)
    text = (report / "report.md").read_text()
    assert res.returncode == 1, res.stdout + res.stderr
    assert text.startswith("# TheyChat soak: FAIL")
    # The restarted server reuses the forgotten message's sequence number: two senders
    # are acknowledged the same number, and members never see one of the two lines.
    assert "| sequence numbers acknowledged twice | 0 | ok |" not in text
    assert "| gaps | 0 | ok |" not in text
    assert tree_processes(report) == []


def test_a_soak_takes_the_users_config_and_judges_without_matplotlib(tmp_path: Path) -> None:
    """`--config` with one ordinary key is accepted (and used); without matplotlib the
    report is still written, says what the timeline needs, and the verdict decides."""
    conf = tmp_path / "mine.yaml"
    conf.write_text("history:\n  size: 77\ntopics: [lounge]\n")
    hidden = tmp_path / "no-matplotlib" / "matplotlib"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = put_first(hidden.parent, {**os.environ})
    report = tmp_path / "report"
    res = soak(report, "--duration", "12", "--clients", "2", "--fault-every", "2",
               "--faults", "client_reset", "--config", str(conf), env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    text = (report / "report.md").read_text()
    assert text.startswith("# TheyChat soak: PASS")
    assert "topics lounge" in text  # the user's config, not the default topics
    assert "it needs matplotlib (pip install 'theychat[soak]')" in text
    assert "it needs matplotlib" in res.stderr
    assert not (report / "timeline.png").exists()
    assert tree_processes(report) == []
