"""What a router does in a cluster besides its lobby (cluster mode only): it is its
host's agent in the cluster (`cluster.HostAgent`: the lease, heartbeats between hosts,
revoking a dead host's lease, noticing it is cut off), its door for links (a follower
of another host connects to `advertise:port` and names its topic; the socket is passed
on to the topic's server, the sequencer, with SCM_RIGHTS), and the mailbox of requests
other hosts send it (a direct message for someone in the lobby, a take-over).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from theychat.daemons import ops
from theychat.daemons.cluster import HostAgent, Keys, Mailbox, load_key
from theychat.daemons.config import Config
from theychat.daemons.control import Message, check
from theychat.daemons.errors import ControlError
from theychat.daemons.etcd import Etcd
from theychat.daemons.peers import ControlPeers
from theychat.daemons.protocol import valid_name
from theychat.daemons.tree import holder

ROUTING_LINE_MAX = 512
ROUTING_WAIT_S = 2.0


class RouterCluster:
    def __init__(self, cfg: Config, client: Etcd, peers: ControlPeers, log: Any,
                 answer: Callable[[Message, list[int]], Awaitable[Message]],
                 topics: Callable[[], list[str]],
                 on_lost: Callable[[], Awaitable[None]],
                 on_back: Callable[[], Awaitable[None]],
                 on_gone: Callable[[str], Awaitable[None]],
                 peers_file: Path, incarnation: int) -> None:
        assert cfg.cluster is not None
        self.cfg = cfg
        self.c = cfg.cluster
        self.etcd = client
        self.peers = peers
        self.log = log
        self.topics = topics
        self.keys = Keys(self.c.name)
        key = load_key(self.c.key_file)
        self.agent = HostAgent(self.c, cfg.heartbeat, client, key,
                               f"{self.c.advertise}:{cfg.listen.port}", log, on_lost,
                               on_back, on_gone, peers_file, os.getpid(), incarnation)
        self.mailbox = Mailbox(client, self.keys, self.c.host, holder(None).name, answer, log)
        self._door: socket.socket | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        await self.agent.start()
        self.peers.mailbox = self.mailbox
        self.peers.lease = lambda: self.agent.lease
        await self.mailbox.start()
        door = socket.socket(socket.AF_INET6 if ":" in self.c.advertise else socket.AF_INET)
        door.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        door.bind((self.c.advertise, self.c.port))
        door.listen(128)
        door.setblocking(False)
        self._door = door
        self._spawn(self._serve_links())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_links(self) -> None:
        assert self._door is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._door)
            except OSError as e:
                self.log.warning("control_accept_failed", error=str(e))
                await asyncio.sleep(0.05)
                continue
            self._spawn(self._route(conn))

    async def _route(self, conn: socket.socket) -> None:
        """Read the routing line, exactly (what follows is the server's), and pass the
        link to the topic's server."""
        conn.setblocking(False)
        with conn:
            try:
                async with asyncio.timeout(ROUTING_WAIT_S):
                    line = await self._first_line(conn)
                topic = json.loads(line).get("topic")
            except (TimeoutError, OSError, ValueError, AttributeError):
                return
            if not isinstance(topic, str) or not valid_name(topic) or topic not in self.topics():
                return
            fd = os.dup(conn.fileno())
            try:
                check(await self.peers.ask(holder(topic), ops.TakeLink(), fds=[fd]))
            except ControlError as e:
                self.log.warning("link_refused", topic=topic, error=str(e))
            finally:
                with contextlib.suppress(OSError):
                    os.close(fd)

    @staticmethod
    async def _first_line(conn: socket.socket) -> bytes:
        """Up to and with the first newline, leaving the rest unread in the socket."""
        while True:
            try:
                peek = conn.recv(ROUTING_LINE_MAX + 1, socket.MSG_PEEK)
            except BlockingIOError:
                peek = None  # nothing yet
            if peek == b"":
                raise OSError("closed before its routing line")
            if peek and b"\n" in peek:
                return conn.recv(peek.index(b"\n") + 1)
            if peek and len(peek) > ROUTING_LINE_MAX:
                raise ValueError("routing line too long")
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._door is not None:
            self._door.close()
        await self.mailbox.close()
        await self.agent.close()
