"""What daemons ask each other, typed: one frozen class per control op.

A request on a control socket is `{"op": NAME, ...fields}`. `decode` turns it into the
op's class, checking every field against its type (and, where a field says so, against
a rule such as "a valid nick"), so a bad request is answered with an error that names
the field (`bad_request`: `adopt.session.sid: expected a string`) and never reaches a
handler. Each daemon answers through a `Dispatcher`: a table from op class to handler,
with `unknown_op` for anything else. Replies stay plain `{"ok": ...}` objects
(`control.ok` / `control.fail`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from theychat.daemons.control import Message, fail
from theychat.daemons.errors import ControlError
from theychat.daemons.protocol import valid_name

R = TypeVar("R", bound="Record | Op")
MAX_ITEMS = 10_000  # a list field of one request


def _name(what: str = "a name") -> dict[str, Any]:
    """Field metadata: the string must be a valid nick or topic name."""
    return {"check": valid_name, "what": what}


def _sid() -> dict[str, Any]:
    return {"check": lambda s: 1 <= len(s) <= 64, "what": "a session id"}


_OPS: dict[str, type[Op]] = {}


@dataclass(frozen=True, kw_only=True)
class Op:
    """Base of every control op; a subclass names itself: `class Status(Op, name=...)`."""

    name: ClassVar[str] = ""

    def __init_subclass__(cls, name: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name:
            cls.name = name
            _OPS[name] = cls

    def message(self) -> Message:
        """The request as it goes on the wire."""
        return {"op": self.name, **_encode(self)}


@dataclass(frozen=True, kw_only=True)
class Record:
    """A nested object of a request (a session, a member), checked like an op's fields."""


# --- records that travel inside requests ---------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Conn(Record):
    """What travels with a client socket: whose it is and how it is spoken to."""

    sid: str = field(metadata=_sid())
    json: bool = False


@dataclass(frozen=True, kw_only=True)
class MemberRecord(Record):
    sid: str = field(metadata=_sid())
    nick: str = field(metadata=_name("a nick"))


# --- every daemon --------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Status(Op, name="status"):
    """How the daemon is: state, pid, uptime, and what its role adds."""


@dataclass(frozen=True, kw_only=True)
class FdResync(Op, name="fd_resync"):
    """Our monitor restarted and holds nothing: store every socket with it again."""


# --- the router ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Topics(Op, name="topics"):
    """The topics, with member counts and whether each is available."""


@dataclass(frozen=True, kw_only=True)
class Adopt(Op, name="adopt"):
    """Take this client socket (the fd attached), with the bytes it had sent but we had
    not read. To the router: back to the lobby. To a server: into its topic."""

    session: Conn
    nick: str | None = field(default=None, metadata=_name("a nick"))  # as its sender knows it
    pending: str = ""  # hex
    came_from: str | None = field(default=None, metadata=_name("a topic name"))
    notice: str | None = None
    resume_after: int | None = None  # a resume: send what came after this seq
    resumed: bool = False  # a resume: end with `caught_up` (the last line taken)

    def pending_bytes(self) -> bytes:
        try:
            return bytes.fromhex(self.pending)
        except ValueError:
            raise ControlError("adopt.pending: expected hex", "bad_request") from None


@dataclass(frozen=True, kw_only=True)
class SessionAt(Op, name="session_at"):
    """A server took a session into its topic."""

    sid: str = field(metadata=_sid())
    nick: str = field(metadata=_name("a nick"))
    topic: str = field(metadata=_name("a topic name"))


@dataclass(frozen=True, kw_only=True)
class SessionEnd(Op, name="session_end"):
    """A session's connection ended: `quit` ends it, anything else detaches it."""

    sid: str = field(metadata=_sid())
    reason: str = "connection lost"


@dataclass(frozen=True, kw_only=True)
class Rename(Op, name="nick"):
    """Take this nick for this session (checked against the registry)."""

    sid: str = field(metadata=_sid())
    nick: str = field(metadata=_name("a nick"))


