"""The router's administration of topics: the list people see, topics made and dropped
at run time, a topic whose server keeps failing, and what the router learns from the
topic servers about who is in them.

The topics themselves are facts of the directory (`directory.py`); starting and
stopping a topic's daemons is the router's supervisor's (`Supervision`). This module
decides when, and tells people.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

from theychat.daemons import ops
from theychat.daemons.config import Config
from theychat.daemons.control import Message, check, fail, ok
from theychat.daemons.directory import Directory, NickTaken
from theychat.daemons.errors import ControlError
from theychat.daemons.paths import StatePaths
from theychat.daemons.peers import Peers
from theychat.daemons.protocol import fold
from theychat.daemons.tree import holder

READY_POLL_S = 0.02


class Supervision(Protocol):
    """The router's supervisor, as topics need it."""

    def watch(self, topic: str) -> None:
        """Start (or adopt) the topic's daemons and keep them running."""
        ...

    async def unwatch(self, topic: str) -> None:
        """Stop the topic's daemons for good."""
        ...


class Topics:
    def __init__(self, directory: Directory, cfg: Config, paths: StatePaths, peers: Peers,
                 supervision: Supervision, log: Any) -> None:
        self.dir = directory
        self.cfg = cfg
        self.paths = paths
        self.peers = peers
        self.supervision = supervision
        self.log = log
        self.unavailable: set[str] = set()  # topics whose supervisor gave up
        self.dropping: set[str] = set()  # being dropped here: its evacuation is ours

    def listing(self) -> list[dict[str, object]]:
        return [{**c, "available": c["name"] not in self.unavailable} for c in self.dir.counts()]

    def down(self, topic: str) -> None:
        """Its supervisor gave up: nobody can join it until the router restarts."""
        if topic not in self.unavailable:
            self.unavailable.add(topic)
            self.log.error("topic_unavailable", unavailable=topic)

    def info(self, topic: str) -> Message:
        name = self.dir.topic_named(topic)
        if name is None:
            return fail("no_such_topic", f"no topic {topic}")
        return ok(topic=name, creator=self.dir.creator(name))

    async def who(self, name: str) -> Message:
        topic = self.dir.topic_named(name)
        if topic is None:
            return fail("no_such_topic", f"no topic {name}; topics: {', '.join(self.dir.topics)}")
        try:
            reply = check(await self.peers.ask(holder(topic), ops.Members()))
        except ControlError:
            return fail("unavailable", f"topic {topic} is unavailable right now")
        nicks = sorted((str(m["nick"]) for m in reply.get("members", [])), key=str.lower)
        return ok(event={"type": "who", "topic": topic, "members": nicks})

    async def create(self, name: str, creator: str) -> Message:
        t = self.cfg.topics
        if not t.allow_create:
            return fail("not_allowed", "creating topics is turned off here")
        existing = self.dir.topic_named(name)
        if existing is not None:
            return fail("topic_exists", f"topic {existing} already exists")
        if len(self.dir.topics) >= t.max:
            return fail("too_many_topics", f"there are already {t.max} topics, the most allowed")
        await self.dir.add_topic(name, creator)
        self.unavailable.discard(name)
        self.supervision.watch(name)
        self.log.info("topic_created", created=name, creator=creator)
        # The creator is moved in next: wait (bounded) until the new server answers.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.supervision.start_timeout_ms / 1000
        while loop.time() < deadline:
            with contextlib.suppress(ControlError):
                reply = await self.peers.ask(holder(name), ops.Status(), timeout=0.5)
                if reply.get("ok") and reply["daemon"]["state"] == "ready":
                    return ok(topic=name)
            await asyncio.sleep(READY_POLL_S)
        return fail("unavailable", f"topic {name} was created but its server is slow to "
                                   "start; try /join in a moment")

    async def drop(self, name: str, by_sid: str, op_here: bool) -> Message:
        topic = self.dir.topic_named(name)
        if topic is None:
            return fail("no_such_topic", f"no topic {name}")
        by = self.dir.session(by_sid)
        nick = by.nick if by else "?"
        creator = self.dir.creator(topic) or ""
        allowed = (by is not None and by.oper) or op_here or (
            creator and fold(creator) == fold(nick))
        if not allowed:
            return fail("not_operator", f"only operators of {topic} can drop it")
        # Forgotten first: nobody can join it while its members are moved out.
        self.dropping.add(topic)
        try:
            await self.dir.drop_topic(topic)
            await self.evacuate(topic, f"topic {topic} was dropped by {nick}; "
                                       "you are in the lobby")
        finally:
            self.dropping.discard(topic)
        self.log.info("topic_dropped", dropped=topic, by=nick)
        return ok(event={"type": "ok", "cmd": "drop", "topic": topic,
                         "text": f"topic {topic} dropped"})

    async def evacuate(self, topic: str, notice: str) -> None:
        """A dropped topic's people on this host go to the lobby, then its daemons stop
        and its state here goes (a new /create starts afresh)."""
        self.unavailable.discard(topic)
        with contextlib.suppress(ControlError):
            await self.peers.ask(holder(topic), ops.Evacuate(notice=notice), timeout=10.0)
        await self.supervision.unwatch(topic)
        wal = self.paths.wal(holder(topic).name)
        for leftover in (wal, wal.with_suffix(".fanout")):
            leftover.unlink(missing_ok=True)

    # -- what the servers know better -----------------------------------------------------

    async def reconcile_all(self) -> None:
        """After a restart, learn who is in which topic from the servers themselves."""
        for topic in self.dir.topics:
            with contextlib.suppress(ControlError):
                reply = check(await self.peers.ask(holder(topic), ops.Members(), timeout=0.5))
                members = [ops.record(ops.MemberRecord, m, "members")
                           for m in reply.get("members", [])]
                await self.reconcile(topic, members)

    async def reconcile(self, topic: str, members: list[ops.MemberRecord]) -> None:
        """`members` are in `topic`, connected: the directory says so too; sessions it
        places there that are not among them have lost their connection."""
        present = set()
        for m in members:
            known = self.dir.session(m.sid)
            try:
                if known is None or known.topic != topic or known.detached_at is not None:
                    await self.dir.register(m.sid, m.nick, topic)
                present.add(m.sid)
            except NickTaken:
                continue
        for s in self.dir.in_topic(topic, here=True):
            if s.sid not in present and s.detached_at is None:
                await self.dir.detach(s.sid)
