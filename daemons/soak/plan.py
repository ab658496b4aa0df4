"""Which faults a soak injects, and when: a pure function of the seed and the settings."""

from __future__ import annotations

import random
from dataclasses import dataclass

from theychat.daemons.tree import DaemonId, every_daemon

KINDS = ("kill", "stop", "kill_pair", "client_reset")


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the traffic started
    kind: str  # one of KINDS
    targets: tuple[str, ...]  # daemon names (a pair: the daemon, then its supervisor),
    #                           or one client's nick for client_reset

    @property
    def label(self) -> str:
        return f"{self.kind} {'+'.join(self.targets)}"


def daemons_of(topics: list[str]) -> list[str]:
    """Every daemon a fault may hit: the whole tree."""
    return [d.name for d in every_daemon(topics)]


def supervisor_of(name: str) -> str:
    """Who restarts `name` (the manager restarts the router only when both roots died)."""
    supervisor = DaemonId.parse(name).supervisor
    if supervisor is None:
        raise ValueError(f"{name!r} has no supervisor in the tree")
    return supervisor.name


def role_of(name: str) -> str:
    return str(DaemonId.parse(name).role)


def plan(seed: int, duration: float, every: float, topics: list[str], clients: list[str],
         kinds: tuple[str, ...] = KINDS, warmup: float = 3.0, quiet: float = 8.0,
         max_hits: int = 4, window_s: float = 30.0) -> list[Fault]:
    """Faults every `every` seconds from `warmup` until `quiet` seconds before the end.

    No daemon is hit more than `max_hits` times within `window_s` (one fewer than the
    restart intensity allows): a supervisor that gives up on purpose is not what a soak
    is after, and would end every later check of that daemon.
    """
    rng = random.Random(seed)
    names = daemons_of(topics)
    faults: list[Fault] = []
    hits: dict[str, list[float]] = {n: [] for n in names}
    at = warmup
    while at <= duration - quiet:
        for _ in range(20):  # a few tries to find a fault the intensity guard allows
            kind = rng.choice(kinds)
            if kind == "client_reset":
                if not clients:
                    continue
                fault = Fault(round(at, 3), kind, (rng.choice(clients),))
                break
            victim = rng.choice(names)
            targets = (victim, supervisor_of(victim)) if kind == "kill_pair" else (victim,)
            if all(len([h for h in hits[t] if at - h < window_s]) < max_hits for t in targets):
                for t in targets:
                    hits[t].append(at)
                fault = Fault(round(at, 3), kind, targets)
                break
        else:
            at += every
            continue
        faults.append(fault)
        at += every
    return faults
