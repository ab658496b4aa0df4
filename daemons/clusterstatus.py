"""What `theychat status --cluster` shows, read from etcd (cluster mode): every host the
cluster knows (alive while its lease is), who suspects whom, and for every topic its
sequencer and its followers (the hosts running a server of it)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from theychat.daemons.cluster import Keys
from theychat.daemons.config import Config
from theychat.daemons.directory import TOPIC
from theychat.daemons.errors import TheyChatError
from theychat.daemons.etcd import Etcd, EtcdError


def _json(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def gather(cfg: Config, timeout_s: float = 5.0) -> dict[str, Any]:
    """{"cluster", "hosts": [...], "topics": [...]}; TheyChatError if etcd does not answer."""
    assert cfg.cluster is not None
    keys = Keys(cfg.cluster.name)
    client = Etcd(cfg.cluster.etcd, timeout_s=timeout_s)
    try:
        hosts, _ = await client.range(keys.hosts, prefix=True)
        suspects, _ = await client.range(keys.suspect, prefix=True)
        created, _ = await client.range(keys.dir + TOPIC, prefix=True)
        names = list(cfg.topics.names) + sorted(
            kv.key[len(keys.dir + TOPIC):] for kv in created
            if kv.key[len(keys.dir + TOPIC):] not in cfg.topics.names)
        topics = []
        for name in names:
            prefix = keys.topic(name)
            owner, _ = await client.range(prefix + "seq/owner")
            head, _ = await client.range(prefix + "seq/head")
            followers, _ = await client.range(prefix + "followers/", prefix=True)
            topics.append({
                "topic": name,
                "sequencer": _json(owner[0].value).get("host") if owner else None,
                "followers": sorted(kv.key[len(prefix + "followers/"):] for kv in followers),
                "last_seq": _json(head[0].value).get("seq", 0) if head else 0,
            })
    except EtcdError as e:
        raise TheyChatError(f"etcd ({', '.join(cfg.cluster.etcd)}) does not answer: {e}"
                            ) from None
    finally:
        await client.close()
    suspected: dict[str, list[str]] = {}
    for kv in suspects:
        host, _, by = kv.key[len(keys.suspect):].partition("/")
        suspected.setdefault(host, []).append(by)
    return {
        "cluster": cfg.cluster.name,
        "hosts": [{"host": kv.key[len(keys.hosts):], "client": _json(kv.value).get("client"),
                   "advertise": _json(kv.value).get("advertise"),
                   "suspected_by": sorted(suspected.get(kv.key[len(keys.hosts):], []))}
                  for kv in hosts],
        "topics": topics,
    }


def show(view: dict[str, Any]) -> list[str]:
    lines = [f"cluster {view['cluster']}: {len(view['hosts'])} host(s) alive"]
    lines.append(f"{'HOST':<16}{'CLIENTS':<24}{'SUSPECTED BY'}")
    for h in view["hosts"]:
        lines.append(f"{h['host']:<16}{h['client'] or '-':<24}"
                     f"{', '.join(h['suspected_by']) or '-'}")
    lines.append(f"{'TOPIC':<16}{'SEQUENCER':<12}{'LAST SEQ':>9}  FOLLOWERS")
    for t in view["topics"]:
        lines.append(f"{t['topic']:<16}{t['sequencer'] or '(none)':<12}{t['last_seq']:>9}  "
                     f"{', '.join(t['followers']) or '-'}")
    return lines


def run(cfg: Config) -> dict[str, Any]:
    return asyncio.run(gather(cfg))
