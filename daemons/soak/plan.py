"""Which faults a soak injects, and when: a pure function of the seed and the settings."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from theychat.daemons.tree import DaemonId, every_daemon

KINDS = ("kill", "stop", "kill_pair", "client_reset")
HOST_KINDS = ("host_kill", "partition")  # on a lab of several hosts (`--hosts`)
HOST_FAULT_GAP_S = 25.0  # a host fault, the host back, the cluster settled: then the next
HOST_AWAY_S = 12.0  # no fault on a host's daemons this soon after a fault of the host


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the traffic started
    kind: str  # one of KINDS
    targets: tuple[str, ...]  # daemon names (a pair: the daemon, then its supervisor),
    #                           one client's nick for client_reset, a host for HOST_KINDS;
    #                           on several hosts a daemon is HOST/NAME (`h1/router`)

    @property
    def label(self) -> str:
        return f"{self.kind} {'+'.join(self.targets)}"


def daemons_of(topics: list[str], hosts: Sequence[str] = ()) -> list[str]:
    """Every daemon a fault may hit: the whole tree (of every host, named HOST/NAME)."""
    names = [d.name for d in every_daemon(topics)]
    return [f"{h}/{n}" for h in hosts for n in names] if hosts else names


def split(target: str) -> tuple[str, str]:
    """(host, daemon) of a fault's target: host "" on one host."""
    host, _, name = target.rpartition("/")
    return host, name


def supervisor_of(target: str) -> str:
    """Who restarts `target` (the manager restarts the router only when both roots died),
    on the same host."""
    host, name = split(target)
    supervisor = DaemonId.parse(name).supervisor
    if supervisor is None:
        raise ValueError(f"{name!r} has no supervisor in the tree")
    return f"{host}/{supervisor.name}" if host else supervisor.name


def role_of(target: str) -> str:
    return str(DaemonId.parse(split(target)[1]).role)


def plan(seed: int, duration: float, every: float, topics: list[str], clients: list[str],
         kinds: tuple[str, ...] = KINDS, warmup: float = 3.0, quiet: float = 8.0,
         max_hits: int = 4, window_s: float = 30.0, hosts: Sequence[str] = ()
         ) -> list[Fault]:
    """Faults every `every` seconds from `warmup` until `quiet` seconds before the end.

    No daemon is hit more than `max_hits` times within `window_s` (one fewer than the
    restart intensity allows): a supervisor that gives up on purpose is not what a soak
    is after, and would end every later check of that daemon. With `hosts`, a host fault
    (HOST_KINDS) comes only HOST_FAULT_GAP_S after the last one and that long before the
    end, so that one host at most is away at a time (a majority stays) and every host is
    back for the end.
    """
    rng = random.Random(seed)
    names = daemons_of(topics, hosts)
    faults: list[Fault] = []
    hits: dict[str, list[float]] = {n: [] for n in names}
    last_host_fault = -HOST_FAULT_GAP_S
    at = warmup
    while at <= duration - quiet:
        for _ in range(20):  # a few tries to find a fault the intensity guard allows
            kind = rng.choice(kinds)
            if kind == "client_reset":
                if not clients:
                    continue
                fault = Fault(round(at, 3), kind, (rng.choice(clients),))
                break
            if kind in HOST_KINDS:
                if (not hosts or at - last_host_fault < HOST_FAULT_GAP_S
                        or at + HOST_FAULT_GAP_S > duration):
                    continue
                last_host_fault = at
                fault = Fault(round(at, 3), kind, (rng.choice(list(hosts)),))
                break
            victim = rng.choice(names)
            targets = (victim, supervisor_of(victim)) if kind == "kill_pair" else (victim,)
            if hosts and any(f.kind in HOST_KINDS and f.targets[0] == split(victim)[0]
                             and at - f.at < HOST_AWAY_S for f in faults):
                continue  # its host is still coming back
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
