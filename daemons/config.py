"""Typed configuration, loaded from YAML and validated once at start.

Every key is optional: `Config()` is the embedded default. Errors name the dotted key
(`heartbeat.interval_ms: expected an integer, got 'fast'`) so an operator can fix the
file without reading code.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from theychat.daemons import passwords
from theychat.daemons.errors import ConfigError
from theychat.daemons.protocol import valid_name

LOG_LEVELS = ("debug", "info", "warning", "error")


def _range(lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    return {"min": lo, "max": hi}


@dataclass(frozen=True)
class Tls:
    cert: str | None = None  # PEM certificate chain; TLS is on when cert and key are set
    key: str | None = None
    plain_port: int | None = field(default=None, metadata=_range(1, 65535))

    @property
    def enabled(self) -> bool:
        return bool(self.cert and self.key)


@dataclass(frozen=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = field(default=7000, metadata=_range(1, 65535))
    tls: Tls = field(default_factory=Tls)


@dataclass(frozen=True)
class History:
    size: int = field(default=1000, metadata=_range(0, 1_000_000))
    on_join: int = field(default=20, metadata=_range(0, 1000))


@dataclass(frozen=True)
class Heartbeat:
    interval_ms: int = field(default=100, metadata=_range(10, 60_000))
    timeout_ms: int = field(default=500, metadata=_range(20, 600_000))


@dataclass(frozen=True)
class Log:
    level: str = field(default="info", metadata={"choices": LOG_LEVELS})


@dataclass(frozen=True)
class Clients:
    max_connections: int = field(default=10_000, metadata=_range(1, 1_000_000))
    # Connected sessions from one address (one host, or a NAT in front of many people).
    max_per_address: int = field(default=50, metadata=_range(1, 1_000_000))
    output_queue_bytes: int = field(default=256 * 1024, metadata=_range(4096, 1 << 30))
    rate_per_second: float = field(default=20.0, metadata=_range(0.1, 1_000_000))
    rate_burst: int = field(default=50, metadata=_range(1, 1_000_000))
    keepalive_idle_s: int = field(default=15, metadata=_range(1, 7200))
    keepalive_interval_s: int = field(default=5, metadata=_range(1, 600))
    keepalive_count: int = field(default=3, metadata=_range(1, 100))


@dataclass(frozen=True)
class Supervision:
    max_restarts: int = field(default=5, metadata=_range(1, 1000))
    window_s: float = field(default=30.0, metadata=_range(0.1, 86_400))
    backoff_initial_ms: int = field(default=0, metadata=_range(0, 60_000))
    backoff_step_ms: int = field(default=50, metadata=_range(0, 60_000))
    backoff_max_ms: int = field(default=1000, metadata=_range(0, 600_000))
    start_timeout_ms: int = field(default=5000, metadata=_range(100, 600_000))
    # How supervisors start and restart children: processes of their own, or systemd
    # units through systemctl (docs/systemd.md). Same detection and decisions either way.
    backend: str = field(default="spawn", metadata={"choices": ("spawn", "systemd")})
    # A second, idle process per topic server (spawn backend), already started and
    # waiting for its monitor's word: a restart tells it to go, saving the Python
    # start-up (~100 ms) from every server restart.
    warm_standby: bool = True


@dataclass(frozen=True)
class WalSettings:
    fsync: str = field(default="batch", metadata={"choices": ("always", "batch", "never")})
    snapshot_every: int = field(default=1000, metadata=_range(10, 10_000_000))


@dataclass(frozen=True)
class Sessions:
    expiry_s: int = field(default=300, metadata=_range(1, 30 * 86_400))


def _default_topics() -> list[str]:
    return ["general", "random"]


@dataclass(frozen=True)
class Topics:
    """`topics: [a, b]` is shorthand for `topics: {names: [a, b]}`."""

    names: list[str] = field(default_factory=_default_topics)
    allow_create: bool = True
    max: int = field(default=50, metadata=_range(1, 10_000))


@dataclass(frozen=True)
class Operator:
    name: str
    # scrypt$N$r$p$salt_hex$hash_hex, made by `theychat hash-password`; never a password
    password_hash: str


@dataclass(frozen=True)
class Cluster:
    """Several hosts on etcd (docs/cluster.md). Without this section: one host."""

    name: str  # the key prefix in etcd (/theychat/NAME/): clusters may share an etcd
    host: str  # this host's id, unique in the cluster
    etcd: list[str]  # client URLs of the etcd members (http://10.0.0.1:2379, ...)
    advertise: str  # the address the other hosts reach this one on
    key_file: str  # the shared secret of links and heartbeats (theychat cluster-key FILE)
    port: int = field(default=7100, metadata=_range(1, 65535))  # links (TCP), beats (UDP)
    # Where clients find the cluster: every host's client port (theychat chat --config).
    front_doors: list[str] = field(default_factory=list)
    # The host's lease in etcd: what its sequencer keys live by when nobody revokes it.
    # A restarted router takes it back, so it must outlive a router's restart on a
    # loaded host (seen: 2-3 s); a dead host's is revoked by the others' heartbeats.
    lease_ttl_s: int = field(default=10, metadata=_range(2, 600))
    # Cut off from etcd this long, a host closes its clients so they move elsewhere.
    lost_after_s: float = field(default=5.0, metadata=_range(1.0, 3600))


@dataclass(frozen=True)
class Config:
    state_dir: str | None = None
    listen: Listen = field(default_factory=Listen)
    topics: Topics = field(default_factory=Topics)
    operators: list[Operator] = field(default_factory=list)
    history: History = field(default_factory=History)
    heartbeat: Heartbeat = field(default_factory=Heartbeat)
    log: Log = field(default_factory=Log)
    clients: Clients = field(default_factory=Clients)
    supervision: Supervision = field(default_factory=Supervision)
    wal: WalSettings = field(default_factory=WalSettings)
    sessions: Sessions = field(default_factory=Sessions)
    cluster: Cluster | None = None

    def resolved_state_dir(self) -> Path:
        """Where this tree keeps its state: the config, then systemd, then XDG."""
        if self.state_dir:
            return Path(self.state_dir).expanduser().absolute()
        if os.environ.get("STATE_DIRECTORY"):
            # systemd may pass several colon-separated directories; the first is ours.
            return Path(os.environ["STATE_DIRECTORY"].split(":")[0]).absolute()
        xdg = os.environ.get("XDG_STATE_HOME")
        base = Path(xdg) if xdg else Path.home() / ".local" / "state"
        return (base / "theychat").absolute()


def _describe(value: Any) -> str:
    return repr(value) if not isinstance(value, dict | list) else type(value).__name__


def _convert(value: Any, tp: Any, key: str, meta: typing.Mapping[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key, meta)
    if dataclasses.is_dataclass(tp):
        if value is None:
            return typing.cast(Any, tp)()
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}")
        return _build(tp, value, key + ".")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        return [_convert(v, item_tp, f"{key}[{i}]", {}) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_describe(value)}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {_describe(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    elif tp is str and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {_describe(value)}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise ConfigError(f"{key}: must be at least {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: must be at most {hi}, got {value!r}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _build(cls: Any, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in fields:
            known = ", ".join(sorted(fields))
            shown = k if isinstance(k, str) and k.isprintable() else repr(k)
            raise ConfigError(f"{prefix}{shown}: unknown key (known keys here: {known})")
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in data:
            raise ConfigError(f"{prefix}{name}: required")
    kwargs = {
        name: _convert(data[name], hints[name], prefix + name, f.metadata)
        for name, f in fields.items()
        if name in data
    }
    return cls(**kwargs)


def _check(cfg: Config, topics_key: str) -> None:
    names = cfg.topics.names
    if not names:
        raise ConfigError(f"{topics_key}: expected at least one topic")
    seen: set[str] = set()
    for i, t in enumerate(names):
        if not isinstance(t, str) or not valid_name(t):
            raise ConfigError(f"{topics_key}[{i}]: {t!r} is not 1-32 of A-Z a-z 0-9 _ -")
        if t.lower() in seen:
            raise ConfigError(f"{topics_key}[{i}]: {t!r} is listed twice")
        seen.add(t.lower())
    if len(names) > cfg.topics.max:
        raise ConfigError(f"topics.max: {cfg.topics.max} is less than the "
                          f"{len(names)} topics configured")
    for i, op in enumerate(cfg.operators):
        if not valid_name(op.name):
            raise ConfigError(f"operators[{i}].name: {op.name!r} is not a valid nick")
        if not passwords.well_formed(op.password_hash):
            raise ConfigError(f"operators[{i}].password_hash: expected a hash made by "
                              "`theychat hash-password` (never the password itself)")
    if cfg.heartbeat.timeout_ms <= cfg.heartbeat.interval_ms:
        raise ConfigError(
            "heartbeat.timeout_ms: must be greater than heartbeat.interval_ms "
            f"({cfg.heartbeat.timeout_ms} <= {cfg.heartbeat.interval_ms})"
        )
    if not cfg.listen.host:
        raise ConfigError("listen.host: must not be empty")
    tls = cfg.listen.tls
    if bool(tls.cert) != bool(tls.key):
        raise ConfigError("listen.tls: set both cert and key, or neither")
    if tls.plain_port is not None and not tls.enabled:
        raise ConfigError("listen.tls.plain_port: only with listen.tls.cert and key")
    if tls.plain_port == cfg.listen.port:
        raise ConfigError("listen.tls.plain_port: must differ from listen.port")
    if cfg.cluster is not None:
        _check_cluster(cfg.cluster)


def _check_cluster(c: Cluster) -> None:
    for key in ("name", "host"):
        if not valid_name(getattr(c, key)):
            raise ConfigError(f"cluster.{key}: {getattr(c, key)!r} is not 1-32 of "
                              "A-Z a-z 0-9 _ -")
    if not c.etcd:
        raise ConfigError("cluster.etcd: expected at least one endpoint URL")
    for i, url in enumerate(c.etcd):
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("http", "https") or not rest or "/" in rest.rstrip("/"):
            raise ConfigError(f"cluster.etcd[{i}]: {url!r} is not an URL such as "
                              "http://10.0.0.1:2379")
    if not c.advertise or any(ch.isspace() for ch in c.advertise):
        raise ConfigError("cluster.advertise: expected this host's address, as the others "
                          "reach it")
    if not c.key_file:
        raise ConfigError("cluster.key_file: expected a path (theychat cluster-key FILE)")
    for i, door in enumerate(c.front_doors):
        host, sep, port = door.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"cluster.front_doors[{i}]: {door!r} is not HOST:PORT")


def from_mapping(data: Any) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"top level: expected a mapping of keys, got {_describe(data)}")
    topics_key = "topics"
    if isinstance(data.get("topics"), list):  # the short form: just the names
        data = {**data, "topics": {"names": data["topics"]}}
    elif isinstance(data.get("topics"), dict):
        topics_key = "topics.names"
    try:
        cfg: Config = _build(Config, data)
    except ConfigError as e:
        if topics_key == "topics" and str(e).startswith("topics.names"):
            raise ConfigError("topics" + str(e)[len("topics.names"):]) from None
        raise
    _check(cfg, topics_key)
    return cfg


def load(path: str | os.PathLike[str] | None) -> Config:
    """Load and validate a config file; `None` means the embedded defaults."""
    if path is None:
        return from_mapping({})
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config is not valid UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None
    return from_mapping(data)
