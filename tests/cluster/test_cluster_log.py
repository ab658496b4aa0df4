"""The topic log seam on a real etcd (clusterlog.py): two or three "hosts" in this process,
each a follower of one topic and linked to its sequencer over real TCP links. What a
user relies on: one order for everyone, each line committed once, and a new sequencer
when the old one's host loses its lease, with nothing acknowledged lost."""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from theychat.daemons import links
from theychat.daemons.clusterlog import ClusterTopicLog
from theychat.daemons.etcd import Etcd, EtcdError
from theychat.daemons.soak.etcdlab import EtcdCluster
from theychat.daemons.topiclog import Draft, Posted, Withdrawn

KEY = b"k" * 32
TOPICS = itertools.count()


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _add(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    info = warning = error = exception = _add


class Host:
    """One host's follower of the topic, with a lease and a link port of its own."""

    def __init__(self, name: str, etcd1: EtcdCluster, prefix: str, topic: str) -> None:
        self.name, self.prefix, self.topic = name, prefix, topic
        self.etcd = Etcd(etcd1.endpoints)
        self.lease_id = 0
        self.seen: list[Posted] = []
        self.log = Log()
        self.server: asyncio.Server | None = None
        self.topic_log: ClusterTopicLog | None = None
        self.stale_after_s: float | None = None  # lines here carry made-up times

    async def start(self, keep: int = 100) -> None:
        self.lease_id = await self.etcd.grant(2)
        self.keepalive = asyncio.ensure_future(self._keepalive())
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.topic_log = ClusterTopicLog(self.topic, self.etcd, self.prefix, self.name,
                                         f"127.0.0.1:{port}", keep, KEY,
                                         lambda: self.lease_id, self.log,
                                         stale_after_s=self.stale_after_s)
        self.topic_log.follow(self.seen.extend)
        await self.topic_log.start()

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(0.3)
            await self.etcd.keepalive(self.lease_id)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()  # the routing line a router would read
        assert self.topic_log is not None
        await self.topic_log.serve_link(reader, writer)

    async def die(self) -> None:
        """As a host does when it is killed whole: it stops, its lease is revoked."""
        self.keepalive.cancel()
        assert self.topic_log is not None and self.server is not None
        await self.topic_log.close()
        self.server.close()
        await self.etcd.revoke(self.lease_id)
        await self.etcd.close()

    async def close(self) -> None:
        self.keepalive.cancel()
        if self.topic_log is not None:
            await self.topic_log.close()
        if self.server is not None:
            self.server.close()
        await self.etcd.close()


def run(etcd1: EtcdCluster, names: list[str],
        body: Callable[[list[Host]], Awaitable[None]],
        prepare: Callable[[list[Host]], None] | None = None) -> None:
    n = next(TOPICS)
    prefix = f"/test/cl{n}/"

    async def main() -> None:
        hosts = [Host(name, etcd1, prefix, f"t{n}") for name in names]
        if prepare is not None:
            prepare(hosts)
        try:
            for h in hosts:
                await h.start()
            await until(lambda: any(h.topic_log.sequencing for h in hosts))  # type: ignore[union-attr]
            await body(hosts)
        finally:
            for h in hosts:
                await h.close()

    asyncio.run(main())


async def until(cond: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "never happened"
        await asyncio.sleep(0.01)


def log_of(h: Host) -> ClusterTopicLog:
    assert h.topic_log is not None
    return h.topic_log


def test_every_host_sees_every_line_once_in_one_order(etcd1: EtcdCluster) -> None:
    async def body(hosts: list[Host]) -> None:
        acked: list[Posted] = []
        outran: list[tuple[str, int, int]] = []

        def answered(h: Host, f: asyncio.Future[list[Posted]]) -> None:
            acked.extend(f.result())
            seen = h.seen[-1].seq if h.seen else 0
            if f.result()[-1].seq > seen:  # the sender would hear `sent N` before N-1
                outran.append((h.name, f.result()[-1].seq, seen))

        for i in range(20):
            for h in hosts:
                fut = log_of(h).append([Draft(f"s-{h.name}", h.name, f"{h.name} {i}", 1.0)])
                fut.add_done_callback(functools.partial(answered, h))
        await until(lambda: len(acked) == 60)
        assert outran == []  # an answer comes once its host has delivered up to it
        for h in hosts:
            await log_of(h).sync()
        orders = [[(p.seq, p.text) for p in h.seen] for h in hosts]
        assert orders[0] == orders[1] == orders[2]
        assert [s for s, _ in orders[0]] == list(range(1, 61))
        assert sorted(p.seq for p in acked) == list(range(1, 61))
        for h in hosts:  # each host's own lines in the order it sent them
            mine = [t for _, t in orders[0] if t.startswith(h.name)]
            assert mine == [f"{h.name} {i}" for i in range(20)]
        assert [p.text for p in log_of(hosts[1]).last(3)] == [t for _, t in orders[0][-3:]]

    def slow_watches(hosts: list[Host]) -> None:
        """etcd's watch late on every host (as under load): answers come first."""
        for h in hosts:
            watch = h.etcd.watch

            async def late(*args: Any, _watch: Any = watch, **kw: Any) -> Any:
                async for batch in _watch(*args, **kw):
                    await asyncio.sleep(0.02)
                    yield batch

            h.etcd.watch = late  # type: ignore[method-assign]

    run(etcd1, ["a", "b", "c"], body, slow_watches)


def test_a_burst_of_long_lines_is_committed_in_blocks_etcd_takes(etcd1: EtcdCluster) -> None:
    """900 lines of 4000 characters at once: as one block they would exceed etcd's
    request limit (1.5 MiB) and be refused again and again; each is committed."""
    async def body(hosts: list[Host]) -> None:
        rng = random.Random(5)  # text that does not compress away
        futures = [log_of(h).append([Draft(f"s-{h.name}", h.name, "".join(
                       rng.choices("abcdefghijklmnopqrstuvwxyz ", k=4000)), 1.0, line=i)])
                   for i in range(450) for h in hosts]
        done, _ = await asyncio.wait(futures, timeout=30)
        assert len(done) == len(futures)
        assert sorted(f.result()[0].seq for f in futures) == list(range(1, 901))
        await until(lambda: all(len(h.seen) >= 900 for h in hosts))  # the other's too
        assert [p.seq for p in hosts[0].seen] == [p.seq for p in hosts[1].seen] \
            == list(range(1, 901))

    run(etcd1, ["a", "b"], body)


def test_a_resent_numbered_line_is_committed_once(etcd1: EtcdCluster) -> None:
    async def body(hosts: list[Host]) -> None:
        follower = next(h for h in hosts if not log_of(h).sequencing)
        first = await log_of(follower).append([Draft("s1", "ann", "hello", 1.0, line=7)])
        again = await log_of(follower).append([Draft("s1", "ann", "hello", 1.0, line=7)])
        # Line 6 never came before (read by a server that died): late, but new.
        lost = await log_of(follower).append([Draft("s1", "ann", "hi", 1.0, line=6)])
        lost_again = await log_of(follower).append([Draft("s1", "ann", "hi", 1.0, line=6)])
        await log_of(follower).sync()
        assert first[0].seq == again[0].seq
        assert lost[0].seq == lost_again[0].seq == first[0].seq + 1
        assert [p.text for p in follower.seen] == ["hello", "hi"]

    run(etcd1, ["a", "b"], body)


def test_when_the_sequencers_host_dies_another_takes_over_and_nothing_is_lost(
        etcd1: EtcdCluster) -> None:
    async def body(hosts: list[Host]) -> None:
        owner = next(h for h in hosts if log_of(h).sequencing)
        others = [h for h in hosts if h is not owner]
        acked: list[Posted] = []
        for i in range(10):
            acked += await log_of(others[0]).append([Draft("s", "x", f"before {i}", 1.0)])
        await owner.die()
        pending = [log_of(others[0]).append([Draft("s", "x", f"after {i}", 1.0)])
                   for i in range(10)]
        await until(lambda: any(log_of(h).sequencing for h in others))
        for fut in pending:
            acked += await asyncio.wait_for(fut, 10)
        # sync() covers a host's own lines; the other follows etcd's watch, in time.
        await until(lambda: all(len(h.seen) >= 20 for h in others))
        for h in others:
            assert [p.seq for p in h.seen] == list(range(1, 21))
        assert [p.text for p in others[1].seen] == (
            [f"before {i}" for i in range(10)] + [f"after {i}" for i in range(10)])
        assert sorted(p.seq for p in acked) == list(range(1, 21))

    run(etcd1, ["a", "b", "c"], body)


def test_a_fenced_sequencer_cannot_commit(etcd1: EtcdCluster) -> None:
    """Its owner key gone (its lease revoked: a host cut off), the old sequencer's next
    block fails: only the new owner's blocks are in the log."""
    async def body(hosts: list[Host]) -> None:
        owner = next(h for h in hosts if log_of(h).sequencing)
        other = next(h for h in hosts if h is not owner)
        await log_of(other).append([Draft("s", "x", "one", 1.0)])
        old_log = log_of(owner)
        owner.keepalive.cancel()
        await owner.etcd.revoke(owner.lease_id)  # the majority revoked it
        old_log.sequencing = True  # as if it had not heard yet: it tries to go on
        old_log._owner_rev = old_log._owner_rev
        written = await old_log._write(
            [Posted(99, 1.0, "x", "split brain")], ["t-split"])
        assert written is False
        await until(lambda: log_of(other).sequencing)
        await log_of(other).append([Draft("s", "x", "two", 1.0)])
        await log_of(other).sync()
        assert [p.text for p in other.seen] == ["one", "two"]

    run(etcd1, ["a", "b"], body)


def test_a_block_whose_write_fails_as_the_sequencer_changes_goes_to_the_new_one(
        etcd1: EtcdCluster) -> None:
    """The old sequencer's write is cut off (etcd unreachable) while the others elect a
    new one: the line it held is committed by the new sequencer, not kept forever."""
    async def body(hosts: list[Host]) -> None:
        owner = next(h for h in hosts if log_of(h).sequencing)
        other = next(h for h in hosts if h is not owner)
        old_log = log_of(owner)

        async def cut_off_write(entries: list[Posted], tags: list[str]) -> bool:
            owner.keepalive.cancel()
            await owner.etcd.revoke(owner.lease_id)  # the majority revoked it meanwhile
            await until(lambda: not old_log.sequencing and log_of(other).sequencing)
            raise EtcdError("no etcd endpoint answered")

        old_log._write = cut_off_write  # type: ignore[method-assign]
        entries = await asyncio.wait_for(old_log.append([Draft("s", "x", "held", 1.0)]), 10)
        assert [e.text for e in entries] == ["held"]
        await until(lambda: bool(other.seen))
        assert [p.text for p in other.seen] == ["held"]

    run(etcd1, ["a", "b"], body)


def test_withdrawn_lines_are_never_committed_and_others_are(etcd1: EtcdCluster) -> None:
    """A host letting its clients go withdraws what they said and is not committed yet:
    queued, or in a write that fails. Other sessions' lines go on."""
    async def body(hosts: list[Host]) -> None:
        owner = next(h for h in hosts if log_of(h).sequencing)
        other = next(h for h in hosts if h is not owner)
        seq = log_of(owner)
        real_write = seq._write
        release = asyncio.Event()

        async def stuck_write(entries: list[Posted], tags: list[str]) -> bool:
            await release.wait()  # etcd does not answer (cut off)...
            raise EtcdError("no etcd endpoint answered")  # ...and then says so

        seq._write = stuck_write  # type: ignore[method-assign]
        writing = seq.append([Draft("gone", "ann", "in the failing write", 1.0)])
        await until(lambda: bool(seq._writing))
        queued = seq.append([Draft("gone", "ann", "queued", 1.0)])
        kept = seq.append([Draft("stays", "bob", "another's line", 1.0)])
        assert seq.withdraw({"gone"}) == 2
        for f in (writing, queued):
            with pytest.raises(Withdrawn):
                await f
        seq._write = real_write  # type: ignore[method-assign]
        release.set()
        assert [e.text for e in await asyncio.wait_for(kept, 10)] == ["another's line"]
        await until(lambda: bool(other.seen))
        await asyncio.sleep(0.3)  # time for a wrongly kept line to be committed after all
        assert [p.text for p in other.seen] == ["another's line"]

    run(etcd1, ["a", "b"], body)


def test_a_followers_line_typed_too_long_ago_is_refused_not_committed_late(
        etcd1: EtcdCluster) -> None:
    """A partition's backlog reaching the sequencer when it heals (older than
    cluster.lost_after_s: its host has let those clients go) is never committed."""
    async def body(hosts: list[Host]) -> None:
        owner = next(h for h in hosts if log_of(h).sequencing)
        other = next(h for h in hosts if h is not owner)
        late = log_of(other).append([Draft("s", "x", "typed in the partition",
                                           time.time() - 6)])
        fresh = log_of(other).append([Draft("s", "x", "typed now", time.time())])
        with pytest.raises(Withdrawn):
            await asyncio.wait_for(late, 10)
        assert [e.text for e in await asyncio.wait_for(fresh, 10)] == ["typed now"]
        await until(lambda: bool(owner.seen))
        assert [p.text for p in owner.seen] == ["typed now"]
        assert any(e == "link_line_refused" for e, _ in owner.log.events)

    def bound(hosts: list[Host]) -> None:
        for h in hosts:
            h.stale_after_s = 5.0

    run(etcd1, ["a", "b"], body, bound)


@pytest.mark.parametrize("bad_key", [b"x" * 32])
def test_a_link_without_the_cluster_key_is_refused(etcd1: EtcdCluster, bad_key: bytes) -> None:
    async def body(hosts: list[Host]) -> None:
        owner = next(h for h in hosts if log_of(h).sequencing)
        with pytest.raises(links.LinkError):
            await links.connect(log_of(owner).link_address, bad_key, "intruder",
                                log_of(owner).topic)
        await until(lambda: any(e == "link_refused" for e, _ in owner.log.events))

    run(etcd1, ["a", "b"], body)