@dataclass(frozen=True, kw_only=True)
class Dm(Op, name="dm"):
    """Deliver a direct message from this session's person, wherever the nick is."""

    sid: str = field(metadata=_sid())
    to: str = field(metadata=_name("a nick"))
    text: str


@dataclass(frozen=True, kw_only=True)
class Who(Op, name="who"):
    topic: str = field(metadata=_name("a topic name"))


@dataclass(frozen=True, kw_only=True)
class CreateTopic(Op, name="create_topic"):
    topic: str = field(metadata=_name("a topic name"))
    sid: str = field(metadata=_sid())


@dataclass(frozen=True, kw_only=True)
class DropTopic(Op, name="drop_topic"):
    """Drop a topic on behalf of a session; `op_here`: it is an operator of that topic."""

    topic: str = field(metadata=_name("a topic name"))
    sid: str = field(metadata=_sid())
    op_here: bool = False


@dataclass(frozen=True, kw_only=True)
class Oper(Op, name="oper"):
    sid: str = field(metadata=_sid())
    user: str = field(metadata=_name("an operator name"))
    password: str


@dataclass(frozen=True, kw_only=True)
class TopicInfo(Op, name="topic_info"):
    topic: str = field(metadata=_name("a topic name"))


@dataclass(frozen=True, kw_only=True)
class SessionInfo(Op, name="session"):
    """What the directory knows of one session: nick, place, operator rights."""

    sid: str = field(metadata=_sid())


@dataclass(frozen=True, kw_only=True)
class Locate(Op, name="locate"):
    """Where the directory places these sessions (a restarted server's check)."""

    sids: list[str]


@dataclass(frozen=True, kw_only=True)
class ServerHello(Op, name="server_hello"):
    """A server's members at its start."""

    topic: str = field(metadata=_name("a topic name"))
    members: list[MemberRecord]


@dataclass(frozen=True, kw_only=True)
class TopicDown(Op, name="topic_down"):
    """A server-monitor gave up on its server."""

    topic: str = field(metadata=_name("a topic name"))


# --- a topic server ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Members(Op, name="members"):
    """The topic's members (session id and nick)."""


@dataclass(frozen=True, kw_only=True)
class Deliver(Op, name="deliver"):
    """Send this event (a direct message) to one member."""

    sid: str = field(metadata=_sid())
    event: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class DropSession(Op, name="drop"):
    """A newer connection resumed this session: tell the old one and close it."""

    sid: str = field(metadata=_sid())


@dataclass(frozen=True, kw_only=True)
class Evacuate(Op, name="evacuate"):
    """The topic is dropped: move every member to the lobby, with this notice."""

    notice: str


@dataclass(frozen=True, kw_only=True)
class Kick(Op, name="kick"):
    """Kick a member whose socket this server holds (asked from another host)."""

    sid: str = field(metadata=_sid())
    by: str = field(metadata=_name("a nick"))
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class TakeLink(Op, name="take_link"):
    """A link from a follower on another host (the fd attached), for the sequencer."""

    pending: str = ""  # hex: what the router read past the routing line


@dataclass(frozen=True, kw_only=True)
class ClusterLost(Op, name="cluster_lost"):
    """This host is cut off from the cluster: close every client, with this notice."""

    notice: str


@dataclass(frozen=True, kw_only=True)
class HostGone(Op, name="host_gone"):
    """Another host is gone (its lease was revoked or ran out): its members leave."""

    host: str = field(metadata=_name("a host id"))


# --- monitors ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FdStore(Op, name="fd_store"):
    """Keep the attached socket (none: update the record only) under `id`."""

    id: str
    meta: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class FdDrop(Op, name="fd_drop"):
    id: str


@dataclass(frozen=True, kw_only=True)
class FdFetch(Op, name="fd_fetch"):
    """The next batch of kept sockets, those with ids after `after`."""

    after: str = ""


