"""Links between hosts over a real loopback socket: the handshake, the signed lines,
and the batching of `send_soon`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from theychat.daemons import links

KEY = b"k" * 32


async def _pair(server_key: bytes = KEY, refused: list[str] | None = None
                ) -> tuple[links.Link, links.Link, asyncio.Server]:
    accepted: asyncio.Future[links.Link] = asyncio.get_running_loop().create_future()

    async def on_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readline()  # the routing hint, which a router reads in the daemon
        try:
            accepted.set_result(await links.accept(r, w, server_key, "general"))
        except links.LinkError as e:
            w.close()  # as the daemon does with a host it refused
            if refused is not None:
                refused.append(str(e))

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    follower = await links.connect(f"127.0.0.1:{port}", KEY, "h1", "general")
    return follower, await accepted, server


@contextlib.asynccontextmanager
async def _linked() -> AsyncIterator[tuple[links.Link, links.Link]]:
    """A follower's link and the sequencer's end of it, closed afterwards."""
    follower, sequencer, server = await _pair()
    try:
        yield follower, sequencer
    finally:
        follower.close()
        sequencer.close()
        server.close()


def test_send_soon_gathers_one_turn_into_one_line() -> None:
    async def main() -> None:
        async with _linked() as (follower, sequencer):
            for i in range(5):
                follower.send_soon("requests", {"id": i})
            follower.send({"other": 1})  # a plain send in the same turn leaves first
            assert await sequencer.recv() == {"other": 1}
            assert await sequencer.recv() == {"requests": [{"id": i} for i in range(5)]}
            follower.send_soon("requests", {"id": 9})  # a later turn: a line of its own
            assert await sequencer.recv() == {"requests": [{"id": 9}]}
    asyncio.run(main())


def test_send_soon_leaves_at_its_bound_without_waiting_for_the_turn() -> None:
    async def main() -> None:
        async with _linked() as (follower, sequencer):
            for i in range(links.SOON_MAX + 1):
                follower.send_soon("replies", {"id": i})
            first = await sequencer.recv()
            second = await sequencer.recv()
            assert len(first["replies"]) == links.SOON_MAX
            assert second == {"replies": [{"id": links.SOON_MAX}]}
    asyncio.run(main())


def test_what_is_queued_when_a_link_is_discarded_never_leaves() -> None:
    async def main() -> None:
        async with _linked() as (follower, sequencer):
            follower.send_soon("requests", {"id": 1})
            follower.discard()  # withdrawn lines must not reach the sequencer
            with pytest.raises(links.LinkError):
                await sequencer.recv()
    asyncio.run(main())


def test_a_host_without_the_key_is_refused() -> None:
    async def main() -> None:
        refused: list[str] = []
        with pytest.raises(links.LinkError, match="closed"):
            await _pair(server_key=b"x" * 32, refused=refused)  # the sequencer hangs up
        assert refused == ["h1: does not know the cluster key"]
    asyncio.run(main())


def test_a_forged_line_ends_the_link() -> None:
    async def main() -> None:
        async with _linked() as (follower, sequencer):
            follower.writer.write(b'{"requests":[]} 00\n')
            with pytest.raises(links.LinkError, match="bad signature"):
                await sequencer.recv()
    asyncio.run(main())
