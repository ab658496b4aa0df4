"""The directory store seam on a real etcd (etcdstore.py): the contract of store.py, and
what only a shared store shows: two processes' caches agree, and a race has one winner."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

from theychat.daemons.etcd import Etcd
from theychat.daemons.etcdstore import EtcdStore
from theychat.daemons.soak.etcdlab import EtcdCluster
from theychat.daemons.store import Change

PREFIXES = itertools.count()


def run(etcd1: EtcdCluster, body: Callable[[Callable[[], Awaitable[EtcdStore]]],
                                           Awaitable[None]]) -> None:
    prefix = f"/test/{next(PREFIXES)}/"

    async def main() -> None:
        opened: list[tuple[Etcd, EtcdStore]] = []

        async def store() -> EtcdStore:
            client = Etcd(etcd1.endpoints)
            s = EtcdStore(client, prefix)
            await s.start()
            opened.append((client, s))
            return s

        try:
            await body(store)
        finally:
            for client, s in opened:
                await s.close()
                await client.close()

    asyncio.run(main())


async def until(cond: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "never happened"
        await asyncio.sleep(0.01)


def test_create_if_absent_has_one_winner_across_processes(etcd1: EtcdCluster) -> None:
    async def body(store: Callable[[], Awaitable[EtcdStore]]) -> None:
        a, b = await store(), await store()
        won = await asyncio.gather(a.create("nick/ann", {"sid": "a"}),
                                   b.create("nick/ann", {"sid": "b"}))
        assert sorted(w is not None for w in won) == [False, True]
        winner = "a" if won[0] is not None else "b"
        await until(lambda: b.get("nick/ann") is not None and a.get("nick/ann") is not None)
        assert a.get("nick/ann").value == b.get("nick/ann").value == {"sid": winner}  # type: ignore[union-attr]

    run(etcd1, body)


def test_compare_and_set_and_conditional_delete(etcd1: EtcdCluster) -> None:
    async def body(store: Callable[[], Awaitable[EtcdStore]]) -> None:
        s = await store()
        e = await s.put("session/a", {"nick": "ann"})
        assert e.revision > 0
        assert await s.compare_and_set("session/a", {"nick": "bob"}, 0) is None
        moved = await s.compare_and_set("session/a", {"nick": "bob"}, e.revision)
        assert moved is not None and s.get("session/a").value == {"nick": "bob"}  # type: ignore[union-attr]
        assert await s.compare_and_set("session/a", {"nick": "cat"}, e.revision) is None
        assert not await s.delete("session/a", revision=e.revision)
        assert await s.delete("session/a") and s.get("session/a") is None
        assert not await s.delete("session/a")

    run(etcd1, body)


def test_a_put_is_seen_at_once_here_and_soon_elsewhere(etcd1: EtcdCluster) -> None:
    async def body(store: Callable[[], Awaitable[EtcdStore]]) -> None:
        a, b = await store(), await store()
        heard: list[Change] = []
        b.watch("member/", heard.append)
        pending = a.put("member/x", {"nick": "xi"})
        assert a.get("member/x") is not None  # before etcd answered
        await pending
        await until(lambda: b.get("member/x") is not None)
        assert [(c.key, c.entry is not None) for c in heard] == [("member/x", True)]
        await a.delete("member/x")
        await until(lambda: len(heard) == 2)
        assert heard[1].entry is None and not heard[1].expired
        assert a.range("member/") == b.range("member/") == []

    run(etcd1, body)


def test_an_entry_with_a_time_to_live_expires_and_watchers_hear_it(etcd1: EtcdCluster) -> None:
    async def body(store: Callable[[], Awaitable[EtcdStore]]) -> None:
        a, b = await store(), await store()
        heard: list[Change] = []
        b.watch("session/", heard.append)
        await a.put("session/d", {"nick": "dee"}, ttl_s=1)
        await a.put("session/kept", {"nick": "kay"})
        await until(lambda: any(c.expired for c in heard), within_s=8)
        gone = next(c for c in heard if c.expired)
        assert gone.key == "session/d" and gone.prev is not None
        assert b.get("session/d") is None and b.get("session/kept") is not None
        await until(lambda: a.get("session/d") is None)

    run(etcd1, body)


def test_a_store_opened_later_starts_from_what_etcd_has(etcd1: EtcdCluster) -> None:
    async def body(store: Callable[[], Awaitable[EtcdStore]]) -> None:
        a = await store()
        for i in range(5):
            await a.put(f"topic/t{i}", {"creator": f"c{i}"})
        await a.delete("topic/t2")
        late = await store()
        assert [e.key for e in late.range("topic/")] == ["topic/t0", "topic/t1", "topic/t3",
                                                         "topic/t4"]

    run(etcd1, body)


def test_a_failed_put_leaves_the_cache_as_etcd_has_it(etcd1: EtcdCluster) -> None:
    async def body(store: Callable[[], Awaitable[EtcdStore]]) -> None:
        s = await store()
        await s.put("member/y", {"nick": "old"})
        real = s.etcd
        s.etcd = Etcd(["http://127.0.0.1:9"], timeout_s=0.3)  # nobody there
        failing: Any = s.put("member/y", {"nick": "new"})
        assert s.get("member/y").value == {"nick": "new"}  # type: ignore[union-attr]
        try:
            await failing
            raise AssertionError("the put should have failed")
        except Exception as e:
            assert "no etcd endpoint answered" in str(e)
        assert s.get("member/y").value == {"nick": "old"}  # type: ignore[union-attr]
        await s.etcd.close()
        s.etcd = real

    run(etcd1, body)
