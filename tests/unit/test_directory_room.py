"""The router's Directory and a topic's Room, over the in-memory store; and logs written
by earlier versions, read into both."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from theychat.daemons import wal
from theychat.daemons.config import WalSettings
from theychat.daemons.directory import Directory, NickTaken, Session
from theychat.daemons.local import LocalLog
from theychat.daemons.room import Room
from theychat.daemons.store import MemoryStore


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def directory(seed: int = 1, clock: Clock | None = None) -> Directory:
    clock = clock or Clock()
    return Directory(MemoryStore(clock=clock), ["rust", "python"], expiry_s=300,
                     rng=random.Random(seed), clock=clock)


def test_open_session_gives_unique_guest_nicks() -> None:
    async def body() -> None:
        d = directory()
        nicks = {(await d.open_session(f"s{i}")).nick for i in range(200)}
        assert len(nicks) == 200 and all(n.startswith("guest") for n in nicks)

    run(body())


def test_open_session_retries_a_taken_guest_nick() -> None:
    async def body() -> None:
        first = (await directory(seed=7).open_session("a")).nick
        d = directory(seed=7)
        await d.register("x", first, None)  # someone already has the first pick
        second = await d.open_session("b")
        assert second.nick != first and d.find_nick(first).sid == "x"  # type: ignore[union-attr]

    run(body())


def test_rename_takes_a_free_nick_frees_the_old_one_and_refuses_a_taken_one() -> None:
    async def body() -> None:
        d = directory()
        await d.register("a", "ann", None)
        await d.register("b", "bob", None)
        with pytest.raises(NickTaken):
            await d.rename("a", "BOB")
        assert await d.rename("a", "Anna") == "ann"
        assert d.find_nick("anna").sid == "a"  # type: ignore[union-attr]
        assert d.find_nick("ann") is None
        await d.register("c", "ann", None)  # free again
        assert await d.rename("a", "ANNA") == "Anna"  # a case change of one's own nick

    run(body())


def test_two_sessions_racing_for_a_nick_one_wins() -> None:
    async def body() -> None:
        d = directory()
        await d.register("a", "ann", None)
        await d.register("b", "bob", None)
        results = await asyncio.gather(d.rename("a", "cat"), d.rename("b", "cat"),
                                       return_exceptions=True)
        assert sorted(type(r).__name__ for r in results) == ["NickTaken", "str"]
        assert d.find_nick("cat") is not None

    run(body())


def test_end_frees_the_nick_and_register_refuses_a_taken_one() -> None:
    async def body() -> None:
        d = directory()
        await d.register("a", "ann", None)
        with pytest.raises(NickTaken):
            await d.register("b", "Ann", "rust")
        assert (await d.end("a")).nick == "ann"  # type: ignore[union-attr]
        assert d.session("a") is None and d.find_nick("ann") is None
        assert (await d.register("b", "Ann", "rust")).topic == "rust"

    run(body())


def test_a_detached_session_expires_and_its_nick_is_released() -> None:
    async def body() -> None:
        clock = Clock()
        d = directory(clock=clock)
        expired: list[Session] = []
        d.on_expired(expired.append)
        await d.register("a", "ann", "rust")
        await d.detach("a")
        clock.now += 299
        d.store.expire()  # type: ignore[attr-defined]
        assert d.session("a") is not None
        await d.attach("a", "10.0.0.1")  # resumed in time: no expiry any more
        clock.now += 1000
        d.store.expire()  # type: ignore[attr-defined]
        assert d.session("a").addr == "10.0.0.1"  # type: ignore[union-attr]
        await d.detach("a")
        clock.now += 301
        d.store.expire()  # type: ignore[attr-defined]
        assert [s.nick for s in expired] == ["ann"] and d.session("a") is None
        for s in expired:
            await d.release_expired(s)
        assert d.find_nick("ann") is None

    run(body())


def test_a_gone_hosts_sessions_are_detached_unless_resumed_elsewhere_meanwhile() -> None:
    async def body() -> None:
        clock = Clock()
        store = MemoryStore(clock=clock)
        h1, h2 = (Directory(store, ["rust"], expiry_s=300, clock=clock, host=h)
                  for h in ("h1", "h2"))
        await h1.register("a", "ann", "rust")
        await h1.register("b", "bob", None)
        await h1.register("c", "cat", "rust")
        await h1.detach("c")  # already detached: its expiry runs from then, not now
        await h2.register("d", "dan", "rust")
        await h2.attach("b", "10.0.0.9", None)  # bob resumed on h2 before h1 was gone
        clock.now += 10
        assert await h2.detach_host("h1") == 1
        a = h2.session("a")
        assert a is not None and a.detached_at == clock.now and a.host == "h1"
        assert h2.session("b").detached_at is None  # type: ignore[union-attr]
        assert h2.session("c").detached_at == clock.now - 10  # type: ignore[union-attr]
        assert h2.session("d").detached_at is None  # type: ignore[union-attr]
        assert await h2.detach_host("h1") == 0  # a second host doing it changes nothing
        await h2.attach("a", "10.0.0.8", "rust")  # ann resumes on h2
        assert h2.session("a").host == "h2"  # type: ignore[union-attr]

    run(body())


def test_counts_places_and_addresses() -> None:
    async def body() -> None:
        d = directory()
        await d.register("a", "ann", "rust", addr="10.0.0.1")
        await d.register("b", "bob", "rust", addr="10.0.0.1")
        await d.register("c", "cat", None, addr="10.0.0.2")
        await d.detach("b")
        assert d.counts() == [{"name": "rust", "members": 1}, {"name": "python", "members": 0}]
        assert [s.sid for s in d.in_topic("rust")] == ["a", "b"]
        assert [s.sid for s in d.in_topic(None)] == ["c"]
        assert d.connected_from("10.0.0.1") == 1  # bob's connection is gone

    run(body())


def test_topics_created_and_dropped() -> None:
    async def body() -> None:
        d = directory()
        assert d.topic_named("RUST") == "rust" and d.topic_named("go") is None
        await d.add_topic("go", "ann")
        await d.register("a", "ann", "go")
        assert d.topics == ["rust", "python", "go"] and d.creator("go") == "ann"
        await d.drop_topic("go")
        await d.drop_topic("rust")
        assert d.topics == ["python"] and d.session("a").topic is None  # type: ignore[union-attr]
        await d.add_topic("rust", "bob")  # a dropped configured topic made again
        assert d.topics == ["rust", "python"]

    run(body())


def test_repair_gives_a_detached_session_its_expiry_and_frees_orphaned_nicks() -> None:
    async def body() -> None:
        d = directory()
        await d.store.put("session/a", Session("a", "ann", detached_at=900.0).value())
        await d.store.put("nick/bob", {"sid": "gone"})
        await d.store.put("nick/ann", {"sid": "a"})
        await d.repair()
        assert d.store.get("session/a").expires_at == 900.0 + 300  # type: ignore[union-attr]
        assert d.store.get("nick/bob") is None and d.store.get("nick/ann") is not None

    run(body())


def test_a_room_finds_members_by_nick_and_keeps_ops_and_bans() -> None:
    async def body() -> None:
        room = Room("rust", MemoryStore())
        for sid, nick in (("s1", "bob"), ("s2", "Alice"), ("s3", "carol")):
            await room.join(sid, nick)
        assert room.nicks() == ["Alice", "bob", "carol"]
        assert room.find("ALICE") == ("s2", "Alice") and room.find("dave") is None
        old, written = room.rename("s1", "Bobby")
        await written
        assert old == "bob" and room.nick_of("s1") == "Bobby"
        await room.leave("s3")
        assert room.member_list() == [{"sid": "s1", "nick": "Bobby"},
                                      {"sid": "s2", "nick": "Alice"}]
        await room.add_op("Alice")
        await room.ban("Mallory", "Alice")
        assert room.is_op("alice") and room.banned("MALLORY") and not room.banned("alice")

    run(body())


def write_old_log(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_bytes(b"".join(wal.encode(r) for r in records))


def test_an_old_server_log_is_read_with_its_members_ops_bans_and_history(
        tmp_path: Path) -> None:
    """The record types the earlier server wrote (and a snapshot of theirs) replay."""
    path = tmp_path / "server@rust.wal"
    write_old_log(path, [
        {"type": "snapshot", "state": {
            "members": [{"sid": "s1", "nick": "ann"}],
            "history": [{"type": "msg", "seq": 1, "from": "ann", "text": "hi", "ts": 1.0}],
            "next_seq": 2, "ops": ["ann"], "bans": []}},
        {"type": "join", "sid": "s2", "nick": "bob"},
        {"type": "msg", "seq": 2, "from": "bob", "text": "yo", "ts": 2.0, "sid": "s2"},
        {"type": "nick", "sid": "s2", "nick": "bobby"},
        {"type": "ban", "nick": "Mallory", "by": "ann"},
        {"type": "join", "sid": "s3", "nick": "cat"},
        {"type": "kick", "sid": "s3", "nick": "cat", "by": "ann", "reason": ""},
    ])

    async def body() -> tuple[dict[str, str], list[str], bool, bool, int]:
        local = LocalLog(path, WalSettings(), None, lambda why, status: None, keep=100)
        assert local.topic is not None
        room = Room("rust", local.store)
        out = (room.members(), [p.text for p in local.topic.last(10)], room.is_op("ANN"),
               room.banned("mallory"), local.topic.last_seq)
        await local.close()
        return out

    members, texts, op, banned, last = run(body())
    assert members == {"s1": "ann", "s2": "bobby"}
    assert texts == ["hi", "yo"] and op and banned and last == 2


def test_an_old_router_log_is_read_with_its_sessions_and_topics(tmp_path: Path) -> None:
    path = tmp_path / "router.wal"
    write_old_log(path, [
        {"type": "snapshot", "state": {
            "sessions": [{"type": "session", "sid": "a", "nick": "ann", "topic": "rust",
                          "detached_at": None, "oper": True}],
            "created": [{"name": "go", "creator": "ann"}], "dropped": ["python"]}},
        {"type": "session", "sid": "b", "nick": "bob", "topic": None, "detached_at": 999.0,
         "oper": False},
        {"type": "session", "sid": "b", "nick": "bobby", "topic": None, "detached_at": 999.0,
         "oper": False},
        {"type": "session", "sid": "c", "nick": "cat", "topic": "go", "detached_at": None},
        {"type": "end", "sid": "c"},
        {"type": "topic", "name": "js", "creator": "bob"},
        {"type": "topic_dropped", "name": "js"},
    ])

    async def body() -> tuple[list[str], Session | None, Session | None, Any, Any]:
        local = LocalLog(path, WalSettings(), None, lambda why, status: None)
        d = Directory(local.store, ["rust", "python"], 300, clock=Clock())
        await d.repair()
        out = (d.topics, d.find_nick("ann"), d.find_nick("bobby"), d.find_nick("bob"),
               d.session("c"))
        await local.close()
        return out

    topics, ann, bobby, bob, cat = run(body())
    assert topics == ["rust", "go"]
    assert ann is not None and ann.oper and ann.topic == "rust"
    assert bobby is not None and bobby.detached_at == 999.0
    assert bob is None and cat is None
