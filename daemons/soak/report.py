"""A soak's verdict as report.md and timeline.png, readable without TheyChat."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from theychat.daemons.soak.judge import Verdict

MAX_VIOLATIONS_SHOWN = 100
NO_TIMELINE = ("timeline.png was not drawn: it needs matplotlib "
               "(pip install 'theychat[soak]')")


def can_draw() -> bool:
    """Whether matplotlib is there to draw the timeline (the `soak` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def markdown(verdict: Verdict, run: dict[str, Any], drawn: bool = True) -> str:
    lines = [
        f"# TheyChat soak: {'PASS' if verdict.ok else 'FAIL'}",
        "",
        f"- duration {run['duration']:.0f} s of traffic, seed {run['seed']}, "
        f"{len(run['clients'])} clients at {run['rate']:g} lines/s each, topics "
        f"{', '.join(run['topics'])}",
        f"- a fault every {run['fault_every']:g} s ({', '.join(run['kinds'])}), "
        f"{len(verdict.faults)} injected",
        f"- {verdict.facts['acked']} messages acknowledged, {verdict.facts['deliveries']} "
        f"deliveries shown, {verdict.facts['restarts']} restarts logged",
        f"- {verdict.facts['unacked']} lines sent but never acknowledged (not gaps: lines "
        "in flight when a connection was cut, or read but not yet logged by a server that "
        "was killed; their senders were never told they were taken; see docs/recovery.md)",
        f"- command: `{run['command']}`",
        "",
        "Judged only from the daemons' logs (`logs/`), the clients' transcripts "
        "(`clients/`), the injector's record (`faults.jsonl`) and the final status "
        "(`status.json`), all in this directory.",
        "",
        "## Checks",
        "",
        "| check | figure | result |",
        "|---|---|---|",
    ]
    for c in verdict.checks:
        lines.append(f"| {c.name} | {c.figure} | {'ok' if c.ok else '**FAIL**'} |")
    gap = verdict.facts.get("normal_gap")
    lines += [
        "",
        "## Detection, recovery and client-visible outage per kind of fault (ms)",
        "",
        "Detection: injection to `peer_declared_dead` of the first daemon hit. Recovery: "
        "injection to the last `restarted` of the daemons hit. Outage: the longest "
        "silence, for any client the fault could touch, spanning the injection (from the "
        "last message shown before it to the next one shown after it); for comparison, "
        f"the silence between two messages without faults is p50 {ms(gap[0] if gap else None)}"
        f", p99 {ms(gap[1] if gap else None)} ms.",
        "",
        "| fault | n | detection p50 / p99 / max | recovery p50 / p99 / max | "
        "outage p50 / p99 / max |",
        "|---|---|---|---|---|",
    ]
    for name, g in verdict.groups.items():
        cells = []
        for key in ("detection", "recovery", "outage"):
            p = g[key]
            cells.append("-" if p is None else f"{ms(p[0])} / {ms(p[1])} / {ms(p[2])}")
        lines.append(f"| {name} | {g['count']} | {' | '.join(cells)} |")
    lines += ["", "## Faults", "", "| at (s) | fault | detection | recovery | outage | problems |",
              "|---|---|---|---|---|---|"]
    t0 = run["traffic_from"]
    for f in verdict.faults:
        lines.append(f"| {f.t - t0:.1f} | {f.kind} {'+'.join(f.targets)} | {ms(f.detection_s)} "
                     f"| {ms(f.recovered_s)} | {ms(f.outage_s)} | {'; '.join(f.problems)} |")
    lines += ["", "## Violations", ""]
    if not verdict.violations:
        lines.append("None.")
    for v in verdict.violations[:MAX_VIOLATIONS_SHOWN]:
        lines.append(f"- {v}")
    if len(verdict.violations) > MAX_VIOLATIONS_SHOWN:
        lines.append(f"- ... and {len(verdict.violations) - MAX_VIOLATIONS_SHOWN} more")
    lines += ["", "![timeline](timeline.png)" if drawn else f"({NO_TIMELINE}.)", ""]
    return "\n".join(lines)


def timeline(verdict: Verdict, run: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no screen: render straight to a file
    import matplotlib.pyplot as plt

    t0 = run["traffic_from"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
    xs = [s for s, _ in verdict.per_second]
    top.plot(xs, [n for _, n in verdict.per_second], color="tab:blue", lw=1,
             label="deliveries shown per second")
    colours = {"kill": "tab:red", "stop": "tab:orange", "kill_pair": "tab:purple",
               "client_reset": "tab:gray"}
    peak = max([n for _, n in verdict.per_second] or [1]) or 1
    # Faults as ticks along the bottom: full-height lines would hide the curve in a long run.
    for kind, colour in colours.items():
        xs_kind = [f.t - t0 for f in verdict.faults if f.kind == kind]
        if xs_kind:
            top.vlines(xs_kind, 0, peak * 0.12, colors=colour, lw=0.9, label=kind)
    if verdict.restarts:
        top.scatter([t for t, _ in verdict.restarts], [peak * 1.08] * len(verdict.restarts),
                    marker="v", color="tab:green", s=14, label="restarted")
    top.set_ylim(0, peak * 1.15)
    top.set_ylabel("deliveries / s")
    top.legend(loc="center left", fontsize=8, ncol=6)
    top.set_title(f"TheyChat soak, seed {run['seed']}: {'PASS' if verdict.ok else 'FAIL'}")
    bottom.bar([f.t - t0 for f in verdict.faults],
               [(f.outage_s or 0) * 1000 for f in verdict.faults],
               width=max(0.3, run["fault_every"] / 4),
               color=[colours.get(f.kind, "k") for f in verdict.faults])
    bottom.set_ylabel("outage per fault (ms)")
    bottom.set_xlabel("seconds since traffic started")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
