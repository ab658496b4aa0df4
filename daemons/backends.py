"""Where a daemon's state lives: the seams (store.py, topiclog.py) made concrete.

On one host (no `cluster` in the config) the router's directory and a topic's room and
log are in the daemon's write-ahead log (`local.py`). In cluster mode they are in etcd:
the directory under /theychat/CLUSTER/dir/, a topic's room and log under
/theychat/CLUSTER/topics/TOPIC/ (`etcdstore.py`, `clusterlog.py`). The daemons' logic is
the same either way; this module is the only place that knows which.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from theychat.daemons.cluster import HostLease, Keys, load_key
from theychat.daemons.clusterlog import ClusterTopicLog
from theychat.daemons.config import Config
from theychat.daemons.etcd import Etcd, EtcdError
from theychat.daemons.etcdstore import EtcdStore
from theychat.daemons.local import LocalLog
from theychat.daemons.paths import StatePaths
from theychat.daemons.store import DirectoryStore
from theychat.daemons.topiclog import TopicLog


class RouterState:
    """The router's directory store, open."""

    def __init__(self, cfg: Config, paths: StatePaths, name: str, log: Any,
                 fail: Any) -> None:
        self.cluster = cfg.cluster
        self.local: LocalLog | None = None
        self.etcd: Etcd | None = None
        self.keys: Keys | None = None
        self.store: DirectoryStore
        if self.cluster is None:
            self.local = LocalLog(paths.wal(name), cfg.wal, log, fail)
            self.store = self.local.store
        else:
            self.etcd = Etcd(self.cluster.etcd)
            self.keys = Keys(self.cluster.name)
            self.store = EtcdStore(self.etcd, self.keys.dir, log)

    async def start(self) -> None:
        if self.local is not None:
            self.local.store.start()
        else:
            assert isinstance(self.store, EtcdStore)
            await self.store.start()

    async def close(self) -> None:
        if self.local is not None:
            await self.local.close()
        else:
            assert isinstance(self.store, EtcdStore) and self.etcd is not None
            await self.store.close()
            await self.etcd.close()


class TopicState:
    """A topic server's room store and topic log, open."""

    def __init__(self, cfg: Config, paths: StatePaths, name: str, topic: str, log: Any,
                 fail: Any) -> None:
        self.cluster = cfg.cluster
        self.local: LocalLog | None = None
        self.etcd: Etcd | None = None
        self.lease: HostLease | None = None
        self.store: DirectoryStore
        self.log: TopicLog
        self.host = ""
        if self.cluster is None:
            self.local = LocalLog(paths.wal(name), cfg.wal, log, fail, keep=cfg.history.size)
            assert self.local.topic is not None
            self.store, self.log = self.local.store, self.local.topic
        else:
            c = self.cluster
            self.host = c.host
            self.etcd = Etcd(c.etcd)
            keys = Keys(c.name)
            self.keys = keys
            self.lease = HostLease(self.etcd, keys, c.host)
            self.store = EtcdStore(self.etcd, keys.room(topic), log)
            self.log = ClusterTopicLog(topic, self.etcd, keys.topic(topic), c.host,
                                       f"{c.advertise}:{c.port}", cfg.history.size,
                                       load_key(c.key_file), self.lease, log,
                                       stale_after_s=c.lost_after_s)
            self._follower_key = keys.topic(topic) + "followers/" + c.host
        self._register: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.cluster is not None:
            assert self.lease is not None and isinstance(self.store, EtcdStore)
            assert isinstance(self.log, ClusterTopicLog)
            await self.lease.start()
            await self.store.start()
            await self.log.start()
            self._register = asyncio.ensure_future(self._follower())

    async def _follower(self) -> None:
        """Our host runs a server of this topic, for as long as its lease lives (what
        `theychat status --cluster` lists as the topic's followers)."""
        assert self.lease is not None and self.etcd is not None
        while True:
            self.lease.changed.clear()
            lease = self.lease()
            if lease:
                try:
                    await self.etcd.put(self._follower_key, b"{}", lease)
                except EtcdError:
                    await asyncio.sleep(1.0)
                    continue
            await self.lease.changed.wait()

    async def serve_link(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        assert isinstance(self.log, ClusterTopicLog)
        await self.log.serve_link(reader, writer)

    async def writable(self) -> None:
        """A write that proves the log takes writes again (after a full disk)."""
        await self.store.put("health/writable", {})

    async def close(self) -> None:
        if self.local is not None:
            await self.local.close()
        else:
            assert isinstance(self.log, ClusterTopicLog) and self.lease is not None
            assert isinstance(self.store, EtcdStore) and self.etcd is not None
            if self._register is not None:
                self._register.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._register
            await self.log.close()
            await self.store.close()
            await self.lease.close()
            await self.etcd.close()
