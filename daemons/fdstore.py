"""Sockets that outlive the process serving them, after systemd's file descriptor store.

The worker (a topic server, or the router for its lobby) passes a duplicate of every
client socket it owns to its monitor (`fd_store`, keyed by session id, with the session
record), and says `fd_drop` when the client leaves. A restarted worker asks for them back
(`fd_fetch`) and carries on; the clients saw a pause. A restarted monitor asks the worker
to store everything again (`fd_resync`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

from theychat.daemons import control, ops
from theychat.daemons.control import Message, fail, ok
from theychat.daemons.errors import ControlError

FETCH_BATCH = 32  # fds per reply packet; the kernel allows 253


class FdVault:
    """The monitor's side: holds the duplicates. Owns every fd it holds."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[int | None, dict[str, Any]]] = {}

    def __len__(self) -> int:
        return sum(1 for fd, _ in self.entries.values() if fd is not None)

    def table(self) -> dict[type[ops.Op], ops.Handler]:
        """The control ops a vault answers, for its monitor's dispatcher."""
        return {ops.FdStore: self.on_store, ops.FdDrop: self.on_drop,
                ops.FdFetch: self.on_fetch, ops.FdHeld: self.on_held}

    def on_store(self, op: ops.FdStore, fds: list[int]) -> Message:
        if len(fds) > 1:
            return fail("bad_request", "fd_store: at most one fd")
        old_fd, _ = self.entries.get(op.id, (None, {}))
        new_fd = fds.pop() if fds else old_fd  # no fd: only the record changed
        if old_fd is not None and old_fd != new_fd:
            os.close(old_fd)
        self.entries[op.id] = (new_fd, op.meta)
        return ok(held=len(self))

    def on_drop(self, op: ops.FdDrop, fds: list[int]) -> Message:
        self.drop(op.id)
        return ok(held=len(self))

    def drop(self, key: str) -> None:
        fd, _ = self.entries.pop(key, (None, {}))
        if fd is not None:
            os.close(fd)

    def on_fetch(self, op: ops.FdFetch, fds: list[int]) -> Message:
        keys = sorted(k for k, (fd, _) in self.entries.items() if fd is not None and k > op.after)
        batch = keys[:FETCH_BATCH]
        return ok(items=[{"id": k, "meta": self.entries[k][1]} for k in batch],
                  more=len(keys) > len(batch), _fds=[self.entries[k][0] for k in batch])

    def on_held(self, op: ops.FdHeld, fds: list[int]) -> Message:
        """Did our worker take this socket before it died?"""
        entry = self.entries.get(op.id)
        return ok(held=entry is not None and entry[0] is not None)

    def held(self) -> list[tuple[str, int, dict[str, Any]]]:
        """(id, fd, record) of every socket held; the fds stay ours."""
        return [(k, fd, meta) for k, (fd, meta) in self.entries.items() if fd is not None]

    def close_all(self) -> None:
        for fd, _ in self.entries.values():
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.entries.clear()


class FdKeeper:
    """The worker's side: sends store/drop in order, one at a time, to the monitor."""

    def __init__(self, monitor_ctl: Path, log: Any) -> None:
        self.path = monitor_ctl
        self.log = log
        self._queue: asyncio.Queue[tuple[ops.FdStore | ops.FdDrop, int | None,
                                         asyncio.Future[bool]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def store(self, key: str, sock_fd: int | None, meta: dict[str, Any]) -> asyncio.Future[bool]:
        """Queue a duplicate of `sock_fd` (None: update the record only).

        The future says whether the monitor has it: await it before telling a client
        that something happened which a restart must not undo.
        """
        dup = os.dup(sock_fd) if sock_fd is not None else None
        return self._put(ops.FdStore(id=key, meta=meta), dup)

    def drop(self, key: str) -> asyncio.Future[bool]:
        return self._put(ops.FdDrop(id=key), None)

    def _put(self, op: ops.FdStore | ops.FdDrop, fd: int | None) -> asyncio.Future[bool]:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((op, fd, done))
        return done

    async def _run(self) -> None:
        while True:
            op, fd, done = await self._queue.get()
            try:
                control.check(await control.request(self.path, op.message(),
                                                    fds=[fd] if fd else []))
                done.set_result(True)
            except ControlError as e:
                # The monitor is down; when it is back it asks us to resync everything.
                self.log.warning("fd_store_failed", op=op.name, error=str(e))
                done.set_result(False)
            finally:
                if fd is not None:
                    os.close(fd)

    @staticmethod
    async def settled(done: asyncio.Future[bool], timeout: float = 1.0) -> bool:
        """Wait (bounded) until the monitor holds what we queued; False if it may not."""
        try:
            return await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            return False

    async def fetch_all(self) -> list[tuple[str, int, dict[str, Any]]]:
        """Every socket the monitor holds for us, as (id, fd, record); we own the fds."""
        got: list[tuple[str, int, dict[str, Any]]] = []
        after = ""
        while True:
            reply, fds = await control.request_fds(self.path, ops.FdFetch(after=after).message())
            items = reply.get("items") if reply.get("ok") else None
            if not isinstance(items, list) or len(items) != len(fds):
                control.close_fds(fds)
                raise ControlError(f"fd_fetch: bad reply {reply.get('error', '')}", "bad_reply")
            got += [(str(i["id"]), fd, dict(i["meta"])) for i, fd in zip(items, fds, strict=True)]
            if not reply.get("more") or not items:
                return got
            after = got[-1][0]

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
