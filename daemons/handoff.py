"""The client sockets one daemon holds, and the only ways they change hands: restore,
adopt, move and release. The router (for its lobby) and every topic server use it.

Every socket a daemon holds has a copy in its monitor (`fdstore`), so a restart of the
daemon is a pause for its clients. The rules that keep exactly one owner per socket
(docs/recovery.md, "one owner per socket"):

- adopt: the receiver's monitor holds a copy before the receiver tells anyone anything,
  its sender included: a crash before that leaves the socket with the sender, after it
  with the receiver;
- move: the sender keeps its copy until the receiver said yes, or, when the receiver
  died without a word, until the receiver's monitor (the witness) says it holds one;
- restore: after a restart the monitor's copies come back, except those the directory
  now places elsewhere (moved on just before the death, before the monitor heard the
  drop): those are released;
- release: letting go of a socket another process holds now closes only our descriptor.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from theychat.daemons import ops
from theychat.daemons.clientconn import ClientConn, Owner, attach
from theychat.daemons.config import Clients
from theychat.daemons.errors import ControlError
from theychat.daemons.fdstore import FdKeeper
from theychat.daemons.paths import StatePaths
from theychat.daemons.tree import DaemonId, holder

Kept = tuple[int, dict[str, Any]]  # a socket kept with the monitor that is not a client's


class Sockets:
    def __init__(self, me: DaemonId, paths: StatePaths, owner: Owner, limits: Clients,
                 log: Any) -> None:
        self.paths = paths
        self.owner = owner
        self.limits = limits
        self.log = log
        self.conns: dict[str, ClientConn] = {}  # session id -> the connection we hold
        self.extras: dict[str, Kept] = {}  # other sockets we keep with the monitor
        self.keeper = FdKeeper(paths.witness(me.topic), log)

    def __contains__(self, sid: str) -> bool:
        return sid in self.conns

    def __len__(self) -> int:
        return len(self.conns)

    def __iter__(self) -> Iterator[ClientConn]:
        return iter(list(self.conns.values()))

    def get(self, sid: str) -> ClientConn | None:
        return self.conns.get(sid)

    def start(self) -> None:
        self.keeper.start()

    async def close(self) -> None:
        await self.keeper.close()

    # -- after a restart ------------------------------------------------------------------

    async def restore(self, ours: Callable[[list[str]], Awaitable[set[str]]]
                      ) -> tuple[list[ClientConn], dict[str, Kept]]:
        """Take back what our monitor kept while we were dead: the client sockets that
        `ours(sids)` says are still ours (paused until started), and the kept sockets
        that are not a client's (by key, with their records; ours to use or close)."""
        try:
            items = await self.keeper.fetch_all()
        except ControlError as e:
            self.log.warning("fds_unavailable", error=str(e))
            return [], {}
        others = {k: (fd, meta) for k, fd, meta in items if "kind" in meta}
        clients = [(k, fd, meta) for k, fd, meta in items if "kind" not in meta]
        keep = await ours([k for k, _, _ in clients])
        restored = []
        for key, fd, meta in clients:
            try:
                rec = ops.record(ops.Conn, meta, "fd_fetch.meta")
            except ControlError:
                os.close(fd)
                self.keeper.drop(key)
                continue
            if key not in keep:
                os.close(fd)
                self.keeper.drop(key)
                self.log.info("fd_released", session=key, owner="elsewhere")
                continue
            conn = await attach(self.owner, rec, fd, self.limits, self.log)
            self.conns[rec.sid] = conn
            restored.append(conn)
        self.log.info("fds_restored", count=len(restored), kept=len(others))
        return restored, others

    def keep(self, key: str, fd: int, meta: dict[str, Any]) -> None:
        """Keep a socket that is not a client's with our monitor (`meta` has a `kind`)."""
        self.extras[key] = (fd, meta)
        self.keeper.store(key, fd, meta)

    def resync(self) -> int:
        """Our monitor restarted and holds nothing: store everything with it again."""
        for conn in self.conns.values():
            self.keeper.store(conn.sid, conn.fileno(), ops.to_dict(conn.record()))
        for key, (fd, meta) in self.extras.items():
            self.keeper.store(key, fd, meta)
        return len(self.conns) + len(self.extras)

    # -- arriving ---------------------------------------------------------------------------

    def hold(self, conn: ClientConn) -> asyncio.Future[bool]:
        """A connection accepted here: hold it, and have our monitor keep a copy; the
        future says once it does (greet only then)."""
        self.conns[conn.sid] = conn
        return self.keeper.store(conn.sid, conn.fileno(), ops.to_dict(conn.record()))

    async def adopt(self, op: ops.Adopt, fds: list[int]) -> ClientConn:
        """A socket passed to us: held, and kept by our monitor, before we return (and so
        before our reply lets the sender drop its copy). Paused: start it once it has
        been told where it is."""
        if len(fds) != 1:
            raise ControlError("adopt: expected exactly one socket", "bad_request")
        op.pending_bytes()  # checked before we take anything
        conn = await attach(self.owner, op.session, fds.pop(), self.limits, self.log)
        # Kept first, ours after: nothing is written to it (a fan-out) before the caller
        # has told it where it is.
        kept = self.keeper.store(conn.sid, conn.fileno(), ops.to_dict(conn.record()))
        await self.keeper.settled(kept)
        self.conns[conn.sid] = conn
        return conn

    def update(self, conn: ClientConn) -> asyncio.Future[bool] | None:
        """The connection's record changed (`/json`): our monitor's copy follows."""
        if self.conns.get(conn.sid) is not conn:
            return None
        return self.keeper.store(conn.sid, None, ops.to_dict(conn.record()))

    # -- leaving ----------------------------------------------------------------------------

    async def move(self, conn: ClientConn, to: str | None, adopt: ops.Adopt) -> None:
        """Pass `conn` on to whoever holds the people of topic `to` (None: the lobby).
        It is out of ours while it moves; if the move fails it is back, untouched, and
        the ControlError says why (a connection that ended meanwhile is reported lost)."""
        sid = conn.sid
        self.conns.pop(sid, None)
        target = self.paths.control(holder(to).name)
        try:
            await conn.hand_over(target, adopt, self.paths.witness(to))
        except ControlError:
            self.conns[sid] = conn
            if conn.close_reason:
                self.owner.lost(conn, conn.close_reason)
            raise
        self.keeper.drop(sid)

    def release(self, conn: ClientConn) -> None:
        """Another process holds this socket now: let go of our copies."""
        if self.conns.get(conn.sid) is conn:
            del self.conns[conn.sid]
        conn.release()
        self.keeper.drop(conn.sid)

    def lost(self, conn: ClientConn) -> bool:
        """The connection ended; True if it was ours (not moved, nor taken over)."""
        if self.conns.get(conn.sid) is not conn:
            return False
        del self.conns[conn.sid]
        self.keeper.drop(conn.sid)
        return True