@dataclass(frozen=True, kw_only=True)
class FdHeld(Op, name="fd_held"):
    """Is a socket kept under `id`? (Did our worker take it before it died?)"""

    id: str


@dataclass(frozen=True, kw_only=True)
class StopChild(Op, name="stop_child"):
    """The topic is dropped: stop the server for good, then the monitor itself."""


# --- the codec -----------------------------------------------------------------------


def _describe(value: Any) -> str:
    if isinstance(value, dict | list):
        return type(value).__name__
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def _check(value: Any, tp: Any, where: str, meta: Mapping[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _check(value, inner, where, meta)
    if isinstance(tp, type) and issubclass(tp, Record):
        if not isinstance(value, dict):
            raise _bad(where, "an object", value)
        return _build(tp, value, where + ".")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list) or len(value) > MAX_ITEMS:
            raise _bad(where, f"a list of at most {MAX_ITEMS}", value)
        return [_check(v, item, f"{where}[{i}]", {}) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _bad(where, "an object", value)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _bad(where, "true or false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(where, "an integer", value)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _bad(where, "a string", value)
        check = meta.get("check")
        if check is not None and not check(value):
            raise _bad(where, str(meta.get("what", "a valid value")), value)
        return value
    raise TypeError(f"{where}: no rule for {tp!r}")  # a field type this codec lacks: a bug


def _bad(where: str, expected: str, value: Any) -> ControlError:
    return ControlError(f"{where}: expected {expected}, got {_describe(value)}", "bad_request")


def _build(cls: type[Any], data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _check(data[f.name], hints[f.name], prefix + f.name, f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ControlError(f"{prefix}{f.name}: missing", "bad_request")
    return cls(**kwargs)


def _encode(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Record):
            value = _encode(value)
        elif isinstance(value, list):
            value = [_encode(v) if isinstance(v, Record) else v for v in value]
        out[f.name] = value
    return out


def decode(msg: Message) -> Op:
    """The typed op of a request; ControlError (`unknown_op`, `bad_request`) if none."""
    name = msg.get("op")
    if not isinstance(name, str):
        raise ControlError("missing 'op'", "bad_request")
    cls = _OPS.get(name)
    if cls is None:
        raise ControlError(f"unknown op {name[:40]!r}", "unknown_op")
    op: Op = _build(cls, msg, f"{name}.")
    return op


def record(cls: type[R], data: Any, where: str) -> R:
    """A Record (or op) from a mapping, checked like a request (for replies we read)."""
    if not isinstance(data, dict):
        raise _bad(where, "an object", data)
    built: R = _build(cls, data, where + ".")
    return built


def to_dict(rec: Record) -> dict[str, Any]:
    return _encode(rec)


Handler = Callable[[Any, list[int]], Awaitable[Message] | Message]


class Dispatcher:
    """Answers a daemon's control requests from its table: op class -> handler.

    A handler gets the decoded op and the fds that came with it (it takes ownership of
    those it pops; the control server closes the rest)."""

    def __init__(self, served_by: str, table: Mapping[type[Op], Handler]) -> None:
        self.served_by = served_by
        self.table = dict(table)

    async def __call__(self, msg: Message, fds: list[int]) -> Message:
        name = msg.get("op")
        cls = _OPS.get(name) if isinstance(name, str) else None
        if isinstance(name, str) and (cls is None or cls not in self.table):
            return fail("unknown_op", f"{self.served_by} does not serve {name[:40]!r}")
        op = decode(msg)  # ControlError (bad_request) names the bad field
        reply = self.table[type(op)](op, fds)
        if isinstance(reply, Awaitable):
            return await reply
        return reply

    def serves(self) -> list[str]:
        return sorted(cls.name for cls in self.table)


def every_op() -> dict[str, type[Op]]:
    return dict(_OPS)
