"""The failover benchmark (tests/bench/failover.py), run as a subprocess with `--json`
and summed up for the benchmark report: outage per daemon and signal, over runs.

    python -m tests.bench.failover_summary [--runs N] [--rounds R] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from tests.bench.common import (
    ROOT,
    BenchError,
    Target,
    fmt,
    median,
    pct,
    progress,
    stop_on_sigterm,
)

TARGET_SERVER_KILL_P99_MS = 100.0  # issue 6: "client-visible outage ... p99 under 100 ms"
RUN_TIMEOUT_S = 900.0


def run_once(rounds: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "tests.bench.failover", "--rounds", str(rounds), "--json"]
    progress(f"failover: {' '.join(cmd[1:])}")
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                             check=False, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"the failover benchmark took over {RUN_TIMEOUT_S:g} s") from e
    tail = "\n".join(res.stderr.strip().splitlines()[-15:])
    try:
        doc: dict[str, Any] = json.loads(res.stdout)
    except ValueError:
        raise BenchError(f"the failover benchmark exited {res.returncode}:\n{tail}") from None
    # Exit status 1 with a report: a round failed or a line was lost or duplicated. The
    # figures stand, but the run is an error (see `errors`).
    doc["exit_status"] = res.returncode
    return doc


def errors(docs: Sequence[dict[str, Any]]) -> list[str]:
    out = []
    for i, d in enumerate(docs, 1):
        if d.get("exit_status") == 0:
            continue
        lost = d.get("deliveries", {})
        failed = [f"round {r['index']} {r['daemon']} {r['signal']}: {r['error']}"
                  for r in d.get("rounds", []) if r.get("error")]
        out.append(f"failover run {i} exited {d.get('exit_status')}: lines lost "
                   f"{lost.get('lines_missing', [])}, duplicated "
                   f"{lost.get('lines_duplicated', [])}, seqs missing "
                   f"{lost.get('missing_seq_list', [])}"
                   + (f"; aborted: {d['aborted']}" if d.get("aborted") else "")
                   + "".join(f"; {f}" for f in failed))
    return out


def summarize(docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (daemon, signal): the median over runs of each run's median, and the p99 and
    max over every round of every run (nearest rank)."""
    groups: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = {}
    for i, doc in enumerate(docs):
        for r in doc["rounds"]:
            if r.get("error") is None:
                groups.setdefault((r["daemon"], r["signal"]), []).append((i, r))
    out = []
    for (daemon, sig), rs in groups.items():
        row: dict[str, Any] = {"daemon": daemon, "signal": sig, "rounds": len(rs)}
        for key in ("detection_ms", "restarted_ms", "outage_ms"):
            per_run = [median([r[key] for j, r in rs if j == i and r[key] is not None])
                       for i in range(len(docs))]
            values = [r[key] for _, r in rs if r[key] is not None]
            row[key] = median([v for v in per_run if v is not None])
            row[key.replace("_ms", "_p99_ms")] = pct(values, 99)
            row[key.replace("_ms", "_max_ms")] = max(values, default=None)
        out.append(row)
    return out


def targets(rows: Sequence[dict[str, Any]]) -> list[Target]:
    kills = [r for r in rows if r["daemon"].startswith("server@") and r["signal"] == "SIGKILL"]
    if not kills:
        return []
    r = kills[0]
    v = r["outage_p99_ms"]
    return [Target(f"failover: client-visible outage after SIGKILL of a server, p99 < "
                   f"{TARGET_SERVER_KILL_P99_MS:g} ms",
                   f"p99 {fmt(v)} ms over {r['rounds']} kills (median {fmt(r['outage_ms'])} "
                   "ms)", v is not None and v < TARGET_SERVER_KILL_P99_MS)]


def table(rows: Sequence[dict[str, Any]], runs: int, rounds: int) -> str:
    head = (f"{'daemon':<22}{'signal':<9}{'n':>4} | {'detect':>7} | {'restarted':>9} | "
            f"{'outage med':>10}{'p99':>7}{'max':>7}")
    lines = [f"failover (tests/bench/failover.py --rounds {rounds}, {runs} run(s)); ms from "
             "the signal; medians of the runs' medians, p99/max over every round",
             head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['daemon']:<22}{r['signal']:<9}{r['rounds']:>4} | "
                     f"{fmt(r['detection_ms']):>7} | {fmt(r['restarted_ms']):>9} | "
                     f"{fmt(r['outage_ms']):>10}{fmt(r['outage_p99_ms']):>7}"
                     f"{fmt(r['outage_max_ms']):>7}")
    return "\n".join(lines)


def run(runs: int, rounds: int) -> dict[str, Any]:
    docs = [run_once(rounds) for _ in range(runs)]
    rows = summarize(docs)
    return {"benchmark": "failover", "runs": runs, "rounds": rounds, "summary": rows,
            "errors": errors(docs),
            "quiet_gaps": [d["quiet_gaps"] for d in docs],
            "failover_targets": [d["targets"] for d in docs],
            "raw": docs, "targets": [t.__dict__ for t in targets(rows)]}


def main(argv: Sequence[str] | None = None) -> int:
    stop_on_sigterm()
    p = argparse.ArgumentParser(prog="python -m tests.bench.failover_summary")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    try:
        doc = run(args.runs, args.rounds)
    except BenchError as e:
        print(f"failover: FAILED: {e}", file=sys.stderr)
        return 1
    print(table(doc["summary"], args.runs, args.rounds))
    print("targets:")
    for t in doc["targets"]:
        print(Target(**t).line())
    for error in doc["errors"]:
        print(f"FAILED: {error}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 1 if doc["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
