"""The verdict of a soak, from what was written and nothing else: the daemons' logs, the
clients' transcripts, the injector's record of its faults, and the final status.

Pure functions over those files: `judge(report_dir)` reads them, `assess(...)` decides.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from theychat.daemons.soak.plan import HOST_KINDS, role_of, split
from theychat.daemons.soak.tree import read_events

MATCH_WITHIN_S = 20.0  # a fault's declaration and restart must follow within this
ADOPTION_WINDOW_S = 2.0  # a stop this close to its supervisor adopting the target


@dataclass
class Check:
    name: str
    ok: bool
    figure: str


@dataclass
class FaultResult:
    t: float
    kind: str
    targets: list[str]
    group: str
    declared: dict[str, float | None] = field(default_factory=dict)  # s after injection
    restarted: dict[str, float | None] = field(default_factory=dict)
    outage_s: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def detection_s(self) -> float | None:
        first = self.targets[0]
        return self.declared.get(first)

    @property
    def recovered_s(self) -> float | None:
        values = list(self.restarted.values())
        if not values or any(v is None for v in values):
            return None
        return max(v for v in values if v is not None)


@dataclass
class Verdict:
    checks: list[Check]
    faults: list[FaultResult]
    violations: list[str]
    per_second: list[tuple[int, int]]  # (second since traffic start, deliveries shown)
    restarts: list[tuple[float, str]]  # (time since traffic start, child)
    groups: dict[str, dict[str, Any]]  # "count", and p50/p99/max of "detection",
    #                                    "recovery", "outage" (None without values)
    facts: dict[str, Any]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def parse_ts(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


def percentiles(values: Sequence[float]) -> tuple[float, float, float] | None:
    """p50, p99 (nearest rank) and max; None for no values."""
    if not values:
        return None
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]

    return rank(50), rank(99), ordered[-1]


def group_of(kind: str, targets: Sequence[str]) -> str:
    if kind == "client_reset":
        return "client reset"
    if kind in HOST_KINDS:
        return f"{kind.replace('_', ' ')} host"
    return f"{kind} {'+'.join(role_of(t) for t in targets)}"


# --- reading ---------------------------------------------------------------------------


def read_daemon_logs(logs: Path) -> list[dict[str, Any]]:
    """Every event of every log, in time order, with `_file` (`router`, or on several
    hosts `h1/router`) and `_host` ("" on one host)."""
    events = []
    for path in sorted(logs.glob("*.log")) + sorted(logs.glob("*/*.log")):
        host = "" if path.parent == logs else path.parent.name
        for ev in read_events(path):
            if isinstance(ev.get("ts"), str):
                ev["_t"] = parse_ts(ev["ts"])
                ev["_file"] = f"{host}/{path.stem}" if host else path.stem
                ev["_host"] = host
                events.append(ev)
    events.sort(key=lambda e: e["_t"])
    return events


def judge(report: Path) -> Verdict:
    run = json.loads((report / "run.json").read_text())
    faults = list(read_events(report / "faults.jsonl"))
    status = json.loads((report / "status.json").read_text())
    transcripts = {p.stem: list(read_events(p))
                   for p in sorted((report / "clients").glob("*.jsonl"))}
    return assess(run, faults, read_daemon_logs(report / "logs"), transcripts, status)


# --- deciding --------------------------------------------------------------------------


def assess(run: dict[str, Any], faults: list[dict[str, Any]], events: list[dict[str, Any]],
           transcripts: dict[str, list[dict[str, Any]]], status: dict[str, Any]) -> Verdict:
    violations: list[str] = []
    t0 = float(run["traffic_from"])
    topic_of: dict[str, str] = run["clients"]
    for rec in faults:
        if "recovery_failed" in rec:
            violations.append(f"fault at {rec['at']:.1f}s ({rec['kind']}): "
                              f"{rec['recovery_failed']}")
    faults = [rec for rec in faults if "recovery_failed" not in rec]
    injected = [f for f in faults if f.get("t") is not None]

    results, explained = _match_faults(injected, events, violations)
    declarations = [e for e in events
                    if e.get("event") in ("peer_declared_dead", "host_declared_dead")]
    false = [e for e in declarations if id(e) not in explained]
    for e in false:
        what = e.get("child") or f"host {e.get('host')}"
        violations.append(f"{e['ts']}: {e['_file']} declared {what} dead "
                          f"({e.get('cause') or 'suspected by ' + str(e.get('suspected_by'))})"
                          " with no fault injected")
    gave_up = [e for e in events if e.get("event") == "gave_up"]
    for e in gave_up:
        violations.append(f"{e['ts']}: {e['_file']} gave up on {e.get('child')}")

    # -- the final state --
    rows = status.get("rows", [])
    unhealthy = [r.get("name", "?") for r in rows
                 if r.get("state") != "ready" or not r.get("alive", True)]
    left = status.get("left_behind", [])
    for name in unhealthy:
        violations.append(f"at the end, {name} was not alive and ready")
    sequencers = status.get("sequencers", {})
    orphans = sorted(t for t, host in sequencers.items() if not host)
    for t in orphans:
        violations.append(f"at the end, topic {t} had no sequencer")
    if left:
        violations.append(f"processes left behind after shutdown: {left}")

    # -- deliveries --
    counts = _deliveries(transcripts, topic_of, violations)
    resume_failures = sum(1 for tr in transcripts.values() for e in tr
                          if e["ev"] in ("resume_failed", "gave_up"))
    for nick, tr in transcripts.items():
        for e in tr:
            if e["ev"] in ("resume_failed", "gave_up"):
                violations.append(f"{nick}: {e['ev']} at {e['t'] - t0:.1f}s")

    # -- outages, per fault --
    arrivals = _arrivals(transcripts)
    baseline: list[float] = []
    for f in results:
        f.outage_s = _outage(f, arrivals, topic_of)
    for nick_times in arrivals.values():
        baseline += [b - a for a, b in itertools.pairwise(nick_times)]

    groups: dict[str, dict[str, Any]] = {}
    by_group: dict[str, list[FaultResult]] = defaultdict(list)
    for f in results:
        by_group[f.group].append(f)
    for name, fs in sorted(by_group.items()):
        groups[name] = {
            "count": len(fs),
            "detection": percentiles([f.detection_s for f in fs if f.detection_s is not None]),
            "recovery": percentiles([f.recovered_s for f in fs if f.recovered_s is not None]),
            "outage": percentiles([f.outage_s for f in fs if f.outage_s is not None]),
        }

    unmatched = [f for f in results if f.problems]
    planned = len(faults)
    checks = [
        Check("faults injected", planned > 0 and len(injected) == planned,
              f"{len(injected)} of {planned} planned"),
        Check("every fault detected and recovered from" if run.get("hosts") else
              "every fault followed by peer_declared_dead and restarted", not unmatched,
              f"{len(results) - len(unmatched)} of {len(results)} matched"),
        Check("false suspicions", not false, str(len(false))),
        Check("supervisors that gave up", not gave_up, str(len(gave_up))),
        Check("every daemon alive and ready at the end", not unhealthy and bool(rows),
              f"{len(rows) - len(unhealthy)} of {len(rows)}"),
        *([Check("every topic with a sequencer at the end", not orphans,
                 f"{len(sequencers) - len(orphans)} of {len(sequencers)}")]
          if run.get("hosts") else []),
        Check("processes left behind", not left, str(len(left))),
        Check("acknowledged messages", counts["acked"] > 0, str(counts["acked"])),
        Check("gaps", counts["gaps"] == 0, str(counts["gaps"])),
        Check("duplicates shown", counts["duplicates"] == 0, str(counts["duplicates"])),
        Check("sequence numbers acknowledged twice", counts["acked_twice"] == 0,
              str(counts["acked_twice"])),
        Check("members disagreeing on a sequence number", counts["disagreements"] == 0,
              str(counts["disagreements"])),
        Check("a sender's lines shown out of order", counts["out_of_order"] == 0,
              str(counts["out_of_order"])),
        Check("resumes that failed", resume_failures == 0, str(resume_failures)),
    ]
    per_second = _per_second(arrivals, t0, float(run["traffic_until"]))
    restarts = [(e["_t"] - t0, str(e.get("child"))) for e in events
                if e.get("event") == "restarted"]
    facts = {"deliveries": counts["shown"], "acked": counts["acked"],
             "unacked": counts["unacked"],
             "normal_gap": percentiles(baseline),
             "declarations": len(declarations), "restarts": len(restarts)}
    return Verdict(checks, results, violations, per_second, restarts, groups, facts)


def _match_faults(injected: list[dict[str, Any]], events: list[dict[str, Any]],
                  violations: list[str]) -> tuple[list[FaultResult], set[int]]:
    """Pair each fault with the declaration and the restart of each daemon it hit (or,
    for a host fault, with the other hosts' verdict and the host's return)."""
    explained: set[int] = set()
    results = []
    declared_by_child: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    restarted_by_child: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e.get("event") == "peer_declared_dead":
            declared_by_child[e.get("_host", ""), str(e.get("child"))].append(e)
        elif e.get("event") in ("restarted", "child_adopted"):
            restarted_by_child[e.get("_host", ""), str(e.get("child"))].append(e)
    for f in injected:
        t = float(f["t"])
        res = FaultResult(t, f["kind"], list(f["targets"]), group_of(f["kind"], f["targets"]))
        results.append(res)
        if f["kind"] == "client_reset":
            continue  # judged by its client's transcript: resumed, no gap
        if f["kind"] in HOST_KINDS:
            _match_host_fault(res, events, explained)
        _explain_roots_pair(res, events, explained)
        for target in f["targets"] if f["kind"] not in HOST_KINDS else ():
            host, name = split(target)
            pid = f.get("pids", {}).get(target)
            # The same death may be declared twice: by a supervisor that saw the exit just
            # before it died too, and by its successor that finds the child dead.
            deaths = [e for e in declared_by_child[host, name]
                      if t - 0.05 <= e["_t"] <= t + MATCH_WITHIN_S
                      and e.get("child_pid") in (None, pid)]
            if not deaths:
                res.declared[target] = res.restarted[target] = None
                # A supervisor that adopts a child (its own restart) gives it the start
                # grace: one stopped just then and continued within it is rightly alive.
                adopted = any(e["event"] == "child_adopted" and e.get("child_pid") == pid
                              and abs(e["_t"] - t) <= ADOPTION_WINDOW_S
                              for e in restarted_by_child[host, name])
                if not (f["kind"] == "stop" and adopted):
                    res.problems.append(f"no peer_declared_dead for {target}")
                continue
            explained.update(id(e) for e in deaths)
            dead = deaths[0]
            res.declared[target] = dead["_t"] - t
            # `restarted`, or (when the supervisor that restarted it died before its
            # first beat) its new process adopted by that supervisor's successor.
            back = next((e for e in restarted_by_child[host, name]
                         if dead["_t"] <= e["_t"] <= dead["_t"] + MATCH_WITHIN_S
                         and (e["event"] == "restarted" or e.get("child_pid") != pid)), None)
            res.restarted[target] = None if back is None else back["_t"] - t
            if back is None:
                res.problems.append(f"no restarted for {target}")
        for p in res.problems:
            violations.append(f"fault at {f['at']:.1f}s ({res.group}): {p}")
    return results, explained


def _explain_roots_pair(res: FaultResult, events: list[dict[str, Any]],
                        explained: set[int]) -> None:
    """Both roots of a host killed at once (router and router-monitor, on several
    hosts): nothing beats for the host until its manager restarts them, so the others
    may rightly declare it dead. Such a verdict is explained, not required."""
    hosts = {split(t)[0] for t in res.targets}
    for host in hosts - {""}:
        if {f"{host}/router", f"{host}/router-monitor"} <= set(res.targets):
            explained.update(id(e) for e in events
                             if e.get("event") == "host_declared_dead"
                             and e.get("host") == host
                             and res.t - 0.05 <= e["_t"] <= res.t + MATCH_WITHIN_S)


def _match_host_fault(res: FaultResult, events: list[dict[str, Any]],
                      explained: set[int]) -> None:
    """A host killed or cut off: the others declare it dead (`host_declared_dead`; its
    lease revoked, its topics sequenced elsewhere), and it comes back: killed, its
    record appears again for the others (`host_joined`); cut off, it gave up its
    clients (`cluster_lost`) and then regained the cluster (`cluster_regained`)."""
    host, t = res.targets[0], res.t
    within = [e for e in events if t - 0.05 <= e["_t"] <= t + MATCH_WITHIN_S + 10]
    verdicts = [e for e in within if e.get("event") == "host_declared_dead"
                and e.get("host") == host and e.get("_host", "") != host]
    if not verdicts:
        res.declared[host] = res.restarted[host] = None
        res.problems.append(f"no host_declared_dead for {host}")
        return
    explained.update(id(e) for e in verdicts)
    res.declared[host] = verdicts[0]["_t"] - t
    if res.kind == "partition":
        if not any(e.get("event") == "cluster_lost" and e.get("_host", "") == host for e in within):
            res.problems.append(f"no cluster_lost on {host}")
        back = next((e for e in within if e.get("event") == "cluster_regained"
                     and e.get("_host", "") == host and e["_t"] > verdicts[0]["_t"]), None)
    else:
        back = next((e for e in within if e.get("event") == "host_joined"
                     and e.get("host") == host and e.get("_host", "") != host
                     and e["_t"] > verdicts[0]["_t"]), None)
    res.restarted[host] = None if back is None else back["_t"] - t
    if back is None:
        res.problems.append(f"{host} did not come back "
                            f"({'cluster_regained' if res.kind == 'partition' else 'host_joined'})")


def _deliveries(transcripts: dict[str, list[dict[str, Any]]], topic_of: dict[str, str],
                violations: list[str]) -> dict[str, int]:
    """Every acknowledged message must be shown, from its sender, by every member of its
    topic from the member's first sequence number on; members must agree on what each
    number carried; nobody shows a number twice, or a sender's lines out of order."""
    acked: dict[tuple[str, int], str] = {}
    counts = {"acked": 0, "acked_twice": 0, "gaps": 0, "duplicates": 0, "shown": 0,
              "disagreements": 0, "out_of_order": 0, "unacked": 0}
    for nick, tr in transcripts.items():
        topic = topic_of.get(nick, "")
        sent = sum(1 for e in tr if e["ev"] == "sent")
        acks = [e["seq"] for e in tr if e["ev"] == "acked" and isinstance(e.get("seq"), int)]
        counts["unacked"] += max(0, sent - len(acks))
        for seq in acks:
            key = (topic, seq)
            if key in acked:
                counts["acked_twice"] += 1
                violations.append(f"{topic} seq {seq} acknowledged twice: to {acked[key]} "
                                  f"and to {nick}")
            acked[key] = nick
    counts["acked"] = len(acked)
    carried: dict[tuple[str, int], tuple[Any, Any]] = {}
    for nick, tr in transcripts.items():
        topic = topic_of.get(nick, "")
        shown: dict[int, tuple[Any, Any]] = {}
        first: int | None = None
        last_n: dict[Any, int] = {}
        for e in tr:
            seq = e.get("seq")
            if e["ev"] in ("message", "acked") and isinstance(seq, int):
                first = seq if first is None else min(first, seq)
            if e["ev"] != "message" or not e.get("shown") or not isinstance(seq, int):
                continue
            counts["shown"] += 1
            what = (e.get("sender"), e.get("text"))
            if seq in shown:
                counts["duplicates"] += 1
                violations.append(f"{nick}: showed {topic} seq {seq} twice")
            shown[seq] = what
            agreed = carried.setdefault((topic, seq), what)
            if agreed != what:
                counts["disagreements"] += 1
                violations.append(f"{nick}: {topic} seq {seq} was {what}, others saw {agreed}")
            n = _line_number(e.get("text"))
            if n is not None:
                if n <= last_n.get(e.get("sender"), 0):
                    counts["out_of_order"] += 1
                    violations.append(f"{nick}: {e.get('text')!r} shown after line "
                                      f"{last_n[e.get('sender')]} of its sender")
                last_n[e.get("sender")] = n
        if first is None:
            continue
        for (t, seq), sender in sorted(acked.items()):
            if t != topic or sender == nick or seq < first:
                continue
            got = shown.get(seq)
            if got is None or got[0] != sender:
                counts["gaps"] += 1
                seen = "never shown" if got is None else f"shown as from {got[0]}"
                if counts["gaps"] <= 200:
                    violations.append(f"{nick}: {topic} seq {seq} acknowledged to {sender}, "
                                      f"{seen}")
    return counts


