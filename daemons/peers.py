"""How a daemon asks another daemon of its tree: a typed op to its control socket, the
reply as the peer gave it (`{"ok": true, ...}` or an error). Command modules take a
`Peers`, so their tests can answer in-process instead."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from theychat.daemons import control
from theychat.daemons.control import Message
from theychat.daemons.ops import Op
from theychat.daemons.paths import StatePaths
from theychat.daemons.tree import DaemonId


class Peers(Protocol):
    async def ask(self, to: DaemonId, op: Op, timeout: float = 2.0,
                  fds: Sequence[int] = ()) -> Message:
        """The peer's reply; ControlError (`unavailable`) if it cannot be asked."""
        ...


class ControlPeers:
    """Peers over the control sockets of one state directory."""

    def __init__(self, paths: StatePaths) -> None:
        self.paths = paths

    async def ask(self, to: DaemonId, op: Op, timeout: float = 2.0,
                  fds: Sequence[int] = ()) -> Message:
        return await control.request(self.paths.control(to.name), op.message(), fds=fds,
                                     timeout=timeout)
