"""Every benchmark of issue 6, one command:

    python -m tests.bench [--quick] [--runs N] [--json FILE] [--only NAME ...]

fan-out (wal.fsync batch, always, never), latency at a fixed load, memory per idle
connection and failover, each on a tree of its own; then every table and every target.
Figures are medians of `--runs` runs (default 3; `--quick`: 1 run, shorter, fan-out with
wal.fsync batch only, failover with one round). Exit status 1 if any benchmark failed
(a lost delivery is a failure, not a figure), 130 if interrupted; a missed target does
not change it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from tests.bench import failover_summary, fanout, latency, memory
from tests.bench.common import (
    BENCH_OVERRIDES,
    BenchError,
    Target,
    machine,
    progress,
    stop_on_sigterm,
)

NAMES = ("fanout", "latency", "memory", "failover")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench",
                                description="TheyChat benchmarks (issue 6).")
    p.add_argument("--quick", action="store_true",
                   help="1 run of each, shorter (about 2 minutes)")
    p.add_argument("--runs", type=int, default=3, help="runs per figure (default 3)")
    p.add_argument("--only", nargs="+", choices=NAMES, default=list(NAMES), metavar="NAME",
                   help=f"run only these ({' '.join(NAMES)})")
    p.add_argument("--rounds", type=int, default=3,
                   help="failover rounds per daemon and signal, per run (default 3)")
    p.add_argument("--json", metavar="FILE", help="write every result as JSON to FILE")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.rounds = 1, 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    stop_on_sigterm()
    args = parse_args(argv)
    runs = ["--runs", str(args.runs)] + (["--quick"] if args.quick else [])
    docs: dict[str, Any] = {"machine": machine(), "config_overrides": BENCH_OVERRIDES,
                            "argv": sys.argv[1:]}
    tables: list[str] = []
    failed: list[str] = []
    steps: dict[str, Callable[[], tuple[dict[str, Any], str]]] = {
        "fanout": lambda: _fanout(runs),
        "latency": lambda: _latency(runs),
        "memory": lambda: _memory(runs),
        "failover": lambda: _failover(args.runs, args.rounds),
    }
    started = time.monotonic()
    try:
        for name in args.only:
            progress(f"=== {name}")
            try:
                doc, text = steps[name]()
            except BenchError as e:
                failed.append(f"{name}: {e}")
                progress(f"{name}: FAILED: {e}")
                continue
            docs[name] = doc
            failed += [f"{name}: {e}" for e in doc.get("errors", [])]
            tables.append(text)
            print(text + "\n", flush=True)
    except KeyboardInterrupt:
        print("interrupted; every tree was stopped", file=sys.stderr)
        return 130
    print("targets:")
    for name in args.only:
        for t in docs.get(name, {}).get("targets", []):
            print(Target(**t).line())
    for failure in failed:
        print(f"FAILED: {failure}")
    print(f"(all benchmarks took {time.monotonic() - started:.0f} s)")
    if args.json:
        docs["failed"] = failed
        with open(args.json, "w") as f:
            json.dump(docs, f, indent=2)
    return 1 if failed else 0


def _fanout(runs: list[str]) -> tuple[dict[str, Any], str]:
    a = fanout.parse_args(runs)
    doc = fanout.run(a)
    return doc, fanout.table(doc["medians"], a.runs)


def _latency(runs: list[str]) -> tuple[dict[str, Any], str]:
    doc = latency.run(latency.parse_args(runs))
    return doc, latency.table(doc["medians"])


def _memory(runs: list[str]) -> tuple[dict[str, Any], str]:
    a = memory.parse_args(runs)
    doc = memory.run(a)
    return doc, memory.table(doc["medians"], a.runs)


def _failover(runs: int, rounds: int) -> tuple[dict[str, Any], str]:
    doc = failover_summary.run(runs, rounds)
    return doc, failover_summary.table(doc["summary"], runs, rounds)


if __name__ == "__main__":
    sys.exit(main())
