"""A topic's commands and fan-out (topic.py) with fake connections, the in-memory store
and topic log, and a router that answers in-process."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.unit import fakes
from tests.unit.fakes import take, typed
from theychat.daemons import ops, wal
from theychat.daemons.clientconn import ClientConn
from theychat.daemons.config import Config, History
from theychat.daemons.control import ok
from theychat.daemons.room import Room
from theychat.daemons.store import MemoryStore
from theychat.daemons.topic import TopicCommands
from theychat.daemons.topiclog import MemoryTopicLog, Posted


class Topic:
    def __init__(self, on_join: int = 20, log: MemoryTopicLog | None = None,
                 answers: dict[type[ops.Op], Callable[[Any], Any]] | None = None) -> None:
        self.store = MemoryStore()
        self.room = Room("rust", self.store)
        self.log = log or MemoryTopicLog(100)
        self.sockets = fakes.Sockets()
        self.peers = fakes.Peers({ops.SessionAt: lambda op: ok(), ops.SessionEnd: lambda op: ok(),
                                  ops.SessionInfo: lambda op: ok(nick="?", oper=False),
                                  **(answers or {})})
        self.fanned: list[int] = []
        self.logger = fakes.Log()
        self.cmds = TopicCommands("rust", self.room, self.log, self.sockets,  # type: ignore[arg-type]
                                  self.peers, Config(history=History(on_join=on_join)),
                                  self.logger, self.fanned.append)
        self.sockets.owner = self.cmds

    async def join(self, sid: str, nick: str, json_mode: bool = True,
                   resume_after: int | None = None, resumed: bool = False) -> ClientConn:
        reply = await self.cmds.adopt(ops.Adopt(session=ops.Conn(sid=sid, json=json_mode),
                                                nick=nick, resume_after=resume_after,
                                                resumed=resumed), [])
        assert reply["ok"], reply
        await asyncio.sleep(0)
        return self.sockets.conns[sid]


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


def test_a_line_reaches_the_others_once_committed_and_its_sender_is_acknowledged() -> None:
    async def body() -> None:
        t = Topic()
        ann, bob = await t.join("a", "ann"), await t.join("b", "bob")
        take(ann), take(bob)
        await typed(t.cmds, ann, "hello bob")
        await asyncio.sleep(0)
        assert take(bob) == [{"type": "message", "topic": "rust", "from": "ann",
                              "text": "hello bob", "seq": 1, "ts": pytest.approx(0, abs=2e9)}]
        assert take(ann) == [{"type": "sent", "topic": "rust", "seq": 1}]
        await asyncio.sleep(0)
        assert t.fanned == [1]  # the watermark moves once the bytes are out

    run(body)


def test_a_line_the_log_cannot_take_gets_an_error_and_reaches_nobody() -> None:
    class Full(MemoryTopicLog):
        def _persist(self, entries: list[Posted],
                     on_durable: Callable[[], None]) -> asyncio.Future[list[Posted]]:
            fut: asyncio.Future[list[Posted]] = asyncio.get_running_loop().create_future()
            fut.set_exception(wal.WalFailed("No space left on device"))
            return fut

    async def body() -> None:
        t = Topic(log=Full())
        ann, bob = await t.join("a", "ann"), await t.join("b", "bob")
        take(ann), take(bob)
        await typed(t.cmds, ann, "are you there?")
        await asyncio.sleep(0)
        [error] = take(ann)
        assert error["type"] == "error" and error["code"] == "not_saved"
        assert take(bob) == []

    run(body)


def test_joining_shows_members_then_history_then_live_and_the_others_see_it() -> None:
    async def body() -> None:
        t = Topic(on_join=2)
        ann = await t.join("a", "ann")
        for text in ("one", "two", "three"):
            await typed(t.cmds, ann, text)
        take(ann)
        bob = await t.join("b", "bob")
        got = take(bob)
        assert got[0] == {"type": "joined", "topic": "rust", "members": ["ann", "bob"]}
        assert got[1]["type"] == "history" and [m["text"] for m in got[1]["messages"]] == [
            "two", "three"]
        assert take(ann) == [{"type": "presence", "topic": "rust", "nick": "bob",
                              "event": "joined"}]
        assert t.peers.ops(ops.SessionAt)[-1] == ops.SessionAt(sid="b", nick="bob", topic="rust")

    run(body)


def test_a_resume_gets_exactly_what_was_missed() -> None:
    async def body() -> None:
        t = Topic()
        ann = await t.join("a", "ann")
        for text in ("one", "two", "three"):
            await typed(t.cmds, ann, text)
        bob = await t.join("b", "bob", resume_after=1)
        got = take(bob)
        assert [e.get("text") for e in got[1:]] == ["two", "three"]

    run(body)


def test_a_numbered_line_sent_again_is_taken_once_and_answered_as_before() -> None:
    async def body() -> None:
        t = Topic()
        ann, bob = await t.join("a", "ann"), await t.join("b", "bob")
        take(ann), take(bob)
        for line in ("/say 1 one", "/say 2 two", "/say 1 one", "/say 2 two", "/say 3 three"):
            await typed(t.cmds, ann, line)
        await asyncio.sleep(0)  # an answer waits for its batch's future, then is sent
        assert [(e["seq"], e["line"]) for e in take(ann)] == [(1, 1), (2, 2), (1, 1), (2, 2),
                                                              (3, 3)]
        assert [e["text"] for e in take(bob)] == ["one", "two", "three"]

    run(body)


def test_a_resend_of_a_line_still_on_its_way_to_disk_is_answered_once_it_is_there() -> None:
    class Slow(MemoryTopicLog):
        """Commits when the test says so."""

        def __init__(self) -> None:
            super().__init__(100)
            self.held: list[tuple[Callable[[], None], asyncio.Future[list[Posted]],
                                  list[Posted]]] = []

        def _persist(self, entries: list[Posted],
                     on_durable: Callable[[], None]) -> asyncio.Future[list[Posted]]:
            fut: asyncio.Future[list[Posted]] = asyncio.get_running_loop().create_future()
            self.held.append((on_durable, fut, entries))
            return fut

        def release(self) -> None:
            for on_durable, fut, entries in self.held:
                on_durable()
                fut.set_result(entries)
            self.held.clear()

    async def body() -> None:
        log = Slow()
        t = Topic(log=log)
        ann, bob = await t.join("a", "ann"), await t.join("b", "bob")
        take(ann), take(bob)
        await typed(t.cmds, ann, "/say 1 one")
        await typed(t.cmds, ann, "/say 1 one")  # again, before the first is durable
        assert take(ann) == [] and take(bob) == []  # nothing acknowledged before the disk
        log.release()
        for _ in range(3):
            await asyncio.sleep(0)
        assert [(e["seq"], e["line"]) for e in take(ann)] == [(1, 1), (1, 1)]
        assert [e["text"] for e in take(bob)] == ["one"]

    run(body)


def test_a_resume_ends_with_the_last_line_taken_and_a_refused_line_names_its_number() -> None:
    async def body() -> None:
        t = Topic()
        ann = await t.join("a", "ann")
        for line in ("/say 1 one", "plain", "/say 2 two"):
            await typed(t.cmds, ann, line)
        again = await t.join("a", "ann", resume_after=3, resumed=True)
        assert take(again)[-1] == {"type": "caught_up", "topic": "rust", "last_line": 2}
        bob = await t.join("b", "bob", resume_after=0, resumed=True)
        assert take(bob)[-1] == {"type": "caught_up", "topic": "rust", "last_line": None}

    run(body)


def test_a_banned_nick_is_refused_before_its_socket_is_taken() -> None:
    async def body() -> None:
        t = Topic()
        await t.room.ban("Mallory", "ann")
        reply = await t.cmds.adopt(ops.Adopt(session=ops.Conn(sid="m"), nick="mallory"), [])
        assert reply["code"] == "banned" and "m" not in t.sockets

    run(body)


def test_only_operators_kick_and_a_kick_moves_the_member_to_the_lobby() -> None:
    async def body() -> None:
        t = Topic()
        ann = await t.join("a", "ann")
        bob = await t.join("b", "bob")
        cat = await t.join("c", "cat")
        for c in (ann, bob, cat):
            take(c)
        await typed(t.cmds, bob, "/kick cat")
        assert take(bob)[0]["code"] == "not_operator" and not t.sockets.moved
        await t.room.add_op("ann")
        await typed(t.cmds, ann, "/kick cat spamming")
        [(sid, to, adopt)] = t.sockets.moved
        assert (sid, to) == ("c", None)
        assert adopt.notice == "you were kicked from rust by ann: spamming"
        assert {"type": "ok", "cmd": "kick", "nick": "cat",
                "text": "cat was kicked"} in take(ann)
        assert {"type": "presence", "topic": "rust", "nick": "cat", "event": "kicked",
                "reason": "spamming", "by": "ann"} in take(bob)
        assert t.room.nick_of("c") is None

    run(body)


def test_a_server_operator_kicks_by_the_routers_word() -> None:
    async def body() -> None:
        t = Topic(answers={ops.SessionInfo: lambda op: ok(nick="root", oper=op.sid == "r")})
        root = await t.join("r", "root")
        await t.join("b", "bob")
        await typed(t.cmds, root, "/kick bob")
        assert [m[:2] for m in t.sockets.moved] == [("b", None)]

    run(body)


def test_a_nick_change_asks_the_router_first() -> None:
    async def body() -> None:
        taken = {"cat"}
        t = Topic(answers={ops.Rename: lambda op: ok() if op.nick not in taken else
                           {"ok": False, "code": "nick_taken", "error": "taken"}})
        ann, bob = await t.join("a", "ann"), await t.join("b", "bob")
        take(ann), take(bob)
        await typed(t.cmds, ann, "/nick cat")
        assert take(ann)[0]["code"] == "nick_taken" and t.room.nick_of("a") == "ann"
        await typed(t.cmds, ann, "/nick anna")
        assert take(ann) == [{"type": "ok", "cmd": "nick", "nick": "anna",
                              "text": "you are now anna"}]
        assert take(bob) == [{"type": "presence", "topic": "rust", "nick": "anna",
                              "event": "renamed", "old": "ann"}]

    run(body)


def test_a_direct_message_stays_here_when_it_can_else_goes_through_the_router() -> None:
    async def body() -> None:
        t = Topic(answers={ops.Dm: lambda op: ok(to="zed")})
        ann, bob = await t.join("a", "ann"), await t.join("b", "bob")
        take(ann), take(bob)
        await typed(t.cmds, ann, "/msg BOB psst")
        assert take(bob)[0] | {"ts": 0} == {"type": "dm", "from": "ann", "to": "bob",
                                             "text": "psst", "ts": 0}
        await typed(t.cmds, ann, "/msg zed hello")
        assert t.peers.ops(ops.Dm) == [ops.Dm(sid="a", to="zed", text="hello")]
        assert take(ann)[-1]["text"] == "sent to zed"

    run(body)


def test_a_lost_connection_leaves_visibly_and_the_router_hears_of_it() -> None:
    async def body() -> None:
        t = Topic()
        ann, bob = await t.join("a", "ann"), await t.join("b", "bob")
        take(ann)
        t.cmds.lost(bob, "connection lost")
        await asyncio.sleep(0.01)
        assert take(ann) == [{"type": "presence", "topic": "rust", "nick": "bob",
                              "event": "left", "reason": "connection lost"}]
        assert t.peers.ops(ops.SessionEnd) == [ops.SessionEnd(sid="b",
                                                              reason="connection lost")]
        assert t.room.members() == {"a": "ann"}

    run(body)


def test_a_failed_move_leaves_the_member_here_and_says_why() -> None:
    async def body() -> None:
        from theychat.daemons.errors import ControlError

        t = Topic()
        ann = await t.join("a", "ann")
        take(ann)
        t.sockets.refuse = ControlError("no reply", "unavailable")
        await typed(t.cmds, ann, "/leave")
        assert take(ann)[0] == {"type": "error", "code": "unavailable",
                                "text": "cannot move you to the lobby right now; try again"}
        assert t.room.nick_of("a") == "ann"

    run(body)
