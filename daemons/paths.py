"""Layout of a state directory: one tree per running TheyChat, private to its user.

Files are named after daemons (`tree.DaemonId.name`: `server@rust`)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from theychat.daemons.errors import StateDirError
from theychat.daemons.protocol import MAX_NAME
from theychat.daemons.tree import every_daemon, holder

# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class StatePaths:
    root: Path

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def cluster_peers(self) -> Path:
        """The other hosts' beat addresses (cluster mode), kept by the router for its
        monitor, which beats for the host too (cluster.py)."""
        return self.run / "cluster-peers.json"

    @property
    def wals(self) -> Path:
        return self.root / "wal"

    def wal(self, name: str) -> Path:
        return self.wals / f"{name}.wal"

    @property
    def stopping(self) -> Path:
        """Present while `theychat down` runs: supervisors must not restart anything."""
        return self.run / "stopping"

    def control(self, name: str) -> Path:
        return self.run / f"{name}.ctl"

    def witness(self, topic: str | None) -> Path:
        """The control socket of the monitor that keeps copies of the sockets of people
        in `topic` (None: the lobby): who can tell whether a handoff there happened."""
        monitor = holder(topic).supervisor
        assert monitor is not None
        return self.control(monitor.name)

    def pidfile(self, name: str) -> Path:
        return self.run / f"{name}.pid"

    def heartbeat(self, name: str) -> Path:
        """Where a supervisor publishes the UDP port it receives heartbeats on."""
        return self.run / f"{name}.hb"

    @property
    def heartbeat_key(self) -> Path:
        return self.root / "heartbeat.key"

    def lockfile(self, name: str) -> Path:
        return self.run / f"{name}.lock"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def stderr(self, name: str) -> Path:
        return self.logs / f"{name}.stderr"

    def ensure(self) -> None:
        """Create the tree with private modes, or say clearly why it cannot be used."""
        for d in (self.root, self.run, self.logs, self.wals):
            try:
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
                st = d.stat()
                if not stat.S_ISDIR(st.st_mode):
                    raise StateDirError(f"{d}: not a directory")
                if st.st_mode & 0o077:
                    os.chmod(d, 0o700)
                if not os.access(d, os.W_OK | os.X_OK):
                    raise StateDirError(f"{d}: not writable")
            except OSError as e:
                raise StateDirError(f"{d}: {e.strerror or e}") from None
        longest = max((self.control(d.name) for d in every_daemon(["x" * MAX_NAME])),
                      key=lambda p: len(str(p)))
        if len(str(longest)) > MAX_SOCKET_PATH:
            raise StateDirError(
                f"{self.root}: path too long for Unix sockets "
                f"({len(str(longest))} bytes needed, at most {MAX_SOCKET_PATH})"
            )