def _line_number(text: Any) -> int | None:
    """N of a soak client's line `soak NICK N`."""
    parts = text.split() if isinstance(text, str) else []
    return int(parts[2]) if len(parts) == 3 and parts[2].isdigit() else None


def _arrivals(transcripts: dict[str, list[dict[str, Any]]]) -> dict[str, list[float]]:
    return {nick: [e["t"] for e in tr if e["ev"] == "message" and e.get("shown")]
            for nick, tr in transcripts.items()}


def _outage(f: FaultResult, arrivals: dict[str, list[float]], topic_of: dict[str, str]) -> float:
    """The longest silence, across the clients the fault could touch, that spans the
    moment of injection: from the last message shown before it to the next one after."""
    if f.kind == "client_reset":
        nicks = list(f.targets)
    else:
        topics = {t.split("@", 1)[1] for t in f.targets if "@" in t}
        nicks = [n for n, t in topic_of.items() if not topics or t in topics]
    worst = 0.0
    for nick in nicks:
        times = arrivals.get(nick, [])
        i = bisect.bisect_right(times, f.t)
        if 0 < i < len(times):
            worst = max(worst, times[i] - times[i - 1])
    return worst


def _per_second(arrivals: dict[str, list[float]], t0: float, until: float) -> list[tuple[int, int]]:
    counts: dict[int, int] = defaultdict(int)
    for times in arrivals.values():
        for a in times:
            if t0 <= a <= until:
                counts[int(a - t0)] += 1
    return [(s, counts.get(s, 0)) for s in range(int(until - t0) + 1)]
