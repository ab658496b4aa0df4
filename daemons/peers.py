"""How a daemon asks another daemon: a typed op to its control socket on this host, or,
in cluster mode, to its mailbox on another host (`cluster.Mailbox`). Replies come as
the peer gave them (`{"ok": true, ...}` or an error); a request to another host is
answered `ok` once etcd holds it (its effect comes later, or not at all if that host is
gone). Command modules take a `Peers`, so their tests can answer in-process instead."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from theychat.daemons import control
from theychat.daemons.cluster import Mailbox
from theychat.daemons.control import Message, ok
from theychat.daemons.etcd import EtcdError
from theychat.daemons.ops import Op
from theychat.daemons.paths import StatePaths
from theychat.daemons.tree import DaemonId


class Peers(Protocol):
    async def ask(self, to: DaemonId, op: Op, timeout: float = 2.0,
                  fds: Sequence[int] = (), host: str = "") -> Message:
        """The peer's reply; ControlError (`unavailable`) if it cannot be asked. `host`:
        the peer is on that host (cluster mode; "" or ours: this one)."""
        ...


class ControlPeers:
    """Peers over the control sockets of one state directory, and, once `mailbox` is
    set, over etcd to other hosts."""

    def __init__(self, paths: StatePaths, host: str = "") -> None:
        self.paths = paths
        self.host = host
        self.mailbox: Mailbox | None = None
        self.lease: Callable[[], int] = lambda: 0

    async def ask(self, to: DaemonId, op: Op, timeout: float = 2.0,
                  fds: Sequence[int] = (), host: str = "") -> Message:
        if host and host != self.host:
            if self.mailbox is None:
                return {"ok": False, "code": "unavailable", "error": f"{host} cannot be asked"}
            try:
                await self.mailbox.post(host, to.name, op, self.lease())
            except EtcdError as e:
                return {"ok": False, "code": "unavailable", "error": f"{host}: {e}"}
            return ok(posted=True)
        return await control.request(self.paths.control(to.name), op.message(), fds=fds,
                                     timeout=timeout)
