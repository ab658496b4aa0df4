"""The supervision tree of one host, declared once.

Everything else derives from `ROLES`: daemon names (`server-monitor@rust`), who
supervises whom (and so where each daemon sends its heartbeats), the module each role
runs, which daemons `theychat status` expects, what `theychat up`, the process manager
and systemd start first, and the soak's fault plan. Per role, like Erlang/OTP's
child_spec, how it is restarted and how long it is given to stop.

```
router  <--------------->  router-monitor     restart each other (the roots)
  |
  +--> server-monitor@T  --> server@T          one pair per topic
```
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(enum.StrEnum):
    ROUTER = "router"
    ROUTER_MONITOR = "router-monitor"
    SERVER = "server"
    SERVER_MONITOR = "server-monitor"
    MANAGER = "manager"  # the process manager `theychat up` leaves: outside the tree


class Restart(enum.StrEnum):
    """OTP's restart types, as far as a daemon of ours can end."""

    PERMANENT = "permanent"  # restarted however it ended, a clean exit included
    TRANSIENT = "transient"  # restarted unless it ended cleanly (its pid file says so)


@dataclass(frozen=True)
class RoleSpec:
    role: Role
    module: str  # what `python -m` runs
    supervisor: Role | None  # who restarts it; None: only the process manager or systemd
    per_topic: bool  # one per topic (`server@rust`), or one per host
    summary: str
    restart: Restart = Restart.PERMANENT
    shutdown_ms: int = 10_000  # after SIGTERM, SIGKILL once this has passed
    standby: bool = False  # a warm standby waits to take over (spawn backend)


# Permanent everywhere: an administrator's SIGTERM to one daemon is a failure to repair
# like any other; stopping on purpose is `theychat down` (the stopping marker) or systemd.
ROLES: dict[Role, RoleSpec] = {s.role: s for s in (
    RoleSpec(Role.ROUTER, "theychat.daemons.router", Role.ROUTER_MONITOR, False,
             "the client port, the lobby and the directory"),
    RoleSpec(Role.ROUTER_MONITOR, "theychat.daemons.router_monitor", Role.ROUTER, False,
             "restarts the router; keeps copies of the lobby's sockets"),
    RoleSpec(Role.SERVER, "theychat.daemons.server", Role.SERVER_MONITOR, True,
             "one topic: members, messages, history", standby=True),
    RoleSpec(Role.SERVER_MONITOR, "theychat.daemons.server_monitor", Role.ROUTER, True,
             "restarts its topic's server; keeps copies of its members' sockets"),
)}
MANAGER = RoleSpec(Role.MANAGER, "theychat.daemons.manager", None, False,
                   "restarts the router when the router and its monitor are both dead")
# What `theychat up` and the process manager start: it starts everything else.
ROOT = Role.ROUTER


def spec_of(role: Role) -> RoleSpec:
    return MANAGER if role is Role.MANAGER else ROLES[role]


@dataclass(frozen=True)
class DaemonId:
    """One daemon of the tree: its role, and its topic if the role has one per topic."""

    role: Role
    topic: str | None = None

    def __post_init__(self) -> None:
        if spec_of(self.role).per_topic != (self.topic is not None):
            raise ValueError(f"{self.role}: {'needs' if self.topic is None else 'has no'} "
                             "topic")

    @property
    def name(self) -> str:
        """`router`, `router-monitor`, `server@rust`, `server-monitor@rust` (systemd-style)."""
        return f"{self.role}@{self.topic}" if self.topic else str(self.role)

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str) -> DaemonId:
        role, _, topic = name.partition("@")
        try:
            return cls(Role(role), topic or None)
        except ValueError:
            raise ValueError(f"not a daemon of the tree: {name!r}") from None

    @property
    def spec(self) -> RoleSpec:
        return spec_of(self.role)

    @property
    def supervisor(self) -> DaemonId | None:
        """Who restarts this daemon, and so receives its heartbeats."""
        role = self.spec.supervisor
        if role is None:
            return None
        return DaemonId(role, self.topic if ROLES[role].per_topic else None)

    def children(self, topics: list[str]) -> list[DaemonId]:
        """The daemons this one supervises, given the topics of the tree."""
        return [d for d in every_daemon(topics) if d.supervisor == self]


def every_daemon(topics: list[str]) -> list[DaemonId]:
    """Every daemon of a tree with these topics, in the order `theychat status` shows:
    the host's own first, then each topic's."""
    out = [DaemonId(s.role) for s in ROLES.values() if not s.per_topic]
    for t in topics:
        out += [DaemonId(s.role, t) for s in ROLES.values() if s.per_topic]
    return out


def holder(topic: str | None) -> DaemonId:
    """The daemon that holds a person's socket while they are in `topic` (None: the
    lobby, which is the root's); its supervisor keeps a copy of that socket."""
    return DaemonId(ROOT) if topic is None else DaemonId(Role.SERVER, topic)


def roots() -> tuple[DaemonId, DaemonId]:
    """The root and its supervisor, which restart each other: only when both are dead
    does the process manager (or systemd) step in."""
    root = DaemonId(ROOT)
    partner = root.supervisor
    assert partner is not None and partner.supervisor == root
    return root, partner


def command(daemon: DaemonId, state_dir: str, config: str | None,
            standby: bool = False) -> list[str]:
    """The arguments of `python` that run `daemon` on this state directory and config."""
    args = ["-m", daemon.spec.module, "--state-dir", state_dir]
    if config:
        args += ["--config", config]
    if daemon.topic:
        args += ["--topic", daemon.topic]
    if standby:
        args.append("--standby")
    return args


@dataclass(frozen=True)
class ChildSpec:
    """What a supervisor knows of one child (OTP's child_spec): who it is, how to start it,
    and, from its role, how to restart it and how long it may take to stop."""

    id: DaemonId
    args: list[str]  # python arguments: ["-m", "theychat.daemons.server", ...]

    @property
    def name(self) -> str:
        return self.id.name

    @property
    def role(self) -> Role:
        return self.id.role

    @property
    def topic(self) -> str | None:
        return self.id.topic

    @property
    def restart(self) -> Restart:
        return self.id.spec.restart

    @property
    def shutdown_s(self) -> float:
        return self.id.spec.shutdown_ms / 1000

    @property
    def standby(self) -> bool:
        return self.id.spec.standby
