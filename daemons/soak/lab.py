"""A cluster on one machine, for tests, soaks and benchmarks: each host a network
namespace with an etcd member and a whole TheyChat tree, and the clients in a namespace
of their own (DESIGN.md section 10, "tested as Jepsen tests distributed stores").

    switch namespace:  bridge brc (10.77.0.0/24, between hosts: etcd, links, beats)
                       bridge bru (10.78.0.0/24, where people connect)
    host i:            c0 = 10.77.0.(11+i) on brc, u0 = 10.78.0.(11+i) on bru
    clients:           u0 = 10.78.0.100 on bru

Two networks, so that a partition (`partition(i)`: host i's link to brc goes down) cuts
a host off from the other hosts but not from its own clients, who then see what it
does when it loses the cluster. A host killed (`kill_host(i)`) is every process in its
namespace, etcd included, SIGKILLed at once. Everything is made here and removed by
`stop()`: namespaces, processes, directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from theychat.daemons import config, procs, status
from theychat.daemons.cluster import make_key
from theychat.daemons.paths import StatePaths
from theychat.daemons.soak.etcdlab import ETCD, EtcdCluster

CLIENT_PORT = 7000
LINK_PORT = 7100
UP_TIMEOUT_S = 90.0


def why_no_lab() -> str | None:
    """Why a lab cannot be made here (None: it can)."""
    if ETCD is None:
        return "no etcd binary (Debian package etcd-server)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (Debian package iproute2)"
    name = f"tcprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True,
                          check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return None


def ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10,
                         check=False)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")


@dataclass
class Host:
    index: int
    name: str  # its cluster.host
    netns: str
    cluster_ip: str
    client_ip: str
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "theychat.yaml"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def door(self) -> str:
        return f"{self.client_ip}:{CLIENT_PORT}"

    @property
    def paths(self) -> StatePaths:
        return StatePaths(self.state)

    def log(self, daemon: str) -> Path:
        return self.paths.log(daemon)

    def events(self, daemon: str) -> list[dict[str, Any]]:
        out = []
        path = self.log(daemon)
        if path.exists():
            for line in path.read_bytes().splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out


class Lab:
    def __init__(self, hosts: int = 3, topics: list[str] | None = None,
                 extra: dict[str, Any] | None = None, heartbeat_ms: int = 50,
                 election_ms: int = 500) -> None:
        self.tag = f"tc{secrets.token_hex(3)}"
        self.root = Path(tempfile.mkdtemp(prefix=f"{self.tag}-", dir="/tmp"))
        self.switch = f"{self.tag}sw"
        self.clients = f"{self.tag}cl"
        self.topics = topics or ["general"]
        self.extra = extra or {}
        self.hosts = [Host(i, f"h{i}", f"{self.tag}h{i}", f"10.77.0.{11 + i}",
                           f"10.78.0.{11 + i}", self.root / f"h{i}") for i in range(hosts)]
        self.etcd = EtcdCluster(hosts, ips=[h.cluster_ip for h in self.hosts],
                                netns=[h.netns for h in self.hosts],
                                heartbeat_ms=heartbeat_ms, election_ms=election_ms,
                                root=self.root / "etcd")
        self.key_file = self.root / "cluster.key"
        self._namespaces: list[str] = []

    @property
    def doors(self) -> str:
        return ",".join(h.door for h in self.hosts)

    @property
    def cfg(self) -> config.Config:
        """The config of the first host (the others differ only in their own addresses)."""
        return config.from_mapping(self.host_config(self.hosts[0]))

    # -- the network ----------------------------------------------------------------------

    def _netns(self, name: str) -> None:
        ip("netns", "add", name)
        self._namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def _wire(self, ns: str, port: str, bridge: str, address: str) -> None:
        """A veth pair: `port` on the switch's `bridge`, u0/c0 in `ns` at `address`."""
        inside = "c0" if bridge == "brc" else "u0"
        ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", inside,
           "netns", ns)
        ip("-n", self.switch, "link", "set", port, "master", bridge, "up")
        ip("-n", ns, "addr", "add", f"{address}/24", "dev", inside)
        ip("-n", ns, "link", "set", inside, "up")

    def make_network(self) -> None:
        self._netns(self.switch)
        for bridge in ("brc", "bru"):
            ip("-n", self.switch, "link", "add", bridge, "type", "bridge")
            ip("-n", self.switch, "link", "set", bridge, "up")
        for h in self.hosts:
            self._netns(h.netns)
            self._wire(h.netns, f"pc{h.index}", "brc", h.cluster_ip)
            self._wire(h.netns, f"pu{h.index}", "bru", h.client_ip)
        self._netns(self.clients)
        self._wire(self.clients, "pucl", "bru", "10.78.0.100")

    def partition(self, h: Host) -> None:
        """Cut host `h` off from the other hosts (its clients still reach it)."""
        ip("-n", self.switch, "link", "set", f"pc{h.index}", "down")

    def heal(self, h: Host) -> None:
        ip("-n", self.switch, "link", "set", f"pc{h.index}", "up")

    # -- the hosts --------------------------------------------------------------------------

    def host_config(self, h: Host) -> dict[str, Any]:
        endpoints = [m.client_url for m in self.etcd.members]
        mine = endpoints.pop(h.index)
        cfg: dict[str, Any] = {
            "state_dir": str(h.state),
            "listen": {"host": h.client_ip, "port": CLIENT_PORT},
            "topics": {"names": self.topics},
            "cluster": {"name": "lab", "host": h.name, "etcd": [mine, *endpoints],
                        "advertise": h.cluster_ip, "port": LINK_PORT,
                        "key_file": str(self.key_file),
                        "front_doors": [x.door for x in self.hosts]},
        }
        for key, value in self.extra.items():
            if isinstance(value, dict):
                cfg[key] = {**cfg.get(key, {}), **value}
            else:
                cfg[key] = value
        return cfg

    def cli(self, h: Host, *args: str, timeout: float = UP_TIMEOUT_S
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", h.netns, sys.executable, "-m",
                               "theychat.daemons", *args, "--config", str(h.config)],
                              capture_output=True, text=True, timeout=timeout, check=False)

    def up(self, h: Host) -> None:
        res = self.cli(h, "up")
        if res.returncode != 0:
            raise RuntimeError(f"theychat up on {h.name}: {res.stderr.strip()[-3000:]}")

    def start(self) -> None:
        try:
            self.make_network()
            make_key(str(self.key_file))
            self.etcd.start()
            for h in self.hosts:
                h.root.mkdir(parents=True, exist_ok=True)
                h.config.write_text(json.dumps(self.host_config(h), indent=2) + "\n")
            for h in self.hosts:
                self.up(h)
        except BaseException:
            self.stop()
            raise

    def cluster_view(self, via: Host | None = None) -> dict[str, Any]:
        """`theychat status --cluster --json`, asked on `via` (default: the first host
        whose etcd answers)."""
        for h in [via] if via else self.hosts:
            res = self.cli(h, "status", "--cluster", "--json", timeout=30)
            if res.stdout.strip():
                view: dict[str, Any] = json.loads(res.stdout)
                return view
        raise RuntimeError(f"no host answers for the cluster: {res.stderr.strip()}")

    def sequencer(self, topic: str) -> Host | None:
        for t in self.cluster_view()["topics"]:
            if t["topic"] == topic and t["sequencer"]:
                return next(h for h in self.hosts if h.name == t["sequencer"])
        return None

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def pid_record(self, target: str) -> procs.PidRecord | None:
        """The pid file of `HOST/DAEMON`."""
        host, _, name = target.partition("/")
        return procs.read_pidfile(self.host(host).paths.pidfile(name))

    def status(self) -> list[dict[str, Any]]:
        """`theychat status` of every host, one row per daemon named HOST/NAME."""
        rows = []
        for h in self.hosts:
            for row in status.gather(config.load(str(h.config)), h.paths):
                rows.append({**row, "name": f"{h.name}/{row['name']}", "host": h.name})
        return rows

    def copy_logs(self, dest: Path) -> None:
        """Every host's daemon logs, to dest/HOST/."""
        for h in self.hosts:
            (dest / h.name).mkdir(parents=True, exist_ok=True)
            for path in h.paths.logs.glob("*"):
                shutil.copy(path, dest / h.name / path.name)

    def down(self) -> list[int]:
        """`theychat down` on every host, then what is left of TheyChat (etcd aside):
        those pids, killed."""
        for h in self.hosts:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                self.cli(h, "down", timeout=60)
        etcd = {m.proc.pid for m in self.etcd.members if m.proc is not None}
        left = [pid for h in self.hosts for pid in self.pids(h) if pid not in etcd]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        return left

    def pids(self, h: Host) -> list[int]:
        res = subprocess.run(["ip", "netns", "pids", h.netns], capture_output=True, text=True,
                             timeout=10, check=False)
        return [int(p) for p in res.stdout.split() if p.isdigit()]

    def kill_host(self, h: Host) -> int:
        """Every process of the host at once (etcd member included); how many."""
        killed = 0
        deadline = time.monotonic() + 10
        while (pids := self.pids(h)) and time.monotonic() < deadline:
            for pid in pids:  # one sweep, then again for anything forked meanwhile
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
            time.sleep(0.02)
        m = self.etcd.members[h.index]
        if m.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                m.proc.wait(timeout=5)
        return killed

    def restart_host(self, h: Host) -> None:
        """Back after a kill: its etcd member rejoins with its data, then its tree."""
        m = self.etcd.members[h.index]
        self.etcd.start_member(m, new=False)
        self.etcd.wait_healthy([m], timeout=30)
        self.up(h)

    def stop(self) -> None:
        for h in self.hosts:
            with contextlib.suppress(Exception):
                self.kill_host(h)
        with contextlib.suppress(Exception):
            self.etcd.stop()
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self._namespaces.clear()
        if not os.environ.get("THEYCHAT_KEEP"):
            shutil.rmtree(self.root, ignore_errors=True)
