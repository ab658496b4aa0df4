"""Fan-out benchmark: how many deliveries per second a topic server makes.

    python -m tests.bench.fanout [--runs N] [--quick] [--fsync MODE ...] [--sizes C ...]
                                 [--seconds S] [--window W] [--json FILE] [--keep]

For each `wal.fsync` mode and run it starts a fresh tree (topics t1..t4), then:
C members in t1 (C = 10, 50, 200), 4 of them sending as fast as the server takes their
lines (closed loop: at most `--window` messages of a topic in flight), then 4 topics of
50 members at once (one server process each). Every delivery is counted; a run that
loses or duplicates one is an error (exit status 1), not a figure. Per case it reports
deliveries and messages per second, the latency p50/p99 (a send timestamp in each
message, read by probe members), and the CPU of every process of the tree and of the
load generator (/proc/PID/stat utime+stime deltas, percent of one core).
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
    OTHERS,
    CpuMeter,
    Target,
    bench_main,
    fmt,
    machine,
    median,
    progress,
    stop_on_sigterm,
    tree_up,
    wait_members,
    wait_quiet,
)
from tests.bench.failover import Tree

TOPICS = ["t1", "t2", "t3", "t4"]
SIZES = (10, 50, 200)
MULTI_MEMBERS = 50
SENDERS = 4
WINDOW = 500  # messages in flight per topic (closed loop)
FSYNC_MODES = ("batch", "always", "never")
TARGET_DELIVERIES = 1_000_000  # with 50 members in one topic, wal.fsync batch


def run_case(tree: Tree, topics: Sequence[str], members: int, warmup: float,
             seconds: float, window: int) -> dict[str, Any]:
    name = f"{len(topics)}x{members}" if len(topics) > 1 else f"1x{members}"
    progress(f"  case {name}: connecting {len(topics) * members} members")
    groups: list[loadgen.Group] = []
    try:
        for t in topics:
            first = sum(len(g.members) for g in groups)
            ms = loadgen.connect(tree.port, members, t, first=first)
            groups.append(loadgen.make_group(t, ms, SENDERS))
        for t in topics:
            wait_members(tree, t, members)
        time.sleep(0.3)  # presence of the last arrivals is out
        quiet = wait_quiet(tree)
        cpu = CpuMeter(tree)
        result = loadgen.run_groups(groups, warmup, seconds, window=window,
                                    on_start=cpu.start, on_end=cpu.stop)
    finally:
        for g in groups:
            loadgen.close(g.members)
    for t in topics:
        wait_members(tree, t, 0)
    servers = sum(v for n, v in cpu.percent.items() if n.startswith("server@")) / 100
    return {"case": name, "topics": len(topics), "members": members, "senders": SENDERS,
            "server_cpu_us_per_delivery": servers / max(result.deliveries_per_s, 1) * 1e6,
            "window": window, "seconds": round(result.seconds, 3),
            "deliveries_per_s": result.deliveries_per_s,
            "messages_per_s": result.messages_per_s,
            "p50_ms": result.latency_ms(50), "p99_ms": result.latency_ms(99),
            "latency_samples": len(result.latencies_us),
            "drained_s": result.drained_s, "cpu_percent": cpu.percent,
            "others_before_percent": quiet}


def run_tree(fsync: str, sizes: Sequence[int], multi: bool, warmup: float, seconds: float,
             window: int, keep: bool = False) -> list[dict[str, Any]]:
    out = []
    with tree_up(TOPICS, {"wal": {"fsync": fsync}}, keep) as tree:
        for c in sizes:
            out.append({"fsync": fsync, **run_case(tree, TOPICS[:1], c, warmup, seconds,
                                                   window)})
        if multi:
            out.append({"fsync": fsync, **run_case(tree, TOPICS, MULTI_MEMBERS, warmup,
                                                   seconds, window)})
    return out


def aggregate(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The median of every figure over the runs, per (fsync mode, case)."""
    keys: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        keys.setdefault((r["fsync"], r["case"]), []).append(r)
    out = []
    for (mode, case), rs in keys.items():
        names = sorted({n for r in rs for n in r["cpu_percent"]})
        cpu = {n: median([r["cpu_percent"][n] for r in rs if n in r["cpu_percent"]])
               for n in names}
        out.append({"fsync": mode, "case": case, "runs": len(rs),
                    **{k: median([r[k] for r in rs if r[k] is not None])
                       for k in ("deliveries_per_s", "messages_per_s", "p50_ms", "p99_ms",
                                 "drained_s", "server_cpu_us_per_delivery")},
                    "deliveries_per_s_all": [round(r["deliveries_per_s"]) for r in rs],
                    "cpu_percent": cpu})
    return out


