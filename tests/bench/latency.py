"""Latency benchmark: delivery latency at a fixed offered load.

    python -m tests.bench.latency [--runs N] [--quick] [--rate MSGS] [--receivers R]
                                  [--seconds S] [--json FILE] [--keep]

One sender and R receivers (default 50) in one topic; the sender sends RATE messages per
second (default 2,000) on a fixed schedule, so the offered load is RATE x R deliveries
per second (100,000 by default). The latency of a delivery is its arrival at a probe
member (the first, middle and last receivers in fan-out order read every line) minus
the send timestamp inside the message; p50, p99 and p99.9 are nearest-rank over every
probe line of the measured window. Every delivery is also counted: a loss is an error.
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

TOPIC = "t1"
RATE = 2000.0
RECEIVERS = 50
TARGET_P99_MS = 5.0


def run_once(tree: Tree, rate: float, receivers: int, warmup: float,
             seconds: float) -> dict[str, Any]:
    members = loadgen.connect(tree.port, receivers + 1, TOPIC)
    try:
        group = loadgen.make_group(TOPIC, members, 1)
        wait_members(tree, TOPIC, receivers + 1)
        time.sleep(0.3)
        quiet = wait_quiet(tree)
        cpu = CpuMeter(tree)
        result = loadgen.run_groups([group], warmup, seconds, rate=rate,
                                    on_start=cpu.start, on_end=cpu.stop)
    finally:
        loadgen.close(members)
    wait_members(tree, TOPIC, 0)
    return {"rate": rate, "receivers": receivers, "seconds": round(result.seconds, 3),
            "offered_deliveries_per_s": rate * receivers,
            "deliveries_per_s": result.deliveries_per_s,
            "p50_ms": result.latency_ms(50), "p99_ms": result.latency_ms(99),
            "p999_ms": result.latency_ms(99.9), "max_ms": result.latency_ms(100),
            "latency_samples": len(result.latencies_us),
            "sender_max_lag_ms": result.max_lag_ms, "cpu_percent": cpu.percent,
            "others_before_percent": quiet}


def aggregate(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    keys = ("deliveries_per_s", "p50_ms", "p99_ms", "p999_ms", "max_ms", "sender_max_lag_ms")
    names = sorted({n for r in results for n in r["cpu_percent"]})
    return {"runs": len(results), "offered_deliveries_per_s":
            results[0]["offered_deliveries_per_s"],
            **{k: median([r[k] for r in results if r[k] is not None]) for k in keys},
            "p99_ms_all": [round(r["p99_ms"], 3) for r in results],
            "cpu_percent": {n: median([r["cpu_percent"][n] for r in results
                                       if n in r["cpu_percent"]]) for n in names}}


def targets(m: dict[str, Any]) -> list[Target]:
    v = m["p99_ms"]
    return [Target(f"latency at {m['offered_deliveries_per_s']:,.0f} deliveries/s offered: "
                   f"p99 < {TARGET_P99_MS:g} ms", f"p99 {v:.2f} ms", v < TARGET_P99_MS)]


def table(m: dict[str, Any]) -> str:
    cpu = ", ".join(f"{n.replace('load generator', 'loadgen')} {v:.0f}"
                    for n, v in m["cpu_percent"].items() if v >= 1 or n == OTHERS)
    return "\n".join([
        f"latency at a fixed offered load: medians of {m['runs']} run(s)",
        f"  offered {m['offered_deliveries_per_s']:,.0f} deliveries/s, delivered "
        f"{fmt(m['deliveries_per_s'])}/s",
        f"  p50 {fmt(m['p50_ms'], 2)} ms, p99 {fmt(m['p99_ms'], 2)} ms, p99.9 "
        f"{fmt(m['p999_ms'], 2)} ms, max {fmt(m['max_ms'], 2)} ms "
        f"(sender's largest lag behind its schedule {fmt(m['sender_max_lag_ms'], 2)} ms)",
        f"  CPU % of one core: {cpu}"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    with tree_up([TOPIC], {"wal": {"fsync": args.fsync}}, args.keep) as tree:
        for i in range(args.runs):
            progress(f"latency run {i + 1}/{args.runs}: {args.rate:g} messages/s to "
                     f"{args.receivers} receivers")
            results.append({"run": i + 1, **run_once(tree, args.rate, args.receivers,
                                                      args.warmup, args.seconds)})
    m = aggregate(results)
    return {"benchmark": "latency", "machine": machine(), "config_overrides": BENCH_OVERRIDES,
            "fsync": args.fsync, "results": results, "medians": m,
            "targets": [t.__dict__ for t in targets(m)]}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench.latency",
                                description="Delivery latency at a fixed offered load.")
    p.add_argument("--runs", type=int, default=3, help="runs (default 3)")
    p.add_argument("--quick", action="store_true", help="1 run of 3 s")
    p.add_argument("--rate", type=float, default=RATE, help="messages per second (2000)")
    p.add_argument("--receivers", type=int, default=RECEIVERS, help="receivers (50)")
    p.add_argument("--fsync", default="batch", choices=("batch", "always", "never"))
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds measured per run")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    p.add_argument("--keep", action="store_true", help="keep the state dir")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.seconds, args.warmup = 1, 3.0, 0.5
    return args


def main(argv: Sequence[str] | None = None) -> int:
    stop_on_sigterm()
    args = parse_args(argv)
    return bench_main("latency", args, run, lambda doc: table(doc["medians"]))


if __name__ == "__main__":
    sys.exit(main())
