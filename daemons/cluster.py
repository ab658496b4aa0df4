"""A host in a cluster (cluster mode, DESIGN.md section 10): its lease in etcd, what the
other hosts can tell of it, and how it finds out that one of them is gone.

The router of each host runs a `HostAgent`:

- **The host's lease.** Every key that must go when the host goes (its `hosts/HOST`
  record, the topics it sequences) is bound to one lease, kept alive every
  `lease_ttl_s / 4` (at most 1 s). A router that restarts takes the same lease back (it is in the
  record), so a local restart changes nothing for the cluster: no re-election.
- **Heartbeats between hosts**: signed UDP beats (the cluster key) to every other host's
  `advertise:port`, every `heartbeat.interval_ms`, from both roots of the host's tree:
  the router and the router-monitor (`HOST_BEATERS`; the router keeps the other hosts'
  addresses in a file for its monitor). A host is alive while either beats: a router
  killed or hung is restarted by its monitor in well under a second, which must not
  count as the loss of the host. A host whose roots both fall silent for
  `heartbeat.timeout_ms` is suspected: we write `suspect/HOST/US` (with our lease). When
  more than half of the other hosts suspect it, one of them revokes its lease: its keys
  go, a survivor becomes the sequencer of each of its topics. etcd is the authority: a
  host whose lease is gone may not write, and a suspicion that cannot be written (we
  are the one cut off) changes nothing.
- **Lost the cluster**: when the lease cannot be kept alive for `lost_after_s`, the
  host tells its daemons (`on_lost`): they close their clients, who move to another
  host and resume there. When etcd answers again, it takes a new lease if it lost its
  own and says so (`on_back`).

Keys live under /theychat/CLUSTER/ (`Keys`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from theychat.daemons import etcd, heartbeat, ops
from theychat.daemons.config import Cluster, Heartbeat
from theychat.daemons.control import Message
from theychat.daemons.errors import TheyChatError
from theychat.daemons.etcd import Etcd, EtcdError, EtcdUnavailable
from theychat.daemons.heartbeat import Beat, HeartbeatListener, HeartbeatSender, PeerWatch

KEY_BYTES = heartbeat.KEY_BYTES
HOST_BEATERS = ("router", "router-monitor")  # a host lives while one of them beats
LOST_NOTICE = ("this host lost the cluster; reconnect to another host "
               "(theychat chat does it by itself)")  # to each client a host lets go


def beat_name(host: str, daemon: str) -> str:
    """What a host's beats from one of its roots are filed under (`h1/router`)."""
    return f"{host}/{daemon}"


def host_beats(host: str, daemon: str, pid: int, incarnation: int, key: bytes,
               interval_ms: int, targets: Callable[[], list[tuple[str, int]]]
               ) -> HeartbeatSender:
    """The beats one root sends for its host. Its incarnation (from its pid file) tells
    a restarted root's beats from replays of its predecessor's."""
    template = Beat("host", None, beat_name(host, daemon), pid, incarnation, 0, 0)
    return HeartbeatSender(template, key, interval_ms, targets)


class PeersFile:
    """The other hosts' beat addresses, written by the router, read by its monitor (a
    stat per beat; read again only when the file changed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int] | None = None
        self._targets: list[tuple[str, int]] = []

    def write(self, targets: list[tuple[str, int]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump([[h, p] for h, p in targets], f)
        os.replace(tmp, self.path)

    def read(self) -> list[tuple[str, int]]:
        try:
            st = self.path.stat()
            if (st.st_mtime_ns, st.st_ino) != self._seen:
                rows = json.loads(self.path.read_text())
                self._targets = [(str(h), int(p)) for h, p in rows]
                self._seen = (st.st_mtime_ns, st.st_ino)
        except (OSError, ValueError, TypeError):
            pass  # not there yet, or being replaced: the last list, until the next beat
        return self._targets


class Keys:
    """Where a cluster's facts are in etcd."""

    def __init__(self, name: str) -> None:
        self.root = f"/theychat/{name}/"
        self.dir = self.root + "dir/"  # the directory store of every router
        self.hosts = self.root + "hosts/"  # hosts/HOST: the host's record, leased
        self.suspect = self.root + "suspect/"  # suspect/HOST/BY: BY hears nothing of HOST

    def topic(self, topic: str) -> str:
        """A topic's log and sequencer (clusterlog.py)."""
        return f"{self.root}topics/{topic}/"

    def room(self, topic: str) -> str:
        """A topic's directory store: members of every host, operators, bans."""
        return f"{self.root}topics/{topic}/room/"

    def mail(self, host: str, daemon: str) -> str:
        """Requests for one daemon of one host (a direct message, a kick, a take-over)."""
        return f"{self.root}mail/{host}/{daemon}/"