def targets(medians: Sequence[dict[str, Any]]) -> list[Target]:
    by = {(m["fsync"], m["case"]): m for m in medians}
    out = []
    one = by.get(("batch", "1x50"))
    if one:
        v = one["deliveries_per_s"]
        out.append(Target(f"fan-out, wal.fsync batch, 50 members in one topic: "
                          f">= {TARGET_DELIVERIES:,} deliveries/s",
                          f"{v:,.0f}/s ({v / TARGET_DELIVERIES * 100:.0f}% of the target)",
                          v >= TARGET_DELIVERIES))
    four = by.get(("batch", f"4x{MULTI_MEMBERS}"))
    if one and four:
        a, b = one["deliveries_per_s"], four["deliveries_per_s"]
        out.append(Target("fan-out, wal.fsync batch: more deliveries/s with 4 topics of 50 "
                          "than with one", f"{b:,.0f}/s vs {a:,.0f}/s ({b / a:.2f}x)", b > a))
    return out


def short_cpu(cpu: dict[str, float]) -> str:
    """Servers and the load generator by name; the others (monitors, router, manager)
    summed unless one of them is busy."""
    shown, rest = [], 0.0
    for name, v in cpu.items():
        if name.startswith("server@") or name in ("load generator", OTHERS) or v >= 5:
            shown.append(f"{name.replace('load generator', 'loadgen')} {v:.0f}")
        else:
            rest += v
    return ", ".join(shown) + f", others {rest:.0f}"


def table(medians: Sequence[dict[str, Any]], runs: int) -> str:
    head = (f"{'fsync':<7}{'case':<7}{'deliveries/s':>13}{'messages/s':>11}"
            f"{'p50 ms':>8}{'p99 ms':>8}{'us/dlv':>7} | CPU % of one core (median)")
    lines = [f"fan-out: medians of {runs} run(s); case TxC = T topics of C members, "
             f"{SENDERS} senders per topic, closed loop; us/dlv = CPU microseconds of the "
             "topic servers per delivery", head, "-" * (len(head) + 30)]
    for m in medians:
        lines.append(f"{m['fsync']:<7}{m['case']:<7}{fmt(m['deliveries_per_s']):>13}"
                     f"{fmt(m['messages_per_s']):>11}{fmt(m['p50_ms'], 2):>8}"
                     f"{fmt(m['p99_ms'], 2):>8}{fmt(m['server_cpu_us_per_delivery'], 2):>7}"
                     f" | {short_cpu(m['cpu_percent'])}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    for i in range(args.runs):
        for mode in args.fsync:
            progress(f"fan-out run {i + 1}/{args.runs}, wal.fsync {mode}")
            for r in run_tree(mode, args.sizes, not args.no_multi, args.warmup, args.seconds,
                              args.window, args.keep):
                results.append({"run": i + 1, **r})
    medians = aggregate(results)
    return {"benchmark": "fanout", "machine": machine(), "config_overrides": BENCH_OVERRIDES,
            "runs": args.runs, "results": results, "medians": medians,
            "targets": [t.__dict__ for t in targets(medians)]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fsync", nargs="+", choices=FSYNC_MODES, default=list(FSYNC_MODES),
                   help="wal.fsync modes to run (default all three)")
    p.add_argument("--sizes", nargs="+", type=int, default=list(SIZES), metavar="C",
                   help="members in the one-topic cases (default 10 50 200)")
    p.add_argument("--no-multi", action="store_true", help="skip the 4-topic case")
    p.add_argument("--window", type=int, default=WINDOW,
                   help=f"messages in flight per topic (default {WINDOW})")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench.fanout",
                                description="Fan-out throughput of TheyChat topic servers.")
    add_arguments(p)
    p.add_argument("--runs", type=int, default=3, help="runs per figure (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="1 run, wal.fsync batch only, shorter windows")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds measured per case")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    p.add_argument("--keep", action="store_true", help="keep the state dirs")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.fsync, args.seconds, args.warmup = 1, ["batch"], 3.0, 0.5
    return args


def main(argv: Sequence[str] | None = None) -> int:
    stop_on_sigterm()
    args = parse_args(argv)
    return bench_main("fanout", args, run, lambda doc: table(doc["medians"], args.runs))


if __name__ == "__main__":
    sys.exit(main())
