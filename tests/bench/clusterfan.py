"""Throughput of one topic across 3 hosts against one host (issue 11, point 14):

    python -m tests.bench.clusterfan [--members 50] [--senders 6] [--seconds S] [--runs N]

One topic of `--members` members, spread evenly over the three hosts of the lab
(daemons/soak/lab.py: network namespaces, an etcd member and a TheyChat tree each),
`--senders` of them sending, on every host, closed loop (at most `--window` messages in
flight); then the same topic, members and senders on one host (a tree on loopback, no
etcd) in the same run. Deliveries per second and latency p50/p99 of each, and their
ratio. Target: the cluster delivers at least half of what one host does.

The load generator is the one of the fan-out benchmark (loadgen.py); the cluster's
connections are made inside the people's namespace. Any lost delivery fails the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from tests.bench import loadgen
from tests.bench.common import BENCH_OVERRIDES, BenchError, fmt, progress, tree_up
from theychat.daemons.soak.lab import CLIENT_PORT, Lab, why_no_lab
from theychat.daemons.soak.netns import connect_in

TOPIC = "t1"
TARGET_RATIO = 0.5


def interleave(groups: list[list[loadgen.Member]]) -> list[loadgen.Member]:
    """h0, h1, h2, h0, ...: the first `senders` members (the senders) are on every host."""
    out = []
    for i in range(max(len(g) for g in groups)):
        out += [g[i] for g in groups if i < len(g)]
    return out


def measure(members: list[loadgen.Member], senders: int, warmup: float, seconds: float,
            window: int) -> dict[str, Any]:
    group = loadgen.make_group(TOPIC, members, senders)
    result = loadgen.run_groups([group], warmup, seconds, window=window)
    return {"deliveries_per_s": result.deliveries_per_s,
            "messages_per_s": result.messages_per_s,
            "p50_ms": result.latency_ms(50), "p99_ms": result.latency_ms(99)}


def one_host(members: int, senders: int, warmup: float, seconds: float,
             window: int) -> dict[str, Any]:
    with tree_up([TOPIC]) as tree:
        ms = loadgen.connect(tree.port, members, TOPIC)
        try:
            time.sleep(0.5)
            return measure(ms, senders, warmup, seconds, window)
        finally:
            loadgen.close(ms)


def three_hosts(lab: Lab, members: int, senders: int, warmup: float, seconds: float,
                window: int, first: int) -> dict[str, Any]:
    per_host: list[list[loadgen.Member]] = []
    try:
        for h in lab.hosts:
            n = members // 3 + (1 if h.index < members % 3 else 0)
            per_host.append(loadgen.connect(
                0, n, TOPIC, first=first + sum(len(g) for g in per_host),
                dial=lambda h=h: connect_in(lab.clients, h.client_ip, CLIENT_PORT)))
        time.sleep(1.0)  # everyone's presence is out, on every host
        ms = interleave(per_host)
        return measure(ms, senders, warmup, seconds, window)
    finally:
        for g in per_host:
            loadgen.close(g)


def run(members: int, senders: int, warmup: float, seconds: float, window: int,
        runs: int) -> dict[str, Any]:
    reason = why_no_lab()
    if reason:
        raise BenchError(f"cannot build the lab: {reason}")
    singles, clusters = [], []
    lab = Lab(3, topics=[TOPIC], extra=BENCH_OVERRIDES)
    try:
        lab.start()
        for r in range(runs):
            progress(f"  run {r + 1}/{runs}: 3 hosts")
            clusters.append(three_hosts(lab, members, senders, warmup, seconds, window,
                                        first=r * members))
    finally:
        lab.stop()
    for r in range(runs):
        progress(f"  run {r + 1}/{runs}: one host")
        singles.append(one_host(members, senders, warmup, seconds, window))

    def med(rows: list[dict[str, Any]], key: str) -> float | None:
        values = [x[key] for x in rows if x[key] is not None]
        return statistics.median(values) if values else None

    one = {k: med(singles, k) for k in singles[0]}
    three = {k: med(clusters, k) for k in clusters[0]}
    ratio = (three["deliveries_per_s"] or 0) / max(one["deliveries_per_s"] or 1, 1)
    return {"members": members, "senders": senders, "window": window, "runs": runs,
            "one_host": one, "three_hosts": three, "ratio": ratio,
            "raw": {"one_host": singles, "three_hosts": clusters}}


def table(doc: dict[str, Any]) -> str:
    rows = [f"One topic, {doc['members']} members, {doc['senders']} senders (closed loop, "
            f"window {doc['window']}), median of {doc['runs']}",
            f"{'':<22}{'deliveries/s':>14}{'messages/s':>12}{'p50 ms':>9}{'p99 ms':>9}"]
    for key, name in (("one_host", "one host"), ("three_hosts", "3 hosts (etcd)")):
        d = doc[key]
        rows.append(f"{name:<22}{fmt(d['deliveries_per_s'], 0):>14}"
                    f"{fmt(d['messages_per_s'], 0):>12}{fmt(d['p50_ms'], 2):>9}"
                    f"{fmt(d['p99_ms'], 2):>9}")
    verdict = "PASS" if doc["ratio"] >= TARGET_RATIO else "MISS"
    rows.append(f"3 hosts / one host: {doc['ratio']:.2f} (target >= {TARGET_RATIO}) {verdict}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.clusterfan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, default=50)
    p.add_argument("--senders", type=int, default=6)
    p.add_argument("--window", type=int, default=500)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    try:
        doc = run(args.members, args.senders, args.warmup, args.seconds, args.window,
                  args.runs)
    except BenchError as e:
        print(f"clusterfan: FAILED: {e}", file=sys.stderr)
        return 1
    print(table(doc))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
