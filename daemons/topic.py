"""What people do in a topic: talk, and the commands a topic server answers itself or
asks the router for; and the fan-out of what the topic log commits.

A line is appended to the topic log (`topiclog.py`), which numbers it; the server fans
out to its members, and acknowledges to the sender, only what the log has committed
(group commit). Who is here, operators and bans are the room (`room.py`); a person's
facts beyond the topic (server-operator rights, where a nick is) are the router's, asked
for when needed. Moving a member on is `handoff.Sockets.move`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from theychat.daemons import ops, render
from theychat.daemons.clientconn import ClientConn
from theychat.daemons.cluster import LOST_NOTICE
from theychat.daemons.commands import MOVE_RETRY_S, Commands, Conn, Pending, handoff_error
from theychat.daemons.config import Config
from theychat.daemons.control import Message, check, fail, ok
from theychat.daemons.errors import ControlError
from theychat.daemons.handoff import Sockets
from theychat.daemons.peers import Peers
from theychat.daemons.protocol import Command, fold
from theychat.daemons.render import Event
from theychat.daemons.room import BAN, MEMBER, Room
from theychat.daemons.store import Change
from theychat.daemons.topiclog import Draft, Posted, TopicLog
from theychat.daemons.tree import ROOT, DaemonId, Role

DEFAULT_HISTORY_LINES = 20
RESYNC_S = 5.0  # after a restart, how long a client has to send its lost lines again
ROUTER = DaemonId(ROOT)


class TopicCommands(Commands):
    sockets: Sockets

    def __init__(self, topic: str, room: Room, log: TopicLog, sockets: Sockets, peers: Peers,
                 cfg: Config, logger: Any, fanned: Callable[[int], None]) -> None:
        self.topic = topic
        self.room = room
        self.topic_log = log
        self.sockets = sockets
        self.peers = peers
        self.cfg = cfg
        self.log = logger
        self._fanned = fanned  # the fan-out watermark: every member has had up to seq
        # While the server starts, its members are not all back yet: commits that come
        # meanwhile (a cluster's log is followed from the start) must not move the
        # watermark past what they got.
        self.held = False
        self.closing = False  # shutting down: connections end, but nobody left
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unanswered: set[asyncio.Future[list[Posted]]] = set()  # lines in the log's hands
        # After a restart: session -> (the line it must send next, until when we wait).
        self._expect: dict[str, tuple[int, float]] = {}
        log.follow(self.fan_out)
        room.store.watch(BAN, self.banned_elsewhere)
        room.store.watch(MEMBER, self.member_elsewhere)

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def nick(self, conn: Conn) -> str:
        return self.room.nick_of(conn.sid) or "?"

    async def tell_router(self, op: ops.Op) -> None:
        """Best effort: the router re-learns members from us whenever it restarts."""
        try:
            check(await self.peers.ask(ROUTER, op, timeout=1.0))
        except ControlError as e:
            self.log.warning("router_unreachable", op=op.name, error=str(e))

    # -- fan-out ------------------------------------------------------------------------------

    def broadcast(self, event: Event, skip: str | None = None,
                  only: list[str] | None = None) -> None:
        """Send one event to every member (or those in `only`) but `skip`, encoded once
        per mode."""
        by_mode: tuple[list[ClientConn], list[ClientConn]] = ([], [])  # text, JSON
        conns = self.sockets.conns
        if only is None:  # a message: every member, the hot path
            for sid, conn in conns.items():
                if sid != skip:
                    by_mode[conn.json].append(conn)
        else:
            for sid in only:
                member = conns.get(sid)
                if sid != skip and member is not None:
                    by_mode[member.json].append(member)
        for mode, group in enumerate(by_mode):
            if group:
                ClientConn.write_each(group, render.encode(event, bool(mode)))

    def fan_out(self, entries: list[Posted]) -> None:
        """The log committed these: every member but their sender sees them now."""
        if self.held:
            return  # they are in the tail: Server.send_unsent gives them out
        for e in entries:
            self.broadcast(e.event(self.topic), skip=e.sid)
            self._mark_fanned(e.seq)

    def _mark_fanned(self, seq: int) -> None:
        """Move the watermark once what was written for `seq` is in the kernel's hands:
        connections hand this turn's bytes to their sockets in callbacks scheduled
        before this one (ClientConn.write), and a death before then must resend. One
        callback per message, not per turn: a later message of the same turn may reach a
        member (its own sender's, say) whose flush is scheduled after this one."""
        asyncio.get_running_loop().call_soon(self._fanned, seq)

    def announce(self, durable: Awaitable[Any], nick: str, what: str,
                 reason: str | None = None, skip: str | None = None, **extra: Any) -> None:
        """Tell the members a membership change once it is durable. The store and the log
        are one write-ahead log here, so nobody's departure is told before what they said
        just before it."""
        event: Event = {"type": "presence", "topic": self.topic, "nick": nick, "event": what,
                        **extra}
        if reason:
            event["reason"] = reason
        # Those here now: a newcomer's `joined` list already shows this change.
        here = list(self.sockets.conns)

        def done(f: asyncio.Future[Any]) -> None:
            if not f.cancelled() and f.exception() is None:
                self.broadcast(event, skip=skip, only=here)

        asyncio.ensure_future(durable).add_done_callback(done)

    # -- talking --------------------------------------------------------------------------------

    def say(self, conn: Conn, text: str, line: int | None = None,
            action: bool = False) -> Pending:
        if not text:
            return None
        if line is not None and self._expect and self._out_of_turn(conn.sid, line):
            return None
        draft = Draft(conn.sid, self.nick(conn), text, time.time(), action, line)
        appended = self.topic_log.append([draft])
        self._unanswered.add(appended)  # type: ignore[arg-type]
        appended.add_done_callback(  # type: ignore[attr-defined]
            lambda f: self._said(f, conn, line))
        return None

    def _said(self, appended: asyncio.Future[list[Posted]], conn: Conn,
              line: int | None) -> None:
        """Acknowledge what the log took; say so when it took nothing (never silence)."""
        self._unanswered.discard(appended)
        if self.sockets.get(conn.sid) is not conn:
            return  # gone meanwhile
        if appended.cancelled() or appended.exception() is not None:
            conn.send(render.error("not_saved", f"your line was not saved: the server of "
                                                f"{self.topic} cannot write its log right "
                                                "now; nobody saw it", line=line))
            return
        if conn.json:
            for e in appended.result():
                conn.send(self.sent(e))

    def sent(self, e: Posted) -> Event:
        """The acknowledgement of a line, to its sender."""
        sent: Event = {"type": "sent", "topic": self.topic, "seq": e.seq}
        if e.line is not None:
            sent["line"] = e.line
        return sent

    def caught_up(self, sid: str, restarted: bool = False) -> Event:
        """After a resume or a restart: the client sends again its lines after this one
        (those the log has not taken).

        After a restart (`restarted`) the socket is the same: lines after those our last
        incarnation read and lost may still be in it, ahead of the client's resends. They
        are dropped until the next line in order arrives (the client sends them all
        again), so that a sender's lines keep their order; for at most RESYNC_S, in case
        the client does not send again."""
        last = self.topic_log.last_line(sid)
        if restarted and last is not None:
            self._expect[sid] = (last + 1, time.monotonic() + RESYNC_S)
        return {"type": "caught_up", "topic": self.topic, "last_line": last}

    def _out_of_turn(self, sid: str, line: int) -> bool:
        expect = self._expect.get(sid)
        if expect is None:
            return False
        want, until = expect
        if line < want:
            return False  # taken already: answered as before
        if line == want or time.monotonic() > until:
            del self._expect[sid]
            return False
        return True

    def cmd_me(self, conn: Conn, cmd: Command) -> Pending:
        return self.say(conn, cmd.text, action=True)

    def cmd_history(self, conn: Conn, cmd: Command) -> Pending:
        return self._history(conn, cmd.number or DEFAULT_HISTORY_LINES)

    async def _history(self, conn: Conn, n: int) -> None:
        await self.topic_log.sync()  # what this client just said is part of it
        conn.send({"type": "history", "topic": self.topic,
                   "messages": [e.event(self.topic) for e in self.topic_log.last(n)]})

    def cmd_who(self, conn: Conn, cmd: Command) -> Pending:
        if cmd.arg and fold(cmd.arg) != fold(self.topic):
            return self._ask_and_show(conn, ops.Who(topic=cmd.arg))
        conn.send({"type": "who", "topic": self.topic, "members": self.room.nicks()})
        return None

    async def _ask_and_show(self, conn: Conn, op: ops.Op, timeout: float = 2.0) -> None:
        """Commands the router answers (it owns topics, nicks and operators): its reply
        carries the event to show, or an error."""
        self.show(conn, await self.peers.ask(ROUTER, op, timeout=timeout))

    def cmd_topics(self, conn: Conn, cmd: Command) -> Pending:
        return self._topics(conn)

    async def _topics(self, conn: Conn) -> None:
        reply = check(await self.peers.ask(ROUTER, ops.Topics()))
        conn.send({"type": "topics", "topics": reply["topics"]})

    def cmd_nick(self, conn: Conn, cmd: Command) -> Pending:
        return self._nick(conn, cmd.arg)

    async def _nick(self, conn: Conn, nick: str) -> None:
        reply = await self.peers.ask(ROUTER, ops.Rename(sid=conn.sid, nick=nick))
        if self.failed(conn, reply):
            return
        if conn.sid not in self.sockets:
            return  # left while we asked
        old, written = self.room.rename(conn.sid, nick)
        self.announce(written, nick, "renamed", skip=conn.sid, old=old)
        self.nick_ok(conn, nick)

    def cmd_msg(self, conn: Conn, cmd: Command) -> Pending:
        found = self.room.find(cmd.arg)
        target = self.sockets.get(found[0]) if found else None
        if found and target is not None:
            target.send(self.dm_event(self.nick(conn), found[1], cmd.text, time.time()))
            self.dm_sent(conn, found[1])
            return None
        return self._dm(conn, cmd.arg, cmd.text)

    async def _dm(self, conn: Conn, to: str, text: str) -> None:
        reply = await self.peers.ask(ROUTER, ops.Dm(sid=conn.sid, to=to, text=text))
        if not self.failed(conn, reply):
            self.dm_sent(conn, str(reply.get("to", to)))

    def cmd_join(self, conn: Conn, cmd: Command) -> Pending:
        if fold(cmd.arg) == fold(self.topic):
            conn.send(render.error("already_here", f"you are already in {self.topic}"))
            return None
        return self._join(conn, cmd.arg)

    async def _join(self, conn: Any, name: str) -> None:
        reply = check(await self.peers.ask(ROUTER, ops.Topics()))
        names = [str(t) for t in reply.get("names", [])]
        topic = next((t for t in names if fold(t) == fold(name)), None)
        if topic is None:
            conn.send(render.error("no_such_topic",
                                   f"no topic {name}; topics: {', '.join(names)}"))
            return
        await self.move(conn, topic)

    def cmd_create(self, conn: Conn, cmd: Command) -> Pending:
        return self._create(conn, cmd.arg)

    async def _create(self, conn: Any, name: str) -> None:
        reply = await self.peers.ask(ROUTER, ops.CreateTopic(topic=name, sid=conn.sid),
                                     timeout=10.0)
        if self.failed(conn, reply):
            return
        topic = str(reply["topic"])
        self.created(conn, topic)
        await self.move(conn, topic)

    def cmd_oper(self, conn: Conn, cmd: Command) -> Pending:
        return self._oper(conn, cmd.arg, cmd.text)

    async def _oper(self, conn: Conn, name: str, password: str) -> None:
        reply = await self.peers.ask(ROUTER, ops.Oper(sid=conn.sid, user=name,
                                                      password=password))
        if not self.failed(conn, reply):
            self.now_oper(conn)

    def cmd_resume(self, conn: Conn, cmd: Command) -> Pending:
        conn.send(render.error("not_in_lobby", "/resume is for a new connection, from the lobby"))
        return None

    def cmd_leave(self, conn: Conn, cmd: Command) -> Pending:
        return self._leave(conn)

    async def _leave(self, conn: Conn) -> None:
        await self.move(conn, None)

    # -- operators ------------------------------------------------------------------------------

    async def is_op(self, conn: Conn) -> bool:
        """An operator of this topic (its creator), or a server operator (the router's)."""
        if self.room.is_op(self.nick(conn)):
            return True
        reply = await self.peers.ask(ROUTER, ops.SessionInfo(sid=conn.sid))
        return reply.get("ok") is True and reply.get("oper") is True

    def _not_op(self, conn: Conn, what: str) -> None:
        conn.send(render.error("not_operator", f"only operators of {self.topic} can {what}"))

    def cmd_kick(self, conn: Conn, cmd: Command) -> Pending:
        return self._kick_cmd(conn, cmd.arg, cmd.text)

    async def _kick_cmd(self, conn: Conn, nick: str, reason: str) -> None:
        if not await self.is_op(conn):
            self._not_op(conn, "kick")
            return
        found = self.room.find(nick)
        if found is None:
            conn.send(render.error("no_such_nick", f"{nick} is not in {self.topic}"))
            return
        target = self.sockets.get(found[0])
        if target is not None:
            await self._kick(conn, target, reason)
            return
        # Another host holds that member's socket: its server of this topic kicks.
        reply = await self.peers.ask(DaemonId(Role.SERVER, self.topic),
                                     ops.Kick(sid=found[0], by=self.nick(conn), reason=reason),
                                     host=self.room.host_of(found[0]))
        if not self.failed(conn, reply):
            conn.send({"type": "ok", "cmd": "kick", "nick": found[1],
                       "text": f"{found[1]} was kicked"})

    async def _kick(self, by: Conn | None, target: ClientConn, reason: str,
                    by_nick: str = "") -> bool:
        """Move `target` to the lobby, told who kicked it and why; `by` hears how it went
        (None: the kick came from another host)."""
        who, sid = self.nick(target), target.sid
        by_nick = by_nick or (self.nick(by) if by is not None else "?")
        why = f": {reason}" if reason else ""
        notice = f"you were kicked from {self.topic} by {by_nick}{why}"
        target.pause()  # its unread lines stay in the socket for the lobby
        if not await self.move(target, None, notice=notice, kicked_by=by_nick, reason=reason):
            if by is not None:
                by.send(render.error("unavailable",
                                     f"could not move {who} out right now; try again"))
            return False
        self.log.info("client_kicked", session=sid, nick=who, by=by_nick, reason=reason)
        if by is not None:
            by.send({"type": "ok", "cmd": "kick", "nick": who, "text": f"{who} was kicked"})
        return True

    async def kick_here(self, op: ops.Kick) -> Message:
        """A kick decided on another host, of a member whose socket we hold."""
        target = self.sockets.get(op.sid)
        if target is None:
            return fail("no_such_nick", "that person just left")
        await self._kick(None, target, op.reason, by_nick=op.by)
        return ok()

    def member_elsewhere(self, change: Change) -> None:
        """A member of another host came, went or was renamed (cluster mode): our
        members hear it as from one of ours. Changes made here were announced here."""
        now, before = change.entry, change.prev
        latest = now or before
        if (now is None and before is not None and self.room.host
                and before.value.get("host") == self.room.host and not before.value.get("gone")):
            self._removed_by_the_cluster(before.key[len(MEMBER):])
            return
        if latest is None or latest.value.get("host", "") == self.room.host or (
                before is not None and before.value.get("host", "") == self.room.host):
            return  # ours, or a session of ours taken over by another host
        nick = str(latest.value.get("nick"))
        event: Event = {"type": "presence", "topic": self.topic, "nick": nick}
        if now is not None and isinstance(now.value.get("gone"), dict):
            gone = now.value["gone"]
            event["event"] = "kicked" if gone.get("event") == "kicked" else "left"
            for key in ("reason", "by"):
                if isinstance(gone.get(key), str):
                    event[key] = gone[key]
        elif now is None:
            if before is None or before.value.get("gone"):
                return  # told already
            event.update(event="left", reason="connection lost")  # its host is gone
        elif before is None:
            event["event"] = "joined"
        elif before.value.get("nick") != nick:
            event.update(event="renamed", old=str(before.value.get("nick")))
        else:
            return
        self.broadcast(event)

    def _removed_by_the_cluster(self, sid: str) -> None:
        """A member of ours whose entry another host deleted: the cluster took our host
        for dead (host_gone) and told everyone that member left. Still connected here,
        they would speak as nobody: they go, and resume (their host's router closes the
        rest when it finds its lease gone)."""
        conn = self.sockets.get(sid)
        if conn is None or conn.close_reason is not None:
            return  # gone already: the delete was ours
        self.sockets.lost(conn)
        conn.send({"type": "notice", "text": LOST_NOTICE})
        conn.close("removed by the cluster")
        withdrawn = self.topic_log.withdraw({sid})
        self.log.warning("member_removed_by_cluster", session=sid, withdrawn=withdrawn)

    def banned_elsewhere(self, change: Change) -> None:
        """A ban made on another host: a member of ours with that nick goes (one made
        here is carried out by the /ban itself)."""
        if change.entry is None or change.entry.value.get("host", "") == self.room.host:
            return
        found = self.room.find_folded(change.key[len(BAN):])
        target = self.sockets.get(found[0]) if found else None
        if target is not None and target.close_reason is None:
            by = str(change.entry.value.get("by") or "?")
            self.background(self._kick(None, target, "banned", by_nick=by))

    def host_gone(self, op: ops.HostGone) -> Message:
        """Another host is gone: its members leave, as after a lost connection. Every
        host tries; the delete is conditional, so one of them does it, and each host
        tells its own members (member_elsewhere)."""
        gone = [e for e in self.room.store.range(MEMBER) if e.value.get("host") == op.host]
        for e in gone:
            self.room.store.delete(e.key, revision=e.revision)
        return ok(members=len(gone))

    def lost_cluster(self, op: ops.ClusterLost) -> Message:
        """Our host is cut off: every member here goes (our monitor's copies too)."""
        self.closing = True  # nobody left the topic: they resume on another host
        sids = set()
        for conn in self.sockets:
            sids.add(conn.sid)
            self.sockets.lost(conn)
            conn.send({"type": "notice", "text": op.notice})
            conn.close("lost the cluster")
        self.closing = False
        withdrawn = self.topic_log.withdraw(sids)
        self.log.warning("members_let_go", count=len(sids), withdrawn=withdrawn)
        return ok(withdrawn=withdrawn)

    def cmd_ban(self, conn: Conn, cmd: Command) -> Pending:
        return self._ban(conn, cmd.arg)

    async def _ban(self, by: Conn, nick: str) -> None:
        if not await self.is_op(by):
            self._not_op(by, "ban")
            return
        await self.room.ban(nick, self.nick(by))
        self.log.info("client_banned", nick=nick, by=self.nick(by))
        found = self.room.find(nick)
        target = self.sockets.get(found[0]) if found else None
        if target is not None:
            await self._kick(by, target, "banned")
        by.send({"type": "ok", "cmd": "ban", "nick": nick,
                 "text": f"{nick} is banned from {self.topic}"})

    def cmd_drop(self, conn: Conn, cmd: Command) -> Pending:
        return self._drop(conn, cmd.arg)

    async def _drop(self, conn: Conn, name: str) -> None:
        # Dropping waits for the topic's members to move and its daemons to stop.
        here = fold(name) == fold(self.topic) and await self.is_op(conn)
        await self._ask_and_show(conn, ops.DropTopic(topic=name, sid=conn.sid, op_here=here),
                                 timeout=30.0)

    # -- arriving and leaving -------------------------------------------------------------------

    async def adopt(self, op: ops.Adopt, fds: list[int]) -> Message:
        """A person moves in (from the lobby or another topic), socket and all."""
        nick = op.nick
        if nick is None:
            reply = await self.peers.ask(ROUTER, ops.SessionInfo(sid=op.session.sid))
            nick = reply.get("nick") if reply.get("ok") else None
            if not isinstance(nick, str):
                return fail("no_session", "the router does not know this session")
        if self.room.banned(nick):
            return fail("banned", f"you are banned from {self.topic}")
        conn = await self.sockets.adopt(op, fds)
        sid = conn.sid
        written = self.room.join(sid, nick)
        # What came before, then live: nothing between these lines and the fan-out can
        # interleave (no await), and history holds only what was already sent out.
        conn.send({"type": "joined", "topic": self.topic, "members": self.room.nicks()})
        if op.resume_after is not None:
            for missed in self.topic_log.after(op.resume_after):  # missed while away
                conn.send(missed.event(self.topic))
        elif self.cfg.history.on_join:
            conn.send({"type": "history", "topic": self.topic, "on_join": True,
                       "messages": [e.event(self.topic)
                                    for e in self.topic_log.last(self.cfg.history.on_join)]})
        if op.resumed:
            conn.send(self.caught_up(sid))
        self.announce(written, nick, "joined", skip=sid)
        if op.notice:
            conn.send({"type": "notice", "text": op.notice})
        pending = op.pending_bytes()
        self.log.info("client_joined", session=sid, nick=nick, came_from=op.came_from,
                      pending_bytes=len(pending))
        conn.start(pending)
        self.background(self.tell_router(ops.SessionAt(sid=sid, nick=nick, topic=self.topic)))
        return ok()

    async def move(self, conn: Any, topic: str | None, notice: str | None = None,
                   kicked_by: str | None = None, reason: str = "") -> bool:
        """Pass the member on to another topic's server, or back to the lobby."""
        sid, nick = conn.sid, self.nick(conn)
        adopt = ops.Adopt(session=conn.record(), nick=nick, came_from=self.topic,
                          notice=notice)
        try:
            await self._move_patiently(conn, topic, adopt)
        except ControlError as e:
            where = topic or "the lobby"
            self.log.warning("handoff_failed", session=sid, to=topic, error=str(e))
            conn.send(handoff_error(e, f"cannot move you to {where} right now; try again"))
            conn.resume()
            return False
        if kicked_by is not None:
            what, why, extra = "kicked", reason or None, {"by": kicked_by}
        else:
            what, why, extra = "left", f"went to {topic}" if topic else "went to the lobby", {}
        written = self.room.leave(sid, {"event": what, "reason": why, **extra})
        self.announce(written, nick, what, why, **extra)
        self.log.info("handoff", session=sid, nick=nick, to=topic)
        return True

    async def _move_patiently(self, conn: Any, topic: str | None, adopt: ops.Adopt) -> None:
        """A topic's server that cannot be reached may be starting (a topic just made
        on another host) or restarting: ask again until its start timeout."""
        deadline = time.monotonic() + self.cfg.supervision.start_timeout_ms / 1000
        while True:
            try:
                await self.sockets.move(conn, topic, adopt)
                return
            except ControlError as e:
                if (topic is None or e.code != "unavailable" or conn.close_reason
                        or time.monotonic() > deadline):
                    raise
            await asyncio.sleep(MOVE_RETRY_S)

    def lost(self, conn: Any, reason: str) -> None:
        if self._gone(conn, reason):
            self.background(self.tell_router(ops.SessionEnd(sid=conn.sid, reason=reason)))

    def _gone(self, conn: Any, reason: str) -> bool:
        """A member's connection ended here: they leave, visibly (not at a shutdown)."""
        if not self.sockets.lost(conn):
            return False
        if self.closing:
            return False  # a shutdown is not a departure: members come back after restart
        nick = self.nick(conn)
        self.announce(self.room.leave(conn.sid, {"event": "left", "reason": reason}), nick,
                      "left", reason)
        self.log.info("client_left", session=conn.sid, nick=nick, reason=reason)
        return True

    def drop_session(self, op: ops.DropSession) -> Message:
        """The router gave this session to a newer connection."""
        conn = self.sockets.get(op.sid)
        if conn is not None:
            self._gone(conn, "resumed elsewhere")
            conn.send({"type": "notice", "text": "this session was resumed elsewhere"})
            conn.close("resumed elsewhere")
        return ok(dropped=conn is not None)

    def deliver(self, op: ops.Deliver) -> Message:
        conn = self.sockets.get(op.sid)
        if conn is None:
            return fail("no_such_nick", "that person just left")
        conn.send(op.event)
        return ok(to=self.nick(conn))

    async def evacuate(self, op: ops.Evacuate) -> Message:
        """The topic is being dropped: everyone goes back to the lobby, told why."""
        moved = 0
        for conn in self.sockets:
            conn.pause()
            if await self.move(conn, None, notice=op.notice):
                moved += 1
        return ok(moved=moved)

    async def close(self, notice: str | None = "") -> None:
        """Shutting down: every member is told `notice` (by default that the server is
        shutting down; None: nothing) and our copies close; they come back after."""
        if self._unanswered:  # every line the log was given gets its answer first
            await asyncio.wait(list(self._unanswered))
        self.closing = True
        if notice == "":
            notice = f"the server of {self.topic} is shutting down"
        for conn in self.sockets:
            if notice:
                conn.send({"type": "notice", "text": notice})
            conn.close("server shutdown")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
