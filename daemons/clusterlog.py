"""The topic log seam on etcd (cluster mode): one sequencer per topic, a follower on
every host (DESIGN.md section 10).

Every host's server of a topic follows its log: it watches the committed blocks, checks
that each one starts where the last ended (reading what it missed on a gap), keeps the
last `history.size` entries, and tells its own fan-out. One of them is the topic's
**sequencer**: it won the key `seq/owner`, which is bound to its host's lease, so it
goes with the host. The sequencer numbers the lines every host sends it and commits
them in blocks, one etcd transaction per block, which succeeds only while the owner key
is still the one it created and `seq/head` is where it left it: two sequencers can never
both commit (the fence), and a commit that etcd did not make is never acknowledged.

    P = /theychat/CLUSTER/topics/TOPIC/
    P seq/owner       {"host", "link"}   leased by the owner host's lease
    P seq/head        {"seq"}            the last committed sequence number
    P log/FIRST       zlib({"e": [[seq, ts, nick, text, action, sid, line, tag], ...]})

A block is compressed (zlib, fast level) and its tag is null where it is the default,
SID:LINE: every block crosses etcd's raft, its WAL and a watch stream to every host, in
base64 over JSON, so its size is what one commit costs (a block of 250 lines of chat:
21 KiB as JSON, under 4 KiB compressed, for 70 us of CPU). Blocks written as plain JSON
still read.

Lines from other hosts come over a link (`links.py`). Each one carries a tag unique to
it (its session and the client's line number, or one its server made), so a line that
is sent again after a failover, because its answer was lost, is committed at most once:
the sequencer knows the tags of the entries it keeps, and a follower that sees its own
tags committed takes that as the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import json
import os
import secrets
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from theychat.daemons import etcd, links
from theychat.daemons.etcd import Etcd, EtcdError, EtcdUnavailable
from theychat.daemons.links import Link, LinkError
from theychat.daemons.topiclog import Draft, OnCommit, Posted, Tail, Withdrawn

BATCH_MAX = 512  # lines in one block
RETRY_S = 0.05  # after etcd did not answer, or a link broke
BLOCK_KEY = "log/{:020d}"
BATCH_BYTES = 256 * 1024  # text in one block: etcd refuses requests over 1.5 MiB
BLOCK_MAX_BYTES = 16 * 1024 * 1024  # a block inflated: far above any we write
Dial = Callable[[str, bytes, str, str], Awaitable[Link]]


def _default_tag(sid: str | None, line: int | None) -> str | None:
    return f"{sid}:{line}" if sid is not None and line is not None else None


def _block(entries: Sequence[Posted], tags: Sequence[str]) -> bytes:
    rows = [[p.seq, p.ts, p.nick, p.text, p.action, p.sid, p.line,
             None if t == _default_tag(p.sid, p.line) else t]
            for p, t in zip(entries, tags, strict=True)]
    return zlib.compress(json.dumps({"e": rows}, separators=(",", ":")).encode(), 1)


def _unblock(raw: bytes) -> list[tuple[Posted, str]]:
    """The rows of a block; none if it is not one (a block is only ever written whole, by
    a fenced transaction, so an unreadable one is not ours to guess at)."""
    try:
        if not raw.startswith(b"{"):
            inflate = zlib.decompressobj()
            raw = inflate.decompress(raw, BLOCK_MAX_BYTES)
            if inflate.unconsumed_tail:
                return []  # larger than any block we write
        out = []
        for r in json.loads(raw)["e"]:
            p = Posted(int(r[0]), float(r[1]), str(r[2]), str(r[3]), bool(r[4]),
                       r[5] if isinstance(r[5], str) else None,
                       r[6] if isinstance(r[6], int) else None)
            tag = r[7] if isinstance(r[7], str) else _default_tag(p.sid, p.line)
            if tag is None:
                return []
            out.append((p, tag))
        return out
    except (ValueError, KeyError, TypeError, IndexError, zlib.error):
        return []


class Pending:
    """Lines waiting for their entries, and who waits: our own server (`local`), or a
    follower on another host, over a link."""

    def __init__(self, drafts: list[Draft], tags: list[str], local: bool = False) -> None:
        self.drafts, self.tags = drafts, tags
        self.local = local
        self.withdrawn = False
        self.future: asyncio.Future[list[Posted]] = asyncio.get_running_loop().create_future()

    def answer(self, entries: list[Posted]) -> None:
        if not self.future.done():
            self.future.set_result(entries)


class ClusterTopicLog:
    def __init__(self, topic: str, client: Etcd, prefix: str, host: str, link_address: str,
                 keep: int, key: bytes, lease: Callable[[], int], log: Any,
                 dial: Dial | None = None, stale_after_s: float | None = None) -> None:
        self.topic = topic
        self.etcd = client
        self.prefix = prefix
        self.host = host
        self.link_address = link_address  # where other hosts reach us (our router)
        self.key = key
        self.lease = lease  # our host's lease, as it is now (0: none)
        self.log = log
        self.tail = Tail(keep)
        # A follower's line older than this (by the time it was typed) reaches us only
        # after its host was cut off long enough to let its clients go and withdraw what
        # they said (cluster.lost_after_s): it is refused, never committed late.
        self.stale_after_s = stale_after_s
        self.tags: dict[str, Posted] = {}  # tag -> entry, for the entries kept
        self._tag_order: deque[str] = deque()
        self._followers: list[OnCommit] = []
        self._dial = dial or links.connect
        self._tag_seq = itertools.count(1)
        self._boot = secrets.token_hex(4)  # tags of this process's lines are its own
        self.owner: dict[str, Any] | None = None  # the owner key's value and revision
        self.sequencing = False
        self._head_seq = 0
        self._head_rev = 0
        self._owner_rev = 0  # create revision of our owner key: the fence
        self._writes = 0
        self._queue: list[Pending] = []  # lines for us to commit (we are the sequencer)
        self._writing: list[Pending] = []  # the batch being committed now
        self._work = asyncio.Event()
        self._sent: dict[int, Pending] = {}  # lines sent to the sequencer, by request id
        self._sent_tags: dict[str, int] = {}  # their tags (some stale: answered meanwhile)
        self._request_ids = itertools.count(1)
        self._link: Link | None = None
        self._link_changed = asyncio.Event()
        self._committed = asyncio.Condition()
        self._answered = 0  # the highest seq an append of ours was answered with
        self._unreleased: list[tuple[int, int, Pending, list[Posted]]] = []  # heap: top seq
        self._unreleased_order = itertools.count()  # ties in the heap, in arrival order
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- the TopicLog seam -------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return self.tail.last_seq

    def after(self, seq: int) -> list[Posted]:
        return self.tail.after(seq)

    def last(self, n: int) -> list[Posted]:
        return self.tail.last(n)

    def last_line(self, sid: str) -> int | None:
        return self.tail.last_line(sid)

    def follow(self, on_commit: OnCommit) -> None:
        self._followers.append(on_commit)

    def append(self, drafts: Sequence[Draft]) -> asyncio.Future[list[Posted]]:
        tags = [f"{d.sid}:{d.line}" if d.line is not None
                else f"{self.host}.{self._boot}.{next(self._tag_seq)}" for d in drafts]
        pending = Pending(list(drafts), tags, local=True)
        pending.future.add_done_callback(self._note_answered)
        if self.sequencing:
            self._queue.append(pending)
            self._work.set()
        else:
            self._send(pending)
        return pending.future

    def withdraw(self, sids: set[str]) -> int:
        def theirs(p: Pending) -> bool:
            return all(d.sid in sids for d in p.drafts)

        gone = [p for p in [*self._queue, *self._sent.values(), *self._writing] if theirs(p)]
        self._queue = [p for p in self._queue if not theirs(p)]
        on_link = any(theirs(p) for p in self._sent.values())
        self._sent = {rid: p for rid, p in self._sent.items() if not theirs(p)}
        if on_link and self._link is not None:
            # Written to the link, perhaps not delivered (we are cut off): reset it, so
            # TCP does not deliver them when the partition heals. A new link carries
            # what is still to be sent.
            self._link.discard()
        for p in gone:  # a batch being written may still commit: its answer is ignored
            p.withdrawn = True
            if not p.future.done():
                p.future.set_exception(Withdrawn("withdrawn: its client was let go"))
        return len(gone)

    def _note_answered(self, future: asyncio.Future[list[Posted]]) -> None:
        if not future.cancelled() and future.exception() is None:
            self._answered = max([self._answered, *(e.seq for e in future.result())])

    async def sync(self) -> None:
        """Every line appended so far is committed, and seen committed here. (An answer
        can come before the entry reaches our tail: the sequencer answers once etcd has
        it, our tail follows etcd's watch.)"""
        waiting = [p.future for p in [*self._queue, *self._sent.values()]]
        if waiting:
            await asyncio.wait(waiting)
        top = self._answered
        async with self._committed:
            await self._committed.wait_for(lambda: self.tail.last_seq >= top)

    # -- start and stop ----------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        """Read the kept end of the log, then follow it and the owner key."""
        rev = await self._load()
        self._spawn(self._follow_log(rev + 1))
        self._spawn(self._follow_owner())
        self._spawn(self._sequence())
        self._spawn(self._keep_link())

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._link is not None:
            self._link.close()

    async def _load(self) -> int:
        head, rev = await self.etcd.range(self.prefix + "seq/head")
        last = int(json.loads(head[0].value).get("seq", 0)) if head else 0
        blocks, _ = await self.etcd.range(self.prefix + "log/", prefix=True, descending=True,
                                          limit=max(1, self.tail.keep), revision=rev)
        rows: list[tuple[Posted, str]] = []
        for kv in blocks:  # newest first, until enough are kept
            rows = _unblock(kv.value) + rows
            if len(rows) >= self.tail.keep:
                break
        rows = [r for r in rows if r[0].seq <= last][-self.tail.keep:] if self.tail.keep else []
        self._commit(rows, tell=False)
        self.tail.next_seq = max(self.tail.next_seq, last + 1)
        self.tail.commit(last)
        return rev

    # -- following the committed log -----------------------------------------------------

    async def _follow_log(self, start: int) -> None:
        async for batch in self.etcd.watch(self.prefix + "log/", prefix=True,
                                           start_revision=start):
            for ev in batch:
                if ev.kind == "put" and not self._have_block(ev.kv.key):
                    await self._block(_unblock(ev.kv.value))

    def _have_block(self, key: str) -> bool:
        """A block our tail holds already (the sequencer's own, committed when etcd said
        so): blocks never overlap and the tail grows by whole blocks, so one that starts
        at or below its last seq is wholly in it, and need not be decoded again."""
        try:
            first = int(key.rsplit("/", 1)[1])
        except (IndexError, ValueError):
            return False
        return first <= self.tail.last_seq

    async def _block(self, rows: list[tuple[Posted, str]]) -> None:
        if not rows:
            return
        expected = self.tail.last_seq + 1
        first = rows[0][0].seq
        if first > expected:  # a gap: read what we missed, then this
            await self._catch_up(expected, first)
            expected = self.tail.last_seq + 1
        rows = [r for r in rows if r[0].seq >= expected]
        if rows and rows[0][0].seq == expected:
            self._commit(rows)

    async def _catch_up(self, start: int, end: int) -> None:
        while True:
            try:
                kvs, _ = await self.etcd.range(self.prefix + "log/", prefix=True)
                break
            except EtcdError:
                await asyncio.sleep(RETRY_S)
        for kv in sorted(kvs, key=lambda k: k.key):
            rows = [r for r in _unblock(kv.value)
                    if start <= r[0].seq < end and r[0].seq == self.tail.last_seq + 1]
            if rows:
                self._commit(rows)

    def _commit(self, rows: list[tuple[Posted, str]], tell: bool = True) -> None:
        entries = [p for p, _ in rows]
        if not entries:
            return
        self.tail.add(entries)
        self.tail.commit(entries[-1].seq)
        for p, tag in rows:
            self.tags[tag] = p
            self._tag_order.append(tag)
        while len(self._tag_order) > max(self.tail.keep, 1) * 2:
            self.tags.pop(self._tag_order.popleft(), None)
        if tell:
            for on_commit in self._followers:
                on_commit(entries)
        self._release_answers()
        if self._sent_tags:
            self._answer_from_log([tag for _, tag in rows])
        self._spawn(self._notify_committed())

    async def _notify_committed(self) -> None:
        async with self._committed:
            self._committed.notify_all()

    def _answer(self, p: Pending, entries: list[Posted]) -> None:
        """Our own lines are answered once our tail has them, so that a client hears
        `sent N` after every message before N (as on one host), not before: the
        sequencer's answer can outrun etcd's watch. A follower's, at once."""
        top = max((e.seq for e in entries), default=0)
        if not p.local or top <= self.tail.last_seq:
            p.answer(entries)
        else:
            heapq.heappush(self._unreleased, (top, next(self._unreleased_order), p, entries))

    def _release_answers(self) -> None:
        last = self.tail.last_seq
        while self._unreleased and self._unreleased[0][0] <= last:
            _, _, p, entries = heapq.heappop(self._unreleased)
            p.answer(entries)

    def _answer_from_log(self, tags: Sequence[str]) -> None:
        """Lines we sent whose tags the log now shows: that is their answer (the
        sequencer's may have been lost with a link)."""
        for tag in tags:
            rid = self._sent_tags.pop(tag, None)
            p = self._sent.get(rid) if rid is not None else None
            if p is not None and all(t in self.tags for t in p.tags):
                self._answer(p, [self.tags[t] for t in p.tags])
                del self._sent[rid]  # type: ignore[arg-type]

    # -- who sequences -------------------------------------------------------------------

    async def _follow_owner(self) -> None:
        key = self.prefix + "seq/owner"
        while True:
            try:
                kvs, rev = await self.etcd.range(key)
                self._owner(kvs[0] if kvs else None)
                if not kvs:
                    await self._campaign()
                async for batch in self.etcd.watch(key, start_revision=rev + 1):
                    for ev in batch:
                        self._owner(ev.kv if ev.kind == "put" else None)
                        if ev.kind == "delete":
                            await self._campaign()
            except EtcdError:
                await asyncio.sleep(RETRY_S)

    def _owner(self, kv: etcd.Kv | None) -> None:
        was = self.owner
        self.owner = None if kv is None else {**json.loads(kv.value),
                                              "create_revision": kv.create_revision,
                                              "lease": kv.lease}
        mine = self.owner is not None and self.owner.get("host") == self.host
        if mine and not self.sequencing:
            assert self.owner is not None
            self._owner_rev = int(self.owner["create_revision"])
            self._head_seq = self._head_rev = 0  # read afresh: another may have moved it
            self.sequencing = True
            self._requeue_sent()
            self.log.info("sequencer_started", topic=self.topic, owner_revision=self._owner_rev)
            self._work.set()
        elif not mine and self.sequencing:
            self.sequencing = False
            self.log.warning("sequencer_stopped", topic=self.topic,
                             owner=self.owner.get("host") if self.owner else None)
            self._forward_queue()
        if (was or {}).get("link") != (self.owner or {}).get("link"):
            self._link_changed.set()

    async def _campaign(self) -> None:
        """No sequencer: try to become it, with our host's lease."""
        lease = self.lease()
        if not lease:
            return  # our host has no lease now (cut off): let the others take it
        key = self.prefix + "seq/owner"
        value = json.dumps({"host": self.host, "link": self.link_address}).encode()
        with contextlib.suppress(EtcdError):
            result = await self.etcd.txn([etcd.created(key, 0)], [etcd.put(key, value, lease)])
            if result.succeeded:
                self.log.info("sequencer_elected", topic=self.topic, revision=result.revision)

    # -- sequencing (we own the topic) ---------------------------------------------------

    async def _sequence(self) -> None:
        while True:
            await self._work.wait()
            self._work.clear()
            while self.sequencing and self._queue:
                await self._commit_batch()

    async def _read_head(self) -> None:
        kvs, _ = await self.etcd.range(self.prefix + "seq/head")
        self._head_seq = int(json.loads(kvs[0].value).get("seq", 0)) if kvs else 0
        self._head_rev = kvs[0].mod_revision if kvs else 0

    async def _commit_batch(self) -> None:
        batch, lines, size = [], 0, 0
        while self._queue and lines < BATCH_MAX and size < BATCH_BYTES:
            batch.append(self._queue.pop(0))
            lines += len(batch[-1].drafts)
            size += sum(len(d.text) + len(d.nick) for d in batch[-1].drafts)
        self._writing = batch
        try:
            if self._head_rev == 0 and self._head_seq == 0:
                await self._read_head()
            if self.tail.last_seq < self._head_seq:
                # Know every committed tag first: a line resent to us may be in a block
                # an earlier sequencer wrote that our watch has not brought yet.
                await self._catch_up(self.tail.last_seq + 1, self._head_seq + 1)
            batch = [p for p in batch if not p.withdrawn]  # meanwhile
            fresh: dict[str, Draft] = {}  # tag -> line, in order
            taken: dict[str, Posted] = {}
            for p in batch:
                for d, tag in zip(p.drafts, p.tags, strict=True):
                    old = self.tags.get(tag) or self.tail.taken(d)
                    if old is not None:
                        taken[tag] = old
                    elif tag not in fresh:
                        fresh[tag] = d
            entries = [Posted(self._head_seq + 1 + i, round(d.ts, 3), d.nick, d.text,
                              d.action, d.sid, d.line) for i, d in enumerate(fresh.values())]
            if entries:
                ok = await self._write(entries, list(fresh))
                if not ok:
                    self._give_back(batch)  # the head moved, or we are not the owner
                    return
            made = {**taken, **dict(zip(fresh, entries, strict=True))}
            for p in batch:
                self._answer(p, [made[t] for t in p.tags])
        except EtcdError as e:
            self._give_back(batch)
            self.log.warning("sequencer_write_failed", topic=self.topic, error=str(e))
            await asyncio.sleep(RETRY_S)
        finally:
            self._writing = []

    def _give_back(self, batch: list[Pending]) -> None:
        """A batch not committed goes back first in line; to the new sequencer if we
        stopped being it while it was being written (the queue went there already)."""
        self._queue[:0] = [p for p in batch if not p.withdrawn]
        if not self.sequencing:
            self._forward_queue()

    async def _write(self, entries: list[Posted], tags: list[str]) -> bool:
        """One fenced transaction: the block and the new head; False if fenced off."""
        head = self.prefix + "seq/head"
        result = await self.etcd.txn(
            [etcd.created(self.prefix + "seq/owner", self._owner_rev),
             etcd.modified(head, self._head_rev)],
            [etcd.put(self.prefix + BLOCK_KEY.format(entries[0].seq), _block(entries, tags)),
             etcd.put(head, json.dumps({"seq": entries[-1].seq}).encode()),
             *self._trim(entries[-1].seq)])
        if result.succeeded:
            self._head_seq, self._head_rev = entries[-1].seq, result.revision
            if entries[0].seq == self.tail.last_seq + 1:
                # Committed: our tail takes it now rather than when etcd's watch brings
                # it back (which it then skips), so our own members hear it sooner.
                self._commit(list(zip(entries, tags, strict=True)))
            else:
                for e, t in zip(entries, tags, strict=True):
                    self.tags[t] = e
            return True
        await self._read_head()  # an earlier incarnation wrote, or another owner
        return False

    def _trim(self, last: int) -> list[dict[str, Any]]:
        """Blocks wholly older than what a topic keeps go (with a margin)."""
        keep = max(self.tail.keep, 1) * 2
        self._writes += 1
        if last <= keep or self._writes % 64:  # now and then, not at every block
            return []
        return [{"request_delete_range": {
            "key": etcd._enc(self.prefix + "log/"),
            "range_end": etcd._enc(self.prefix + BLOCK_KEY.format(max(1, last - keep)))}}]

    # -- following (another host sequences) ------------------------------------------------

    def _send(self, pending: Pending) -> None:
        rid = next(self._request_ids)
        self._sent[rid] = pending
        if len(self._sent_tags) > 4 * len(self._sent) + 1024:  # drop the stale ones
            self._sent_tags = {t: r for r, p in self._sent.items() for t in p.tags}
        self._sent_tags.update(dict.fromkeys(pending.tags, rid))
        if self._link is not None:
            self._request(rid, pending)

    def _request(self, rid: int, pending: Pending) -> None:
        assert self._link is not None
        self._link.send_soon("requests", {
            "id": rid, "lines": [[d.sid, d.nick, d.text, d.ts, d.action, d.line, t]
                                 for d, t in zip(pending.drafts, pending.tags, strict=True)]})

    def _requeue_sent(self) -> None:
        """We became the sequencer: what we had sent to the old one is ours to commit."""
        for rid in sorted(self._sent):
            self._queue.append(self._sent[rid])
        self._sent.clear()

    def _forward_queue(self) -> None:
        for p in self._queue:
            self._send(p)
        self._queue.clear()

    async def _keep_link(self) -> None:
        """Keep a link to the sequencer while another host is it, and resend to each new
        one what has no answer yet."""
        while True:
            owner = self.owner
            if self.sequencing or owner is None or not owner.get("link"):
                self._link_changed.clear()
                await self._link_changed.wait()
                continue
            try:
                link = await self._dial(str(owner["link"]), self.key, self.host, self.topic)
            except LinkError as e:
                self.log.warning("link_failed", topic=self.topic, to=owner.get("host"),
                                 error=str(e))
                # Again shortly, or at once when the sequencer changes: the one we could
                # not reach is most often a dead host's, and its successor is news.
                if self.owner is owner:
                    self._link_changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(RETRY_S * 4):
                            await self._link_changed.wait()
                continue
            self._link = link
            self.log.info("link_up", topic=self.topic, to=owner.get("host"))
            for rid in sorted(self._sent):  # in the order they were typed (a refusal
                self._request(rid, self._sent[rid])  # puts one back at the dict's end)
            self._link_changed.clear()
            reader = asyncio.ensure_future(self._read_replies(link))
            changed = asyncio.ensure_future(self._link_changed.wait())
            await asyncio.wait([reader, changed], return_when=asyncio.FIRST_COMPLETED)
            reader.cancel()
            changed.cancel()
            # Reset, not closed: a graceful close would leave the kernel sending what is
            # still unacknowledged, to arrive whenever a partition heals (after lines
            # withdrawn since, or sent again on the next link, where tags dedupe them).
            link.discard()
            self._link = None

    async def _read_replies(self, link: Link) -> None:
        with contextlib.suppress(LinkError, ValueError, TypeError):
            while True:
                msg = await link.recv()
                moved = False
                for reply in msg.get("replies", []):
                    rid = int(reply.get("id", 0))
                    p = self._sent.pop(rid, None)
                    if p is None:
                        continue
                    if "e" in reply:
                        self._answer(p, [Posted(*r) for r in reply["e"]])
                    elif reply.get("error") == "stale":  # too late: withdrawn by its host
                        if not p.future.done():
                            p.future.set_exception(Withdrawn("refused by the sequencer: stale"))
                    else:  # not the sequencer (any more): keep it for the next one
                        self._sent[rid] = p
                        moved = True
                if moved:
                    self._link_changed.set()
                    return

    # -- the sequencer's side of links ------------------------------------------------

    async def serve_link(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        """A follower's link, passed to us by our router."""
        try:
            link = await links.accept(reader, writer, self.key, self.topic)
        except LinkError as e:
            self.log.warning("link_refused", topic=self.topic, error=str(e))
            writer.close()
            return
        self.log.info("link_accepted", topic=self.topic, peer=link.peer)
        try:
            while True:
                msg = await link.recv()
                requests = msg.get("requests")
                if not isinstance(requests, list):
                    raise LinkError("bad request")
                for request in requests:
                    self._take_request(link, request)
        except (LinkError, ValueError, TypeError) as e:
            self.log.info("link_closed", topic=self.topic, peer=link.peer, reason=str(e))
        finally:
            link.close()

    def _take_request(self, link: Link, request: Any) -> None:
        """One follower's lines: queued to commit, answered when committed (or refused)."""
        if not isinstance(request, dict):
            raise LinkError("bad request")
        rid = request.get("id")
        rows = request.get("lines")
        if not isinstance(rid, int) or not isinstance(rows, list):
            raise LinkError("bad request")
        if not self.sequencing:
            link.send_soon("replies", {"id": rid, "error": "not_sequencer"})
            return
        if self.stale_after_s is not None and any(
                time.time() - float(r[3]) > self.stale_after_s for r in rows):
            link.send_soon("replies", {"id": rid, "error": "stale"})
            self.log.warning("link_line_refused", topic=self.topic, peer=link.peer,
                             reason="stale")
            return
        drafts, tags = [], []
        for r in rows:
            sid, nick, text, ts, action, line, tag = r
            drafts.append(Draft(str(sid), str(nick), str(text), float(ts),
                                bool(action), line if isinstance(line, int) else None))
            tags.append(str(tag))
        p = Pending(drafts, tags)
        self._queue.append(p)
        self._work.set()
        p.future.add_done_callback(functools.partial(self._reply, link, rid))

    @staticmethod
    def _reply(link: Link, rid: int, f: asyncio.Future[list[Posted]]) -> None:
        if f.cancelled() or f.exception() is not None:
            return
        with contextlib.suppress(Exception):
            link.send_soon("replies", {"id": rid, "e": [list(p) for p in f.result()]})


def node_id() -> str:
    return f"{os.uname().nodename}-{os.getpid()}"


__all__ = ["ClusterTopicLog", "EtcdUnavailable"]
