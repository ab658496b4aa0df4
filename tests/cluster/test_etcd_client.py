"""The etcd client (etcd.py) against real members: a member that does not answer costs
a quarter of a second, not the request's timeout, and a mutation sent twice because of
it is not mistaken for someone else's win."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest

from theychat.daemons import etcd
from theychat.daemons.etcd import Etcd
from theychat.daemons.etcdstore import EtcdStore
from theychat.daemons.soak.etcdlab import EtcdCluster

PATIENT_S = 10.0  # the request timeout here: a request that waited for it failed the test


async def _silent_member() -> tuple[asyncio.Server, str]:
    """Accepts, reads, never answers: a member whose leader died under a request."""
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def _slow_proxy(to: str, delay_s: float) -> tuple[asyncio.Server, str]:
    """Passes requests to `to` at once and its answers back `delay_s` late: etcd has
    done what was asked long before the client hears of it."""
    host, port = to.removeprefix("http://").split(":")

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   delay: float) -> None:
        while data := await reader.read(65536):
            if delay:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
        writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pipe(reader, up_writer, 0.0), pipe(up_reader, writer, delay_s),
                             return_exceptions=True)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def test_a_member_that_never_answers_is_passed_over(etcd1: EtcdCluster) -> None:
    async def main() -> None:
        server, silent = await _silent_member()
        client = Etcd([silent, *etcd1.endpoints], timeout_s=PATIENT_S)
        try:
            t = time.monotonic()
            await client.put("/test/hedge/a", b"1")
            took = time.monotonic() - t
            kvs, _ = await Etcd(etcd1.endpoints).range("/test/hedge/a")
            assert [kv.value for kv in kvs] == [b"1"]
            assert took < PATIENT_S / 2, f"waited {took:.1f}s for the silent member"
        finally:
            await client.close()
            server.close()
    asyncio.run(main())


def test_no_member_answering_is_an_error_at_the_timeout() -> None:
    async def main() -> None:
        server, silent = await _silent_member()
        client = Etcd([silent], timeout_s=1.0)
        try:
            t = time.monotonic()
            with pytest.raises(etcd.EtcdUnavailable, match="no etcd endpoint answered"):
                await client.put("/test/hedge/b", b"1")
            assert time.monotonic() - t < 5.0
        finally:
            await client.close()
            server.close()
    asyncio.run(main())


def test_a_create_won_by_its_own_slower_attempt_is_a_win(etcd1: EtcdCluster) -> None:
    async def main() -> None:
        server, slow = await _slow_proxy(etcd1.endpoints[0], delay_s=1.0)
        client = Etcd([slow, *etcd1.endpoints], timeout_s=PATIENT_S)
        store = EtcdStore(client, "/test/hedge/store/")
        await store.start()
        try:
            # The first attempt creates the key; its answer is late, so a second goes to
            # the direct endpoint, which finds the key there: a failed compare, ours.
            entry = await store.create("nicks/ann", {"session": "s1"}, ttl_s=30)
            assert entry is not None and entry.value == {"session": "s1"}
            await asyncio.sleep(1.5)  # the slow answer comes and goes
            kvs, _ = await Etcd(etcd1.endpoints).range("/test/hedge/store/nicks/ann")
            assert [json.loads(kv.value) for kv in kvs] == [{"session": "s1"}]
            assert kvs[0].lease != 0  # its lease was kept, not revoked as a loser's
            other = await store.create("nicks/ann", {"session": "s2"})
            assert other is None  # and someone else's create still loses
            assert await store.delete("nicks/ann") is True  # sent twice too: deleted
        finally:
            await store.close()
            await client.close()
            server.close()
    asyncio.run(main())


def _leader(cluster: EtcdCluster) -> int:
    for i, m in enumerate(cluster.members):
        req = urllib.request.Request(m.client_url + "/v3/maintenance/status", data=b"{}",
                                     method="POST")
        with urllib.request.urlopen(req, timeout=2) as r:
            status = json.loads(r.read())
        if status.get("leader") == status.get("header", {}).get("member_id"):
            return i
    raise AssertionError("no leader")


def test_a_write_when_the_leader_dies_waits_for_the_election_not_the_timeout(
        etcd3: EtcdCluster) -> None:
    async def main() -> None:
        leader = _leader(etcd3)
        followers = [m.client_url for i, m in enumerate(etcd3.members) if i != leader]
        client = Etcd(followers, timeout_s=PATIENT_S)
        try:
            await client.put("/test/hedge/c", b"0")  # connected, warm
            etcd3.kill_member(etcd3.members[leader])
            t = time.monotonic()
            # A follower forwards this to the leader it still believes in: dropped.
            await client.put("/test/hedge/c", b"1")
            took = time.monotonic() - t
            kvs, _ = await client.range("/test/hedge/c")
            assert [kv.value for kv in kvs] == [b"1"]
            assert took < PATIENT_S / 2, f"waited {took:.1f}s"
        finally:
            await client.close()
    asyncio.run(main())
