"""Real etcd members for tests, soaks and benchmarks: Debian's etcd-server, started on
loopback (or inside a network namespace) on free ports, each with a data directory of
its own, and always stopped. Tests that need etcd skip with the reason when it is not
installed."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from theychat.daemons.soak.netns import run_in
from theychat.daemons.soak.tree import free_port

ETCD = shutil.which("etcd")
START_S = 15.0


def why_no_etcd() -> str | None:
    return None if ETCD else "no etcd binary (Debian package etcd-server)"


@dataclass
class Member:
    name: str
    ip: str
    client_port: int
    peer_port: int
    data: Path
    netns: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=Path)

    @property
    def client_url(self) -> str:
        return f"http://{self.ip}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.ip}:{self.peer_port}"


class EtcdCluster:
    """`n` members; with `netns`, member i runs in namespace netns[i] at ips[i]."""

    def __init__(self, n: int = 1, ips: Sequence[str] | None = None,
                 netns: Sequence[str] | None = None, heartbeat_ms: int = 50,
                 election_ms: int = 500, root: Path | None = None) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="tc-etcd-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.heartbeat_ms, self.election_ms = heartbeat_ms, election_ms
        self.members = [
            Member(f"m{i}", ips[i] if ips else "127.0.0.1",
                   2379 if netns else free_port(), 2380 if netns else free_port(),
                   self.root / f"m{i}", netns[i] if netns else None)
            for i in range(n)]
        self.token = f"tc-{os.getpid()}-{int(time.time())}"

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def command(self, m: Member, new: bool = True) -> list[str]:
        assert ETCD is not None
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        cmd = [ETCD, "--name", m.name, "--data-dir", str(m.data),
               "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
               "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
               "--initial-cluster", initial, "--initial-cluster-token", self.token,
               "--initial-cluster-state", "new" if new else "existing",
               "--heartbeat-interval", str(self.heartbeat_ms),
               "--election-timeout", str(self.election_ms), "--log-level", "error"]
        if m.netns:
            cmd = ["ip", "netns", "exec", m.netns, *cmd]
        return cmd

    def start_member(self, m: Member, new: bool = True) -> None:
        """Start a member: of a new cluster, or (`new=False`) back with its data."""
        m.log = self.root / f"{m.name}.log"
        with open(m.log, "ab") as out:
            m.proc = subprocess.Popen(self.command(m, new), stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def start(self) -> None:
        for m in self.members:
            self.start_member(m)
        self.wait_healthy()

    def healthy(self, m: Member) -> bool:
        url = m.client_url + "/health"

        def ask() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    return b'"health":"true"' in r.read()
            except OSError:
                return False

        return run_in(m.netns, ask) if m.netns else ask()

    def wait_healthy(self, members: Sequence[Member] | None = None,
                     timeout: float = START_S) -> None:
        deadline = time.monotonic() + timeout
        for m in members or self.members:
            while not self.healthy(m):
                if m.proc is not None and m.proc.poll() is not None:
                    raise RuntimeError(f"etcd {m.name} exited: {m.log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd {m.name} not healthy in {timeout}s")
                time.sleep(0.05)

    def kill_member(self, m: Member) -> None:
        if m.proc is not None and m.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(m.proc.pid, signal.SIGKILL)
            m.proc.wait(timeout=10)

    def stop(self) -> None:
        for m in self.members:
            self.kill_member(m)
        shutil.rmtree(self.root, ignore_errors=True)