def load_key(path: str) -> bytes:
    """The cluster key: private to its owner (0600), KEY_BYTES long."""
    try:
        return heartbeat.read_key(Path(path), "the cluster key")
    except FileNotFoundError:
        raise TheyChatError(f"cluster.key_file: {path}: no such file (make one with "
                            "`theychat cluster-key FILE` and copy it to every host)") from None
    except TheyChatError as e:
        raise TheyChatError(f"cluster.key_file: {e}") from None


def make_key(path: str) -> None:
    """A new cluster key in a new file (refuses to replace one)."""
    heartbeat.create_key(Path(path), "the cluster key")


class HostAgent:
    def __init__(self, cfg: Cluster, hb: Heartbeat, client: Etcd, key: bytes, client_addr: str,
                 log: Any, on_lost: Callable[[], Awaitable[None]],
                 on_back: Callable[[], Awaitable[None]],
                 on_gone: Callable[[str], Awaitable[None]] | None = None,
                 peers_file: Path | None = None, pid: int = 1, incarnation: int = 1) -> None:
        self.cfg = cfg
        self.hb = hb
        self.etcd = client
        self.keys = Keys(cfg.name)
        self.key = key
        self.client_addr = client_addr  # where people connect to this host
        self.log = log
        self.on_lost, self.on_back, self.on_gone = on_lost, on_back, on_gone
        self.peers_file = PeersFile(peers_file) if peers_file else None
        self.pid, self.incarnation = pid, incarnation
        self.lease = 0
        self.took_new_lease = False  # at start: the predecessor's lease was gone
        self.old_lease = 0  # the predecessor's lease (0: its record was gone too)
        self.lost = False
        self.peers: dict[str, dict[str, Any]] = {}  # host -> its record
        self.watches: dict[str, PeerWatch] = {}  # the listener's: HOST/ROOT -> its beats
        self.suspects: dict[str, dict[str, int]] = {}  # host -> who suspects which lease
        self.revoked: set[int] = set()
        self._last_ok = time.monotonic()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.listener: HeartbeatListener | None = None
        self.sender: HeartbeatSender | None = None

    @property
    def me(self) -> str:
        return self.cfg.host

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def record(self) -> dict[str, Any]:
        return {"advertise": self.cfg.advertise, "port": self.cfg.port,
                "client": self.client_addr, "lease": self.lease}

    async def start(self) -> None:
        self.took_new_lease = await self._take_lease()
        self.listener = HeartbeatListener(self.key, self.watches)
        await self.listener.start(self.cfg.advertise, self.cfg.port)
        self.sender = host_beats(self.me, HOST_BEATERS[0], self.pid, self.incarnation,
                                 self.key, self.hb.interval_ms, self._targets)
        self.sender.start()
        self._spawn(self._keep_lease())
        self._spawn(self._follow_hosts())
        self._spawn(self._follow_suspects())
        self._spawn(self._judge())

    async def leave(self) -> None:
        """The host stops on purpose (`theychat down`): its lease goes now, with its
        record and its sequencer keys, so the others move its topics at once instead
        of taking its silence for a death."""
        try:
            await self.etcd.revoke(self.lease)
            self.log.info("host_left", lease=self.lease)
        except EtcdError as e:
            self.log.warning("host_leave_failed", lease=self.lease, error=str(e))

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.sender:
            self.sender.stop()
        if self.listener:
            self.listener.close()

    # -- the lease -----------------------------------------------------------------------

    async def _take_lease(self) -> bool:
        """Our lease from the record of our previous router, if it lives, else a new one;
        then our record, bound to it. Whether the lease is new."""
        kvs, _ = await self.etcd.range(self.keys.hosts + self.me)
        old = int(json.loads(kvs[0].value).get("lease", 0)) if kvs else 0
        new = not (old and await self.etcd.time_to_live(old) > 0)
        self.old_lease = old
        if new:
            self.lease = await self.etcd.grant(self.cfg.lease_ttl_s)
            self.log.info("host_lease_granted", lease=self.lease, ttl_s=self.cfg.lease_ttl_s)
        else:
            self.lease = old
        await self.etcd.put(self.keys.hosts + self.me, json.dumps(self.record()).encode(),
                            self.lease)
        return new

    async def _keep_lease(self) -> None:
        # Often enough for the lease, and to notice being cut off within a second of
        # cluster.lost_after_s.
        every = min(self.cfg.lease_ttl_s / 4, 1.0)
        while True:
            await asyncio.sleep(every)
            try:
                # An attempt may take seconds (each endpoint's timeout): it must not
                # carry us past the bound unnoticed.
                left = self.cfg.lost_after_s - (time.monotonic() - self._last_ok)
                try:
                    ttl = await asyncio.wait_for(self.etcd.keepalive(self.lease),
                                                 max(left, 0.2) if not self.lost else None)
                except TimeoutError:
                    raise EtcdUnavailable("no etcd endpoint answered in time") from None
                if ttl <= 0:  # revoked (we were thought dead) or expired: start again
                    self.log.warning("host_lease_lost", lease=self.lease)
                    # The others have detached our people and removed them from their
                    # topics: they must come back (resume) to be ours again.
                    if not self.lost:
                        await self.on_lost()
                    await self._take_lease()
                    if not self.lost:
                        await self.on_back()
                self._last_ok = time.monotonic()
                if self.lost:
                    self.lost = False
                    self.log.info("cluster_regained", lease=self.lease)
                    await self.on_back()
            except EtcdError as e:
                away = time.monotonic() - self._last_ok
                if away >= self.cfg.lost_after_s and not self.lost:
                    self.lost = True
                    self.log.error("cluster_lost", away_s=round(away, 1), error=str(e))
                    await self.on_lost()

    # -- the other hosts -------------------------------------------------------------------

    def _targets(self) -> list[tuple[str, int]]:
        return [(str(r["advertise"]), int(r["port"])) for h, r in self.peers.items()
                if h != self.me]

    async def _follow_hosts(self) -> None:
        while True:
            try:
                kvs, rev = await self.etcd.range(self.keys.hosts, prefix=True)
                for kv in kvs:
                    self._host(kv.key[len(self.keys.hosts):], kv.value)
                async for batch in self.etcd.watch(self.keys.hosts, prefix=True,
                                                   start_revision=rev + 1):
                    for ev in batch:
                        name = ev.kv.key[len(self.keys.hosts):]
                        if ev.kind == "put":
                            self._host(name, ev.kv.value)
                        else:
                            self.peers.pop(name, None)
                            for root in HOST_BEATERS:
                                self.watches.pop(beat_name(name, root), None)
                            self._peers_changed()
                            self.log.info("host_gone", host=name)
                            if self.on_gone is not None and name != self.me:
                                self._spawn(self.on_gone(name))
            except EtcdError:
                await asyncio.sleep(0.1)

    def _host(self, name: str, raw: bytes) -> None:
        with contextlib.suppress(ValueError):
            record = json.loads(raw)
            if name not in self.peers and name != self.me:
                self.log.info("host_joined", host=name, advertise=record.get("advertise"))
            self.peers[name] = record
            if name != self.me:
                for root in HOST_BEATERS:
                    key = beat_name(name, root)
                    if key not in self.watches:
                        self.watches[key] = PeerWatch(key, self.hb.timeout_ms,
                                                      heartbeat.monotonic_ms())
            self._peers_changed()

    def _peers_changed(self) -> None:
        if self.peers_file is not None:
            with contextlib.suppress(OSError):
                self.peers_file.write(self._targets())

    async def _judge(self) -> None:
        """Suspect a host that fell silent; take it back when it beats again."""
        mine: set[str] = set()
        while True:
            await asyncio.sleep(self.hb.interval_ms / 1000)
            now = heartbeat.monotonic_ms()
            for name in [h for h in self.peers if h != self.me]:
                watches = [self.watches.get(beat_name(name, root)) for root in HOST_BEATERS]
                silent = all(w is None or w.expired(now) for w in watches)
                try:
                    if silent and name not in mine:
                        of = int(self.peers.get(name, {}).get("lease", 0))
                        await self.etcd.put(self.keys.suspect + f"{name}/{self.me}",
                                            json.dumps({"lease": of}).encode(), self.lease)
                        mine.add(name)
                        self.log.warning("host_suspected", host=name)
                    elif not silent and name in mine:
                        await self.etcd.delete(self.keys.suspect + f"{name}/{self.me}")
                        mine.discard(name)
                except EtcdError:
                    continue  # cut off ourselves: our word cannot count now

    async def _follow_suspects(self) -> None:
        while True:
            try:
                kvs, rev = await self.etcd.range(self.keys.suspect, prefix=True)
                self.suspects.clear()
                for kv in kvs:
                    self._suspicion(kv.key, kv.value)
                await self._revoke_suspected()
                async for batch in self.etcd.watch(self.keys.suspect, prefix=True,
                                                   start_revision=rev + 1):
                    for ev in batch:
                        self._suspicion(ev.kv.key, ev.kv.value if ev.kind == "put" else None)
                    await self._revoke_suspected()
            except EtcdError:
                await asyncio.sleep(0.1)

    def _suspicion(self, key: str, value: bytes | None) -> None:
        """A suspicion is of one lease of the host (the one its record had): one left
        over from before the host came back must not count against its new lease."""
        host, _, by = key[len(self.keys.suspect):].partition("/")
        who = self.suspects.setdefault(host, {})
        if value is None:
            who.pop(by, None)
            return
        try:
            who[by] = int(json.loads(value).get("lease", 0))
        except (ValueError, AttributeError, TypeError):
            who[by] = 0

    async def _revoke_suspected(self) -> None:
        """A host more than half of the others hear nothing of is gone: revoke its lease
        (whoever of us gets there first; the others find it done)."""
        # Counted over the cluster's size (one etcd member per host), not over the
        # hosts alive now: with one host down, one other's word alone must not do.
        others = max(len([h for h in self.peers if h]), len(self.cfg.etcd)) - 1
        others = max(others, 1)
        for host, suspicions in self.suspects.items():
            record = self.peers.get(host)
            if host == self.me or record is None:
                continue
            lease = int(record.get("lease", 0))
            who = {by for by, of in suspicions.items() if of == lease}
            if len(who) * 2 <= others:
                continue
            if lease and lease not in self.revoked:
                self.revoked.add(lease)
                self.log.warning("host_declared_dead", host=host, suspected_by=sorted(who))
                with contextlib.suppress(EtcdError):
                    await self.etcd.revoke(lease)


