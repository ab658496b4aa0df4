"""Host loss in a 3-host cluster (issue 11, point 13), on the lab of tests/cluster:

    python -m tests.bench.hostloss [--kills N] [--topics T] [--rate R] [--json FILE]

Three hosts (network namespaces, an etcd member and a TheyChat tree each), T topics,
and in every topic one member per host, each sending R lines a second (the soak's
client, `daemons/soak/clients.py`, with every front door, from the people's namespace).
Then N times: the host of one topic's sequencer is killed whole (every process of its
namespace, etcd included, SIGKILL), and once its people have resumed elsewhere it is
started again and gets new people. Two figures per kill, from the transcripts:

- **orphaned topic**: for each topic whose sequencer was on the dead host, from the
  kill to the moment every member on a surviving host has received a line that was
  sent after the kill (the topic delivers again, through its new sequencer);
- **resumed client**: for each person of the dead host, from the kill to the first line
  sent after the kill that it receives (it noticed, reconnected to another host,
  resumed its session and is delivered to again).

Median, p99 (nearest rank) and max of each; targets: p99 under 1.5 s and 3 s. The run
fails (exit 1) if any acknowledged line was lost, shown twice, or shown differently by
two members (the soak judge's delivery check over every transcript).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.bench.common import BenchError, pct, progress
from theychat.daemons.soak.clients import SoakClient
from theychat.daemons.soak.judge import _deliveries, _line_number
from theychat.daemons.soak.lab import CLIENT_PORT, Host, Lab, why_no_lab
from theychat.daemons.soak.tree import read_events

TARGET_TOPIC_P99_S = 1.5
TARGET_CLIENT_P99_S = 3.0
RECOVER_WAIT_S = 20.0
SETTLE_S = 1.0


class Bench:
    def __init__(self, lab: Lab, topics: list[str], rate: float, out: Path) -> None:
        self.lab, self.topics, self.rate, self.out = lab, topics, rate, out
        self.clients: dict[tuple[str, int], SoakClient] = {}  # (topic, host) -> sender now
        self.everyone: list[SoakClient] = []
        self.tasks: list[asyncio.Future[None]] = []
        self.rounds: list[dict[str, Any]] = []
        self._n = 0

    def _person(self, topic: str, host: Host) -> SoakClient:
        self._n += 1
        doors = [(h.client_ip, CLIENT_PORT) for h in self.lab.hosts]
        doors = doors[host.index:] + doors[:host.index]  # its own host first
        nick = f"b{self._n}"
        c = SoakClient(nick, topic, host.client_ip, CLIENT_PORT, self.rate,
                       self.out / f"{nick}.jsonl", reconnect_for=60.0,
                       phase=(self._n % 10) / 10, doors=doors, netns=self.lab.clients)
        self.clients[(topic, host.index)] = c
        self.everyone.append(c)
        self.tasks.append(asyncio.ensure_future(c.run()))
        return c

    async def _until(self, ok: Any, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: not within {timeout:.0f}s")
            await asyncio.sleep(0.05)

    async def _blocking(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def run(self, kills: int) -> None:
        for topic in self.topics:
            for h in self.lab.hosts:
                self._person(topic, h)
        await self._until(lambda: all(c.in_topic for c in self.everyone), "everyone joined", 30)
        await asyncio.sleep(SETTLE_S)
        for r in range(kills):
            view = await self._blocking(self.lab.cluster_view)
            owners = {t["topic"]: t["sequencer"] for t in view["topics"]}
            aim = self.topics[r % len(self.topics)]
            victim = next(h for h in self.lab.hosts if h.name == owners.get(aim))
            orphans = [t for t, o in owners.items() if o == victim.name]
            moved = [c for (t, i), c in self.clients.items() if i == victim.index]
            at = time.time()
            await self._blocking(self.lab.kill_host, victim)
            progress(f"  kill {r + 1}/{kills}: {victim.name} (sequencer of "
                     f"{', '.join(orphans)})")
            # Its people start at their own host's door (index 0): moved, they are on another.
            await self._until(lambda moved=moved: all(  # type: ignore[misc]
                                  c.door != 0 and c.in_topic and not c.resuming for c in moved),
                              f"the people of {victim.name} resumed", RECOVER_WAIT_S)
            await asyncio.sleep(SETTLE_S)
            self.rounds.append({"t": at, "host": victim.name, "orphans": orphans,
                                "moved": [c.nick for c in moved],
                                "survivors": {t: [c.nick for (tt, i), c in self.clients.items()
                                                  if tt == t and i != victim.index]
                                              for t in orphans}})
            for c in moved:
                c.interval = float("inf")  # it was measured; new people take its place
            await self._blocking(self.lab.restart_host, victim)
            fresh = [self._person(t, victim) for t in self.topics]
            await self._until(lambda fresh=fresh: all(  # type: ignore[misc]
                c.in_topic for c in fresh), "new people joined", 30)
            await asyncio.sleep(SETTLE_S)

    async def stop(self) -> None:
        for c in self.everyone:
            c.interval = float("inf")
        await asyncio.sleep(2.0)  # the last lines arrive
        for c in self.everyone:
            c.stop()
        await asyncio.wait(self.tasks, timeout=10)


def first_after(events: list[dict[str, Any]], at: float, sent_at: dict[tuple[str, int], float]
                ) -> float | None:
    """When a line sent after `at` first arrived, in this transcript."""
    for e in events:
        if e["ev"] != "message" or e["t"] <= at:
            continue
        n = _line_number(e.get("text"))
        sent = sent_at.get((str(e.get("sender")), n)) if n is not None else None
        if sent is not None and sent > at:
            return float(e["t"])
    return None


def analyse(out: Path, rounds: list[dict[str, Any]], topic_of: dict[str, str]
            ) -> dict[str, Any]:
    transcripts = {p.stem: list(read_events(p)) for p in sorted(out.glob("*.jsonl"))}
    sent_at = {(nick, int(e["n"])): float(e["t"]) for nick, tr in transcripts.items()
               for e in tr if e["ev"] == "sent"}
    violations: list[str] = []
    counts = _deliveries(transcripts, topic_of, violations)
    topic_s: list[float] = []
    client_s: list[float] = []
    missing: list[str] = []
    per_round: list[dict[str, Any]] = []
    for r in rounds:
        this: dict[str, Any] = {"t": r["t"], "host": r["host"], "topics": {}, "clients": {}}
        per_round.append(this)
        for topic, nicks in r["survivors"].items():
            times = [first_after(transcripts[n], r["t"], sent_at) for n in nicks]
            if None in times:
                missing.append(f"{topic} after the kill of {r['host']}")
            else:
                topic_s.append(max(t for t in times if t is not None) - r["t"])
                this["topics"][topic] = round(topic_s[-1], 3)
        for nick in r["moved"]:
            t = first_after(transcripts[nick], r["t"], sent_at)
            if t is None:
                missing.append(f"{nick} after the kill of {r['host']}")
            else:
                client_s.append(t - r["t"])
                this["clients"][nick] = round(client_s[-1], 3)
    return {"kills": len(rounds), "orphaned_topic_s": summary(topic_s),
            "resumed_client_s": summary(client_s), "missing": missing,
            "acked": counts["acked"], "gaps": counts["gaps"],
            "duplicates": counts["duplicates"], "disagreements": counts["disagreements"],
            "acked_twice": counts["acked_twice"], "violations": violations[:20],
            "rounds": per_round}


def summary(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": round(pct(values, 50) or 0.0, 3),
            "p99": round(pct(values, 99) or 0.0, 3), "max": round(max(values), 3)}


def table(doc: dict[str, Any]) -> str:
    lines = [f"Host loss: {doc['kills']} kills of a whole host (SIGKILL to every process, "
             "etcd included), 3 hosts",
             f"{'':<46}{'n':>4}{'median':>9}{'p99':>8}{'max':>8}  target"]
    for key, name, target in (("orphaned_topic_s", "kill -> orphaned topic delivers again",
                               TARGET_TOPIC_P99_S),
                              ("resumed_client_s", "kill -> resumed client receives again",
                               TARGET_CLIENT_P99_S)):
        s = doc[key]
        if s["n"]:
            verdict = "PASS" if s["p99"] < target else "MISS"
            lines.append(f"{name:<46}{s['n']:>4}{s['median']:>8.2f}s{s['p99']:>7.2f}s"
                         f"{s['max']:>7.2f}s  p99 < {target} s {verdict}")
        else:
            lines.append(f"{name:<46}   0")
    lines.append(f"acknowledged: {doc['acked']}; lost (gaps) {doc['gaps']}, shown twice "
                 f"{doc['duplicates']}, disagreements {doc['disagreements']}")
    return "\n".join(lines)


def run(kills: int, topics: int, rate: float, keep: bool = False) -> dict[str, Any]:
    reason = why_no_lab()
    if reason:
        raise BenchError(f"cannot build the lab: {reason}")
    names = [f"t{i}" for i in range(1, topics + 1)]
    lab = Lab(3, topics=names, extra={"clients": {"max_per_address": 1000}})
    out = Path(tempfile.mkdtemp(prefix="tc-hostloss-"))
    bench = Bench(lab, names, rate, out)
    try:
        lab.start()
        progress(f"hostloss: lab up ({lab.root}); {kills} kills")

        async def go() -> None:
            try:
                await bench.run(kills)
            finally:
                await bench.stop()

        asyncio.run(go())
    finally:
        if keep:
            lab.copy_logs(out / "logs")
        lab.stop()
    doc = analyse(out, bench.rounds, {c.nick: c.topic for c in bench.everyone})
    doc.update(topics=topics, rate=rate, transcripts=str(out) if keep else None)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.hostloss", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--topics", type=int, default=3)
    p.add_argument("--rate", type=float, default=10.0, help="lines/s per person (default 10)")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--keep", action="store_true", help="keep the transcripts and the lab's logs")
    args = p.parse_args(argv)
    try:
        doc = run(args.kills, args.topics, args.rate, args.keep)
    except BenchError as e:
        print(f"hostloss: FAILED: {e}", file=sys.stderr)
        return 1
    print(table(doc))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    bad = doc["gaps"] or doc["duplicates"] or doc["disagreements"] or doc["missing"]
    if bad:
        print(f"hostloss: FAILED: {doc['missing'][:5]} {doc['violations'][:5]}",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
