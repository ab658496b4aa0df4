"""`theychat soak --hosts 3` end to end: the seeded soak on a lab of three hosts (network
namespaces, an etcd member and a tree each), with whole hosts killed and cut off among
its faults, judged from the logs and transcripts alone. This is the short one CI runs."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.soak.test_soak import soak
from theychat.daemons.soak import plan as planning
from theychat.daemons.soak.lab import why_no_lab

# Seed 17 plans both host faults in 60 s (a host killed at 3 s, one cut off at 30 s)
# besides process faults of every kind on every host.
CI_SEED = 17


def test_a_sixty_second_soak_on_three_hosts_with_host_faults_passes(tmp_path: Path) -> None:
    reason = why_no_lab()
    if reason:
        pytest.skip(reason)
    report = tmp_path / "report"
    res = soak(report, "--hosts", "3", "--duration", "60", "--clients", "9",
               "--fault-every", "3", "--seed", str(CI_SEED), timeout=300)
    text = (report / "report.md").read_text() if (report / "report.md").exists() else ""
    assert res.returncode == 0, res.stdout + res.stderr + text
    assert text.startswith("# TheyChat soak: PASS")
    for check in ("| gaps | 0 | ok |", "| false suspicions | 0 | ok |",
                  "| every topic with a sequencer at the end | 2 of 2 | ok |"):
        assert check in text
    faults = [json.loads(x) for x in (report / "faults.jsonl").read_text().splitlines()]
    kinds = {f["kind"] for f in faults if f.get("t")}
    assert set(planning.HOST_KINDS) <= kinds and "kill" in kinds
    hosts = {t.split("/")[0] for f in faults if f["kind"] not in planning.HOST_KINDS
             and f["kind"] != "client_reset" for t in f["targets"]}
    assert len(hosts) == 3  # process faults on every host
    assert sorted(p.name for p in (report / "logs").iterdir()) == ["h0", "h1", "h2"]
    assert json.loads((report / "run.json").read_text())["hosts"] == ["h0", "h1", "h2"]
    # Nothing left behind: the lab's namespaces (named after its directory) and files.
    found = re.search(r"lab of 3 hosts in /tmp/(tc[0-9a-f]{6})-", res.stderr)
    assert found, res.stderr
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                check=False).stdout
    assert found[1] not in namespaces
    assert not list(Path("/tmp").glob(f"{found[1]}-*"))