class HostLease:
    """What a daemon other than the router needs of its host: the lease now (it changes
    when the router takes a new one), from the host's record in etcd."""

    def __init__(self, client: Etcd, keys: Keys, host: str) -> None:
        self.etcd, self.key = client, keys.hosts + host
        self.lease = 0
        self.changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __call__(self) -> int:
        return self.lease

    async def start(self) -> None:
        kvs, rev = await self.etcd.range(self.key)
        self._set(kvs[0] if kvs else None)
        self._task = asyncio.ensure_future(self._follow(rev + 1))

    def _set(self, kv: etcd.Kv | None) -> None:
        lease = 0
        if kv is not None:
            with contextlib.suppress(ValueError):
                lease = int(json.loads(kv.value).get("lease", 0))
        if lease != self.lease:
            self.lease = lease
            self.changed.set()

    async def _follow(self, start: int) -> None:
        async for batch in self.etcd.watch(self.key, start_revision=start):
            for ev in batch:
                self._set(ev.kv if ev.kind == "put" else None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class Mailbox:
    """Requests for one daemon from daemons on other hosts, through etcd: a sender writes
    a typed op under the daemon's key (leased by the sender's host: a request of a host
    that died goes with it), the daemon answers it from its own table, and deletes it."""

    def __init__(self, client: Etcd, keys: Keys, host: str, daemon: str,
                 answer: Callable[[Message, list[int]], Awaitable[Message]], log: Any) -> None:
        self.etcd, self.keys, self.log = client, keys, log
        self.prefix = keys.mail(host, daemon)
        self.answer = answer
        self._task: asyncio.Task[None] | None = None
        self._n = 0

    async def start(self) -> None:
        kvs, rev = await self.etcd.range(self.prefix, prefix=True)
        for kv in kvs:
            await self._handle(kv)
        self._task = asyncio.ensure_future(self._follow(rev + 1))

    async def _follow(self, start: int) -> None:
        async for batch in self.etcd.watch(self.prefix, prefix=True, start_revision=start):
            for ev in batch:
                if ev.kind == "put":
                    await self._handle(ev.kv)

    async def _handle(self, kv: etcd.Kv) -> None:
        try:
            msg = json.loads(kv.value)
            if isinstance(msg, dict):
                await self.answer(msg, [])
        except Exception as e:  # a bad request from afar is refused, never fatal
            self.log.warning("mail_refused", key=kv.key, error=str(e))
        with contextlib.suppress(EtcdError):
            await self.etcd.delete(kv.key)

    async def post(self, host: str, daemon: str, op: ops.Op, lease: int) -> None:
        """Send `op` to `daemon` of `host`; done once etcd holds it."""
        self._n += 1
        key = self.keys.mail(host, daemon) + f"{time.time_ns()}.{self._n}"
        await self.etcd.put(key, json.dumps(op.message()).encode(), lease)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
