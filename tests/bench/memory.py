"""Memory benchmark: what an idle registered connection costs, all processes together.

    python -m tests.bench.memory [--runs N] [--quick] [--counts N ...] [--json FILE] [--keep]

For each place an idle user can be, `joined` (registered with /nick and in a topic,
what a real idle user is) and `lobby` (registered, in no topic), and each run, it starts
a fresh tree (one topic), measures the memory of every TheyChat process with no client
(N = 0), then opens connections up to each count (1,000 then 5,000 by default), reads
what they were sent (the presence of later arrivals) and measures again. The figure is
(M(N) - M(0)) / N for two measures M, summed over every process of the tree:
- RSS: VmRSS of /proc/PID/status;
- PSS: Pss of /proc/PID/smaps_rollup (shared pages split among the processes sharing
  them, so libraries shared by the daemons count once in the sum).
Kernel memory (socket buffers, file descriptors) is not in either.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from tests.bench import loadgen
from tests.bench.common import (
    BENCH_OVERRIDES,
    Target,
    bench_main,
    daemon_names,
    machine,
    median,
    memory_kib,
    progress,
    stop_on_sigterm,
    tree_up,
    wait_members,
)
from tests.bench.failover import Tree

TOPIC = "t1"
COUNTS = (1000, 5000)
PLACES = ("joined", "lobby")
SETTLE_S = 1.0
TARGET_KIB = 10.0


def measure(tree: Tree) -> dict[str, Any]:
    per: dict[str, dict[str, int]] = {}
    for pid, name in daemon_names(tree).items():
        try:
            rss, pss = memory_kib(pid)
        except OSError:
            continue
        per[name] = {"rss_kib": rss, "pss_kib": pss}
    return {"rss_kib": sum(p["rss_kib"] for p in per.values()),
            "pss_kib": sum(p["pss_kib"] for p in per.values()), "processes": per}


def run_place(place: str, counts: Sequence[int], keep: bool) -> list[dict[str, Any]]:
    out = []
    members: list[loadgen.Member] = []
    with tree_up([TOPIC], {}, keep) as tree:
        time.sleep(SETTLE_S)
        base = measure(tree)
        try:
            for n in sorted(counts):
                t0 = time.monotonic()
                members += loadgen.connect(tree.port, n - len(members),
                                           TOPIC if place == "joined" else None,
                                           nick_prefix="idle", first=len(members),
                                           drain_between=True)
                took = time.monotonic() - t0
                if place == "joined":
                    wait_members(tree, TOPIC, n, timeout=120)
                loadgen.drain(members)
                time.sleep(SETTLE_S)
                m = measure(tree)
                row = {"place": place, "connections": n, "setup_s": round(took, 2),
                       "rss_kib_per_conn": (m["rss_kib"] - base["rss_kib"]) / n,
                       "pss_kib_per_conn": (m["pss_kib"] - base["pss_kib"]) / n,
                       "base": base, "loaded": m}
                progress(f"  {place} {n}: RSS {row['rss_kib_per_conn']:.2f} KiB, PSS "
                         f"{row['pss_kib_per_conn']:.2f} KiB per connection "
                         f"(connected in {took:.1f} s)")
                out.append(row)
        finally:
            loadgen.close(members)
    return out


def aggregate(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    keys: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in results:
        keys.setdefault((r["place"], r["connections"]), []).append(r)
    out = []
    for (place, n), rs in keys.items():
        procs = sorted({p for r in rs for p in r["loaded"]["processes"]})
        per_proc = {p: median([(r["loaded"]["processes"][p]["rss_kib"]
                                - r["base"]["processes"].get(p, {"rss_kib": 0})["rss_kib"]) / n
                               for r in rs if p in r["loaded"]["processes"]])
                    for p in procs}
        out.append({"place": place, "connections": n, "runs": len(rs),
                    "rss_kib_per_conn": median([r["rss_kib_per_conn"] for r in rs]),
                    "pss_kib_per_conn": median([r["pss_kib_per_conn"] for r in rs]),
                    "rss_kib_per_conn_all": [round(r["rss_kib_per_conn"], 2) for r in rs],
                    "rss_kib_per_conn_by_process": per_proc,
                    "setup_s": median([r["setup_s"] for r in rs])})
    return out


def targets(medians: Sequence[dict[str, Any]]) -> list[Target]:
    out = []
    for m in medians:
        if m["place"] != "joined":
            continue
        worst = max(m["rss_kib_per_conn"], m["pss_kib_per_conn"])
        out.append(Target(f"memory per idle connection (joined a topic), "
                          f"{m['connections']:,} connections: < {TARGET_KIB:g} KiB",
                          f"RSS {m['rss_kib_per_conn']:.2f} KiB, PSS "
                          f"{m['pss_kib_per_conn']:.2f} KiB", worst < TARGET_KIB))
    return out


def table(medians: Sequence[dict[str, Any]], runs: int) -> str:
    head = f"{'place':<8}{'conns':>7}{'RSS KiB/conn':>14}{'PSS KiB/conn':>14} | by process (RSS)"
    lines = [f"memory per idle registered connection, all processes: medians of {runs} run(s)",
             head, "-" * (len(head) + 40)]
    for m in medians:
        by = ", ".join(f"{p} {v:.2f}" for p, v in m["rss_kib_per_conn_by_process"].items()
                       if abs(v) >= 0.05)
        lines.append(f"{m['place']:<8}{m['connections']:>7,}{m['rss_kib_per_conn']:>14.2f}"
                     f"{m['pss_kib_per_conn']:>14.2f} | {by}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    for i in range(args.runs):
        for place in args.places:
            progress(f"memory run {i + 1}/{args.runs}: {place}")
            for r in run_place(place, args.counts, args.keep):
                results.append({"run": i + 1, **r})
    medians = aggregate(results)
    return {"benchmark": "memory", "machine": machine(), "config_overrides": BENCH_OVERRIDES,
            "results": results, "medians": medians,
            "targets": [t.__dict__ for t in targets(medians)]}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench.memory",
                                description="Memory per idle connection.")
    p.add_argument("--runs", type=int, default=3, help="runs (default 3)")
    p.add_argument("--quick", action="store_true", help="1 run, 1,000 connections")
    p.add_argument("--counts", nargs="+", type=int, default=list(COUNTS), metavar="N",
                   help="connection counts (default 1000 5000)")
    p.add_argument("--places", nargs="+", choices=PLACES, default=list(PLACES))
    p.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    p.add_argument("--keep", action="store_true", help="keep the state dirs")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.counts = 1, [1000]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    stop_on_sigterm()
    args = parse_args(argv)
    return bench_main("memory", args, run, lambda doc: table(doc["medians"], args.runs))


if __name__ == "__main__":
    sys.exit(main())
