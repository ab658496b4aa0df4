"""Fakes for testing the command modules in one process: connections (the real
ClientConn over a transport that records what it is sent), the sockets a daemon holds,
and the peers it asks. The stores and logs are the in-memory implementations."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from theychat.daemons import ops
from theychat.daemons.clientconn import ClientConn, Owner
from theychat.daemons.config import Clients
from theychat.daemons.control import Message, fail
from theychat.daemons.errors import ControlError
from theychat.daemons.protocol import parse
from theychat.daemons.tree import DaemonId


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _add(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    info = warning = error = exception = _add

    def named(self, event: str) -> list[dict[str, Any]]:
        return [f for e, f in self.events if e == event]


class Transport(asyncio.Transport):
    """What a connection writes, kept; it never blocks."""

    def __init__(self, peer: tuple[str, int] = ("10.0.0.1", 40000)) -> None:
        super().__init__()
        self.data = bytearray()
        self.closed = False
        self.reading = True
        self.peer = peer

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer}.get(name, default)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def conn(owner: Owner, sid: str, json_mode: bool = True,
         peer: tuple[str, int] = ("10.0.0.1", 40000)) -> ClientConn:
    """A connected ClientConn (JSON mode by default, so tests read events)."""
    c = ClientConn(owner, sid, Clients(), Log(), json=json_mode)
    c.connection_made(Transport(peer))
    return c


def events(c: ClientConn) -> list[dict[str, Any]]:
    """Every event the connection was sent so far (JSON mode); flushes first."""
    c.flush()
    assert isinstance(c.transport, Transport)
    return [json.loads(line) for line in bytes(c.transport.data).splitlines()]


def take(c: ClientConn) -> list[dict[str, Any]]:
    """The events sent since the last take."""
    got = events(c)
    assert isinstance(c.transport, Transport)
    c.transport.data.clear()
    return got


async def typed(owner: Any, c: ClientConn, line: str) -> None:
    """Handle one line as the connection would, waiting for a command's I/O."""
    item = parse(line)
    assert item is not None
    pending = owner.handle(c, item)
    if pending is not None:
        await pending
    await asyncio.sleep(0)  # callbacks of what was committed meanwhile


class Sockets:
    """The sockets a daemon holds (`handoff.Sockets`), without a monitor: moves go to
    `moved` (or fail with `refuse`), adoptions make fake connections."""

    def __init__(self, owner: Any = None) -> None:
        self.owner = owner
        self.conns: dict[str, ClientConn] = {}
        self.moved: list[tuple[str, str | None, ops.Adopt]] = []
        self.refuse: ControlError | None = None
        self.keeper = self

    def __contains__(self, sid: str) -> bool:
        return sid in self.conns

    def __len__(self) -> int:
        return len(self.conns)

    def __iter__(self) -> Iterator[ClientConn]:
        return iter(list(self.conns.values()))

    def get(self, sid: str) -> ClientConn | None:
        return self.conns.get(sid)

    def hold(self, c: ClientConn) -> asyncio.Future[bool]:
        self.conns[c.sid] = c
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        fut.set_result(True)
        return fut

    @staticmethod
    async def settled(done: asyncio.Future[bool], timeout: float = 1.0) -> bool:
        return await done

    async def adopt(self, op: ops.Adopt, fds: list[int]) -> ClientConn:
        c = conn(self.owner, op.session.sid, op.session.json)
        self.conns[c.sid] = c
        return c

    def update(self, c: ClientConn) -> None:
        return None

    async def move(self, c: ClientConn, to: str | None, adopt: ops.Adopt) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.conns.pop(c.sid, None)
        self.moved.append((c.sid, to, adopt))

    def lost(self, c: ClientConn) -> bool:
        if self.conns.get(c.sid) is not c:
            return False
        del self.conns[c.sid]
        return True


class Peers:
    """Other daemons, answering in-process: `answers[op class](op)`; every op is kept."""

    def __init__(self, answers: dict[type[ops.Op], Callable[[Any], Message]] | None = None
                 ) -> None:
        self.answers = answers or {}
        self.asked: list[tuple[DaemonId, ops.Op]] = []

    async def ask(self, to: DaemonId, op: ops.Op, timeout: float = 2.0,
                  fds: Sequence[int] = (), host: str = "") -> Message:
        self.asked.append((to, op))
        answer = self.answers.get(type(op))
        if answer is None:
            return fail("unknown_op", f"{to} has no answer for {op.name} in this test")
        return answer(op)

    def ops(self, cls: type[ops.Op]) -> list[Any]:
        return [op for _, op in self.asked if isinstance(op, cls)]
