"""The lobby's commands and the directory services (lobby.py, topics.py) with fake
connections, the in-memory store and topic servers that answer in-process."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.unit import fakes
from tests.unit.fakes import take, typed
from theychat.daemons import ops, passwords
from theychat.daemons.clientconn import ClientConn
from theychat.daemons.config import Clients, Config, Operator
from theychat.daemons.control import ok
from theychat.daemons.directory import Directory
from theychat.daemons.lobby import Lobby
from theychat.daemons.paths import StatePaths
from theychat.daemons.store import MemoryStore
from theychat.daemons.topics import Topics

HASH = passwords.make("sesame")


class Supervision:
    def __init__(self) -> None:
        self.watched: list[str] = []

    def watch(self, topic: str) -> None:
        self.watched.append(topic)

    async def unwatch(self, topic: str) -> None:
        self.watched.remove(topic)


class Router:
    def __init__(self, answers: dict[type[ops.Op], Callable[[Any], Any]] | None = None,
                 max_connections: int = 100) -> None:
        cfg = Config(operators=[Operator("root", HASH)],
                     clients=Clients(max_connections=max_connections))
        self.dir = Directory(MemoryStore(), ["rust", "python"], 300, rng=random.Random(3))
        self.peers = fakes.Peers({ops.Members: lambda op: ok(members=[]),
                                  ops.Status: lambda op: ok(daemon={"state": "ready"}),
                                  **(answers or {})})
        self.supervision = Supervision()
        self.topics = Topics(self.dir, cfg, StatePaths(Path("/nonexistent")), self.peers,
                             self.supervision, fakes.Log())
        self.sockets = fakes.Sockets()
        self.log = fakes.Log()
        self.lobby = Lobby(self.dir, self.topics, self.sockets, self.peers,  # type: ignore[arg-type]
                           cfg, self.log)
        self.sockets.owner = self.lobby

    async def arrive(self) -> ClientConn:
        """A connection accepted and greeted."""
        c = self.lobby.new_conn()
        c.json = True
        c.connection_made(fakes.Transport())
        for _ in range(5):
            await asyncio.sleep(0)
        return c


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


def test_a_new_connection_is_greeted_with_a_guest_nick_once_its_socket_is_kept() -> None:
    async def body() -> None:
        r = Router()
        c = await r.arrive()
        [hello] = take(c)
        assert hello["type"] == "hello" and hello["session"] == c.sid
        assert hello["nick"].startswith("guest") and r.dir.session(c.sid) is not None
        assert c.sid in r.sockets and r.dir.session(c.sid).addr == "10.0.0.1"  # type: ignore[union-attr]

    run(body)


def test_a_full_server_refuses_with_a_clear_line() -> None:
    async def body() -> None:
        r = Router(max_connections=1)
        await r.arrive()
        late = await r.arrive()
        assert bytes(late.transport.data) == b"! server full; try again later\n"  # type: ignore[union-attr]
        assert r.log.named("client_refused")[0]["reason"] == "server full"

    run(body)


def test_one_address_cannot_take_every_place() -> None:
    async def body() -> None:
        r = Router()
        r.lobby.cfg = Config(clients=Clients(max_per_address=2))
        first, second = await r.arrive(), await r.arrive()
        third = await r.arrive()
        assert bytes(third.transport.data) == (  # type: ignore[union-attr]
            b"! too many connections from your address; try again later\n")
        assert take(first)[0]["type"] == "hello" and take(second)[0]["type"] == "hello"
        r.lobby.lost(second, "connection lost")  # a disconnected session does not count
        await asyncio.sleep(0)
        assert take(await r.arrive())[0]["type"] == "hello"

    run(body)


def test_nicks_are_unique_and_talking_needs_a_topic() -> None:
    async def body() -> None:
        r = Router()
        a, b = await r.arrive(), await r.arrive()
        take(a), take(b)
        await typed(r.lobby, a, "/nick ann")
        await typed(r.lobby, b, "/nick ANN")
        assert take(a)[0]["text"] == "you are now ann"
        assert take(b)[0] == {"type": "error", "code": "nick_taken",
                              "text": "the nick ANN is taken"}
        await typed(r.lobby, b, "hello?")
        assert take(b)[0]["code"] == "in_lobby"

    run(body)


def test_join_moves_the_socket_and_the_directory_follows() -> None:
    async def body() -> None:
        r = Router()
        a = await r.arrive()
        take(a)
        await typed(r.lobby, a, "/join nowhere")
        assert take(a)[0]["code"] == "no_such_topic"
        r.topics.down("python")
        await typed(r.lobby, a, "/join python")
        assert take(a)[0]["code"] == "unavailable"
        await typed(r.lobby, a, "/join RUST")
        [(sid, to, _)] = r.sockets.moved
        assert (sid, to) == (a.sid, "rust") and r.dir.session(a.sid).topic == "rust"  # type: ignore[union-attr]

    run(body)


def test_a_direct_message_finds_its_person_in_the_lobby_or_a_topic() -> None:
    async def body() -> None:
        r = Router(answers={ops.Deliver: lambda op: ok(to="bob")})
        a, c = await r.arrive(), await r.arrive()
        for x, nick in ((a, "ann"), (c, "cat")):
            await typed(r.lobby, x, f"/nick {nick}")
        await r.dir.register("b", "bob", "rust")
        take(a), take(c)
        await typed(r.lobby, a, "/msg cat hi cat")
        assert take(c)[0] | {"ts": 0} == {"type": "dm", "from": "ann", "to": "cat",
                                           "text": "hi cat", "ts": 0}
        await typed(r.lobby, a, "/msg bob hi bob")
        [deliver] = r.peers.ops(ops.Deliver)
        assert deliver.sid == "b" and deliver.event["text"] == "hi bob"
        await typed(r.lobby, a, "/msg nobody hi")
        assert take(a)[-1]["code"] == "no_such_nick"

    run(body)


def test_oper_checks_the_password_and_the_directory_keeps_the_right() -> None:
    async def body() -> None:
        r = Router()
        a = await r.arrive()
        take(a)
        await typed(r.lobby, a, "/oper root wrong")
        assert take(a)[0]["code"] == "bad_password"
        await typed(r.lobby, a, "/oper nobody sesame")
        assert take(a)[0]["code"] == "bad_password"
        await typed(r.lobby, a, "/oper ROOT sesame")
        assert take(a)[0]["text"] == "you are now a server operator"
        assert r.dir.session(a.sid).oper  # type: ignore[union-attr]

    run(body)


def test_resume_takes_a_detached_session_back_into_its_topic() -> None:
    async def body() -> None:
        r = Router()
        old = await r.arrive()
        await typed(r.lobby, old, "/nick ann")
        await r.dir.move(old.sid, "rust")
        r.lobby.lost(old, "connection lost")
        await asyncio.sleep(0)
        new = await r.arrive()
        take(new)
        await typed(r.lobby, new, "/resume 0123")
        assert take(new)[0]["code"] == "no_such_session"
        fresh = new.sid
        await typed(r.lobby, new, f"/resume {old.sid} 5")
        assert take(new)[0] == {"type": "resumed", "session": old.sid, "nick": "ann",
                                "topic": "rust"}
        assert r.dir.session(fresh) is None and new.sid == old.sid
        [(_, to, adopt)] = r.sockets.moved
        assert to == "rust" and adopt.resume_after == 5

    run(body)


def test_created_topics_are_supervised_and_dropped_ones_forgotten() -> None:
    async def body() -> None:
        r = Router(answers={ops.Evacuate: lambda op: ok(moved=0)})
        a = await r.arrive()
        await typed(r.lobby, a, "/nick ann")
        take(a)
        await typed(r.lobby, a, "/create go")
        assert take(a)[0]["text"] == "topic go created; you are its operator"
        assert r.supervision.watched == ["go"] and r.dir.creator("go") == "ann"
        b = await r.arrive()
        take(b)
        await typed(r.lobby, b, "/drop go")
        assert take(b)[0]["code"] == "not_operator"
        await r.dir.move(a.sid, None)
        await typed(r.lobby, a, "/drop go")
        assert take(a)[0]["text"] == "topic go dropped"
        assert r.supervision.watched == [] and r.dir.topic_named("go") is None

    run(body)


def test_every_command_of_the_protocol_has_a_handler_in_the_lobby_and_in_a_topic() -> None:
    from theychat.daemons.protocol import COMMANDS, Say, parse
    from theychat.daemons.topic import TopicCommands

    assert parse("/say 3 hi") == Say("hi", line=3)  # a message, handled by `say`
    for cls in (Lobby, TopicCommands):
        assert [n for n in COMMANDS
                if n != "say" and not callable(getattr(cls, f"cmd_{n}", None))] == [], cls
