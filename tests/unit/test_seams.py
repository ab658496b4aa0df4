"""The two seams (store.py, topiclog.py) and their two implementations: in memory, and in
a daemon's write-ahead log (local.py), which must give back after a restart exactly
what it acknowledged. The same behaviour tests run against both."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from theychat.daemons import wal
from theychat.daemons.config import WalSettings
from theychat.daemons.local import LocalLog
from theychat.daemons.store import Change, KvStore, MemoryStore
from theychat.daemons.topiclog import Draft, MemoryTopicLog, Posted, TailLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


class Stores:
    """Opens stores of one kind; `close()` (awaited by each test) closes local ones."""

    def __init__(self, kind: str, path: Path) -> None:
        self.kind, self.path = kind, path
        self.opened: list[LocalLog] = []

    def __call__(self, clock: Clock | None = None) -> KvStore:
        if self.kind == "memory":
            return MemoryStore(clock=clock or Clock())
        local = LocalLog(self.path, WalSettings(), None, lambda why, status: None)
        self.opened.append(local)
        if clock is not None:
            local.store.clock = clock
        return local.store

    async def close(self) -> None:
        for local in self.opened:
            await local.close()


@pytest.fixture(params=["memory", "local"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Stores:
    return Stores(request.param, tmp_path / "d.wal")


def test_create_if_absent_has_one_winner(stores: Stores) -> None:
    async def body() -> None:
        s = stores()
        first = s.create("nick/ann", {"sid": "a"})
        second = s.create("nick/ann", {"sid": "b"})
        assert (await first) is not None and (await second) is None
        assert s.get("nick/ann").value == {"sid": "a"}  # type: ignore[union-attr]

        await stores.close()

    run(body())


def test_compare_and_set_against_the_revision_read(stores: Stores) -> None:
    async def body() -> None:
        s = stores()
        e = await s.put("session/a", {"nick": "ann"})
        assert await s.compare_and_set("session/a", {"nick": "bob"}, 0) is None  # not absent
        moved = await s.compare_and_set("session/a", {"nick": "bob"}, e.revision)
        assert moved is not None and moved.revision > e.revision
        assert await s.compare_and_set("session/a", {"nick": "cat"}, e.revision) is None
        assert await s.compare_and_set("session/z", {"nick": "zed"}, 0) is not None
        assert not await s.delete("session/a", revision=e.revision)  # moved on
        assert await s.delete("session/a")
        assert s.get("session/a") is None and not await s.delete("session/a")

        await stores.close()

    run(body())


def test_reads_see_own_writes_at_once_and_range_in_key_order(
        stores: Stores) -> None:
    async def body() -> None:
        s = stores()
        pending = [s.put(f"member/{k}", {"nick": k}) for k in ("c", "a", "b")]
        assert [e.key for e in s.range("member/")] == ["member/a", "member/b", "member/c"]
        await asyncio.gather(*pending)
        await s.sync()

        await stores.close()

    run(body())


def test_watchers_hear_changes_and_expiry_with_what_was_there(
        stores: Stores) -> None:
    async def body() -> None:
        clock = Clock()
        s = stores(clock)
        heard: list[Change] = []
        cancel = s.watch("session/", heard.append)
        await s.put("session/a", {"nick": "ann"}, ttl_s=300)
        await s.put("other/x", {})
        clock.now += 299
        assert s.expire() == []
        clock.now += 2
        assert [e.key for e in s.expire()] == ["session/a"]
        assert s.get("session/a") is None
        assert [(c.key, c.entry is None, c.expired) for c in heard] == [
            ("session/a", False, False), ("session/a", True, True)]
        assert heard[1].prev is not None and heard[1].prev.value == {"nick": "ann"}
        cancel()
        await s.put("session/b", {})
        assert len(heard) == 2

        await stores.close()

    run(body())


def test_a_local_store_gives_back_what_it_acknowledged(tmp_path: Path) -> None:
    async def write() -> None:
        local = LocalLog(tmp_path / "d.wal", WalSettings(), None, lambda why, status: None)
        await local.store.put("session/a", {"nick": "ann"}, ttl_s=60)
        e = await local.store.put("topic/go", {"creator": "ann"})
        await local.store.compare_and_set("topic/go", {"creator": "bob"}, e.revision)
        await local.store.put("gone", {})
        await local.store.delete("gone")
        await local.close()

    async def read() -> dict[str, Any]:
        local = LocalLog(tmp_path / "d.wal", WalSettings(), None, lambda why, status: None)
        out = {e.key: (e.value, e.expires_at is not None) for e in local.store.range("")}
        rev = local.store.state.revision
        await local.close()
        return {"entries": out, "revision": rev}

    run(write())
    again = run(read())
    assert again["entries"] == {"session/a": ({"nick": "ann"}, True),
                                "topic/go": ({"creator": "bob"}, False)}
    assert again["revision"] == 5


def test_a_snapshot_keeps_both_seams_appended_lines_included(tmp_path: Path) -> None:
    async def write() -> None:
        local = LocalLog(tmp_path / "t.wal", WalSettings(snapshot_every=10), None,
                         lambda why, status: None, keep=5)
        assert local.topic is not None
        for i in range(12):
            await local.store.put(f"member/s{i % 3}", {"nick": f"n{i}"})
            local.topic.append([Draft("s0", "n0", f"line {i}", 1.0)])
        await local.topic.sync()
        await local.close()

    async def read() -> tuple[list[str], int, dict[str, str]]:
        local = LocalLog(tmp_path / "t.wal", WalSettings(), None, lambda why, status: None, keep=5)
        assert local.topic is not None
        texts = [p.text for p in local.topic.last(10)]
        nicks = {e.key: e.value["nick"] for e in local.store.range("member/")}
        nxt = local.state.tail.next_seq if local.state.tail else 0
        await local.close()
        return texts, nxt, nicks

    run(write())
    texts, nxt, nicks = run(read())
    assert texts == [f"line {i}" for i in range(7, 12)]  # the last 5 kept
    assert nxt == 13
    assert nicks == {"member/s0": "n9", "member/s1": "n10", "member/s2": "n11"}


class Logs:
    def __init__(self, kind: str, path: Path) -> None:
        self.kind, self.path = kind, path
        self.opened: list[LocalLog] = []

    def __call__(self, keep: int) -> TailLog:
        if self.kind == "memory":
            return MemoryTopicLog(keep)
        local = LocalLog(self.path, WalSettings(), None, lambda why, status: None, keep=keep)
        self.opened.append(local)
        assert local.topic is not None
        return local.topic

    async def close(self) -> None:
        for local in self.opened:
            await local.close()


@pytest.fixture(params=["memory", "local"])
def logs(request: pytest.FixtureRequest, tmp_path: Path) -> Logs:
    return Logs(request.param, tmp_path / "t.wal")


def test_the_log_numbers_lines_in_order_and_followers_hear_each_once(
        logs: Logs) -> None:
    async def body() -> None:
        log = logs(100)
        heard: list[int] = []
        log.follow(lambda entries: heard.extend(e.seq for e in entries))
        first = log.append([Draft("a", "ann", "one", 1.23456), Draft("a", "ann", "two", 2.0)])
        second = log.append([Draft("b", "bob", "three", 3.0, action=True)])
        got = await first + await second
        assert [(p.seq, p.text) for p in got] == [(1, "one"), (2, "two"), (3, "three")]
        assert got[0].ts == 1.235 and got[2].action and got[2].sid == "b"
        assert heard == [1, 2, 3] and log.last_seq == 3
        assert [p.seq for p in log.after(1)] == [2, 3]
        assert [p.seq for p in log.last(2)] == [2, 3]
        assert got[2].event("rust") == {"type": "message", "topic": "rust", "from": "bob",
                                        "text": "three", "seq": 3, "ts": 3.0, "action": True}
        await logs.close()

    run(body())


def test_history_is_bounded_and_numbers_go_on_without_it(
        logs: Logs) -> None:
    async def body() -> None:
        kept, none = logs(2), MemoryTopicLog(0)
        for log in (kept, none):
            for i in range(5):
                await log.append([Draft("a", "ann", str(i), 0.0)])
        assert [p.text for p in kept.last(10)] == ["3", "4"]
        assert none.last(10) == [] and none.last_seq == 5
        await logs.close()

    run(body())


def test_reads_see_committed_entries_only() -> None:
    class Slow(MemoryTopicLog):
        def _persist(self, entries: list[Posted],
                     on_durable: Callable[[], None]) -> asyncio.Future[list[Posted]]:
            self.gate: asyncio.Future[list[Posted]] = asyncio.get_running_loop().create_future()

            def release() -> None:  # as a log does it: committed, then told
                on_durable()
                self.gate.set_result(entries)

            self.release = release
            return self.gate

    async def body() -> None:
        log = Slow()
        appended = log.append([Draft("a", "ann", "in flight", 0.0)])
        assert log.last(5) == [] and log.after(0) == [] and log.last_seq == 0
        log.release()
        await appended
        assert [p.text for p in log.last(5)] == ["in flight"]

    run(body())


def test_a_failed_append_commits_nothing_and_says_so() -> None:
    class Broken(MemoryTopicLog):
        def _persist(self, entries: list[Posted],
                     on_durable: Callable[[], None]) -> asyncio.Future[list[Posted]]:
            fut: asyncio.Future[list[Posted]] = asyncio.get_running_loop().create_future()
            fut.set_exception(wal.WalFailed("disk full"))
            return fut

    async def body() -> None:
        log = Broken()
        heard: list[Posted] = []
        log.follow(heard.extend)
        with pytest.raises(wal.WalFailed):
            await log.append([Draft("a", "ann", "lost?", 0.0)])
        assert heard == [] and log.last(5) == [] and log.last_seq == 0

    run(body())


def test_a_numbered_line_is_taken_once_and_a_lost_one_later_is_new() -> None:
    from theychat.daemons.topiclog import Tail

    tail = Tail(keep=3)

    def posted(seq: int, line: int) -> Posted:
        return Posted(seq, 0.0, "ann", f"line {line}", False, "s1", line)

    def draft(line: int) -> Draft:
        return Draft("s1", "ann", f"line {line}", 0.0, False, line)

    # Line 3 was read by a server that died before logging it; 4 and 5 went on.
    for seq, line in enumerate((1, 2, 4, 5), start=1):
        tail.add([posted(seq, line)])
    tail.commit(4)
    assert tail.taken(draft(5)) == posted(4, 5)  # the latest: itself
    assert tail.taken(draft(4)) == posted(3, 4)  # kept: itself
    assert tail.taken(draft(3)) is None  # never here: new
    assert tail.taken(draft(6)) is None  # after the latest: new
    assert tail.taken(draft(1)) == posted(4, 5)  # no longer kept: taken long ago
    assert tail.last_line("s1") == 5 and tail.last_line("s2") is None
    tail.add([posted(5, 6)])  # appended, not yet committed
    assert tail.last_line("s1") == 5
