"""server@TOPIC: one topic's members, messages and history, and its clients' sockets.

Clients arrive as sockets passed by the router (or by another server) and from then on
this process reads and writes them directly.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from theychat.daemons import control, daemon, fdstore
from theychat.daemons.clientconn import ClientConn, Session, attach, write_each
from theychat.daemons.commands import CommandHandler, Pending, handoff_error
from theychat.daemons.control import Message, fail, ok
from theychat.daemons.daemon import Daemon
from theychat.daemons.errors import ControlError
from theychat.daemons.fdstore import FdKeeper
from theychat.daemons.journal import Journal
from theychat.daemons.protocol import Command, fold
from theychat.daemons.render import Event, encode
from theychat.daemons.room import Room
from theychat.daemons.tree import Role, holder
from theychat.daemons.watermark import Watermark

DEFAULT_HISTORY_LINES = 20


class Server(CommandHandler):
    def __init__(self, d: Daemon) -> None:
        assert d.topic is not None
        self.d = d
        self.cfg = d.cfg
        self.log = d.log
        self.topic = d.topic
        self.room = Room(d.topic, d.cfg.history.size)
        self.conns: dict[str, ClientConn] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.keeper = FdKeeper(d.paths.witness(d.topic), d.log)
        self.journal: Journal
        self.fanned: Watermark
        self.closing = False  # shutting down: connections end, but nobody left

    @property
    def router_ctl(self) -> Path:
        return self.d.paths.control(holder(None).name)

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tell_router(self, msg: Message) -> None:
        """Best effort: the router re-learns members from us whenever it restarts."""
        try:
            control.check(await control.request(self.router_ctl, msg, timeout=1.0))
        except ControlError as e:
            self.log.warning("router_unreachable", op=msg["op"], error=str(e))

    # -- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        d = self.d
        self.journal = Journal(d.paths.wal(d.name), self.cfg.wal, self.log,
                               self.room.snapshot, d.fail)
        replay = self.journal.replay
        if replay.snapshot is not None:
            self.room.restore(replay.snapshot)
        for rec in replay.records:
            self.room.apply(rec)
        in_log = set(self.room.members)
        self.fanned = Watermark(d.paths.wals / f"{d.name}.fanout")
        ctl = control.ControlServer(d.paths.control(d.name), self.on_control, self.log)
        await self.restore_sockets()
        self.reconcile(in_log)
        self.send_unsent()
        # Only now: a line sent during the outage must reach every member, so none may
        # be handled before all are back.
        for conn in list(self.conns.values()):
            conn.start()
        self.keeper.start()
        await ctl.start()
        self._background(self._tell_router(
            {"op": "server_hello", "topic": self.topic, "members": self.room.member_list()}
        ))
        self._background(self._learn_creator())
        d.ready(members=len(self.conns), next_seq=self.room.next_seq)
        await d.stop.wait()
        self.log.info("daemon_stopping")
        self.closing = True
        await ctl.close()
        await self.keeper.close()
        for conn in list(self.conns.values()):
            conn.send({"type": "notice", "text": f"the server of {self.topic} is shutting down"})
            conn.close("server shutdown")
        await self.journal.close()

    async def restore_sockets(self) -> None:
        """Take back the client sockets our monitor kept while we were dead."""
        try:
            items = await self.keeper.fetch_all()
        except ControlError as e:
            self.log.warning("fds_unavailable", error=str(e))
            return
        elsewhere = await self._moved_elsewhere([str(k) for k, _, _ in items])
        for key, fd, meta in items:
            try:
                session = Session.from_record(meta)
            except ControlError:
                os.close(fd)
                continue
            if key in elsewhere:
                # Moved on just before our death (our monitor had not heard the drop
                # yet): its new owner has it, so let go of our copy.
                os.close(fd)
                self.keeper.drop(key)
                self.log.info("fd_released", session=key, owner=elsewhere[key] or "lobby")
                continue
            conn = await attach(self, session, fd, self.cfg.clients, self.log)
            self.conns[session.sid] = conn
            if session.sid not in self.room.members:  # joined just before the crash
                self.room.add(session.sid, session.nick)
                self._logged({"type": "join", "sid": session.sid, "nick": session.nick})
        self.log.info("fds_restored", count=len(items))

    def send_unsent(self) -> None:
        """Logged messages our previous incarnation died before fanning out: the members
        still here get them now (their senders get the acknowledgement)."""
        unsent = self.room.after(self.fanned.get())
        for msg in unsent:
            sender = msg.get("sid")
            for sid, conn in self.conns.items():
                if sid != sender:
                    conn.send(self.room.public(msg))
                elif conn.session.json:
                    conn.send({"type": "sent", "topic": self.topic, "seq": msg["seq"]})
        if unsent:
            self.log.info("unsent_delivered", count=len(unsent), first=unsent[0]["seq"])
        self._mark_fanned(self.room.durable_seq)

    def _mark_fanned(self, seq: int) -> None:
        """Move the watermark once what was written for `seq` is in the kernel's hands:
        connections hand this turn's bytes to their sockets in callbacks scheduled
        before this one (ClientConn.write), and a death before then must resend. One
        callback per message, not per turn: a later message of the same turn may reach a
        member (its own sender's, say) whose flush is scheduled after this one."""
        asyncio.get_running_loop().call_soon(self.fanned.set, seq)

    async def _moved_elsewhere(self, sids: list[str]) -> dict[str, str]:
        """Restored sessions the router places somewhere else ('' = the lobby)."""
        if not sids:
            return {}
        try:
            reply = control.check(await control.request(
                self.router_ctl, {"op": "locate", "sids": sids}, timeout=1.0))
        except ControlError:
            return {}  # the router cannot say: keep them; they were ours
        where = reply.get("where", {})
        return {sid: str(where[sid]) for sid in sids
                if isinstance(where.get(sid), str) and where[sid] != self.topic}

    def reconcile(self, in_log: set[str]) -> None:
        """Members the log knows but whose socket is gone (our monitor died with us)
        leave, visibly; they can still /resume their session from the lobby."""
        for sid in sorted(in_log - set(self.conns)):
            member = self.room.remove(sid)
            if member is None:
                continue
            self.announce({"type": "leave", "sid": sid}, member.nick, "left",
                          "connection lost in a restart")
            self.log.info("client_left", session=sid, nick=member.nick,
                          reason="connection lost in a restart")
            self._background(self._tell_router(
                {"op": "session_end", "sid": sid, "reason": "connection lost in a restart"}
            ))

    def _logged(self, rec: dict[str, Any]) -> asyncio.Future[None]:
        return self.journal.append(rec)

    async def _learn_creator(self) -> None:
        """A topic made with /create has its creator as operator: keep that in our log."""
        try:
            reply = control.check(await control.request(
                self.router_ctl, {"op": "topic_info", "topic": self.topic}))
        except ControlError:
            return
        creator = reply.get("creator")
        if isinstance(creator, str) and creator and not self.room.is_op(creator):
            self.room.apply({"type": "op", "nick": creator})
            self._logged({"type": "op", "nick": creator})

    def session_changed(self, conn: ClientConn) -> asyncio.Future[bool] | None:
        return self.keeper.store(conn.session.sid, None, conn.session.record())

    # -- fan-out ---------------------------------------------------------------------

    def broadcast(self, event: Event, skip: str | None = None,
                  only: list[str] | None = None) -> None:
        """Send one event to every member (or those in `only`) but `skip`, encoded once
        per mode."""
        by_mode: tuple[list[ClientConn], list[ClientConn]] = ([], [])  # text, JSON
        if only is None:
            for sid, conn in self.conns.items():
                if sid != skip:
                    by_mode[conn.session.json].append(conn)
        else:
            for sid in only:
                member = self.conns.get(sid)
                if sid != skip and member is not None:
                    by_mode[member.session.json].append(member)
        for mode, conns in enumerate(by_mode):
            if conns:
                write_each(conns, encode(event, bool(mode)))

    def announce(self, rec: dict[str, Any], nick: str, what: str, reason: str | None = None,
                 skip: str | None = None, **extra: Any) -> None:
        """Log a membership change; tell the others once it is durable. Durability comes
        in log order, so nobody's departure overtakes what they said just before it."""
        event: Event = {"type": "presence", "topic": self.topic, "nick": nick, "event": what,
                        **extra}
        if reason:
            event["reason"] = reason
        # Those here now: a newcomer's `joined` list already shows this change.
        here = list(self.conns)
        self._logged(rec).add_done_callback(lambda f: self._fan_out(f, event, skip, here))

    def _fan_out(self, durable: asyncio.Future[None], event: Event, skip: str | None,
                 only: list[str] | None = None) -> None:
        if durable.cancelled() or durable.exception() is not None:
            return
        if event["type"] == "message":
            self.room.durable(event["seq"])
            self.broadcast(self.room.public(event), skip=skip)
            self._mark_fanned(event["seq"])
        else:
            self.broadcast(event, skip=skip, only=only)

    # -- members arriving and leaving ------------------------------------------------------

    async def adopt(self, msg: Message, fds: list[int]) -> Message:
        if len(fds) != 1:
            return fail("bad_request", "adopt: expected exactly one socket")
        session = Session.from_record(msg.get("session"))
        try:
            pending = bytes.fromhex(str(msg.get("pending", "")))
        except ValueError:
            return fail("bad_request", "adopt.pending: expected hex")
        resume_after = msg.get("resume_after")
        if self.room.banned(session.nick):
            return fail("banned", f"you are banned from {self.topic}")
        conn = await attach(self, session, fds.pop(), self.cfg.clients, self.log)
        # First our monitor holds a copy; only then is the client told anything (and
        # the sender may drop its copy once we reply): a crash before this point leaves
        # the socket with the sender, after it with us, never both, never neither.
        await self.keeper.settled(self.keeper.store(session.sid, conn.fileno(), session.record()))
        self.room.add(session.sid, session.nick)
        self.conns[session.sid] = conn
        # What came before, then live: nothing between these lines and the fan-out can
        # interleave (no await), and history holds only what was already sent out.
        conn.send({"type": "joined", "topic": self.topic, "members": self.room.nicks()})
        if isinstance(resume_after, int) and not isinstance(resume_after, bool):
            for missed in self.room.after(resume_after):  # missed while away
                conn.send(self.room.public(missed))
        elif self.cfg.history.on_join:
            conn.send({"type": "history", "topic": self.topic, "on_join": True,
                       "messages": self.room.recent(self.cfg.history.on_join)})
        self.announce({"type": "join", "sid": session.sid, "nick": session.nick},
                      session.nick, "joined", skip=session.sid)
        if isinstance(msg.get("notice"), str):
            conn.send({"type": "notice", "text": msg["notice"]})
        self.log.info("client_joined", session=session.sid, nick=session.nick,
                      came_from=msg.get("from"), pending_bytes=len(pending))
        conn.start(pending)
        self._background(self._tell_router(
            {"op": "session_at", "sid": session.sid, "nick": session.nick, "topic": self.topic}
        ))
        return ok()

    def _remove(self, conn: ClientConn, reason: str) -> bool:
        sid = conn.session.sid
        if self.conns.get(sid) is not conn:
            return False
        del self.conns[sid]
        self.keeper.drop(sid)
        if self.closing:
            return False  # a shutdown is not a departure: members come back after restart
        self.room.remove(sid)
        self.announce({"type": "leave", "sid": sid}, conn.session.nick, "left", reason)
        self.log.info("client_left", session=sid, nick=conn.session.nick, reason=reason)
        return True

    def lost(self, conn: ClientConn, reason: str) -> None:
        if self._remove(conn, reason):
            self._background(self._tell_router(
                {"op": "session_end", "sid": conn.session.sid, "reason": reason}
            ))

    # -- what members say and ask ------------------------------------------------------------

    def cmd_me(self, conn: ClientConn, cmd: Command) -> Pending:
        return self.say(conn, cmd.text, action=True)

    def say(self, conn: ClientConn, text: str, action: bool = False) -> Pending:
        if not text:
            return None
        sid = conn.session.sid
        msg = self.room.post(sid, text, time.time(), action=action, sender=sid)
        # Fan out, and acknowledge, only what the log holds (group commit).
        durable = self._logged(self.room.record_of(msg))
        durable.add_done_callback(lambda f: self._fan_out(f, msg, sid))
        if conn.session.json:
            ack = {"type": "sent", "topic": self.topic, "seq": msg["seq"]}
            durable.add_done_callback(lambda f: self._ack(f, sid, ack))
        return None

    def _ack(self, durable: asyncio.Future[None], sid: str, ack: Event) -> None:
        conn = self.conns.get(sid)
        if conn is not None and not durable.cancelled() and durable.exception() is None:
            conn.send(ack)

    def cmd_who(self, conn: ClientConn, cmd: Command) -> Pending:
        if cmd.arg and fold(cmd.arg) != fold(self.topic):
            return self._ask_router(conn, {"op": "who", "topic": cmd.arg})
        conn.send({"type": "who", "topic": self.topic, "members": self.room.nicks()})
        return None

    async def _ask_router(self, conn: ClientConn, msg: Message, timeout: float = 2.0) -> None:
        """Commands the router answers (it owns topics, nicks and operators): its reply
        carries the event to show, or an error."""
        reply = await control.request(self.router_ctl, {**msg, "sid": conn.session.sid,
                                                        "nick": conn.session.nick,
                                                        "oper": conn.session.oper},
                                      timeout=timeout)
        self.show(conn, reply)

    def cmd_history(self, conn: ClientConn, cmd: Command) -> Pending:
        return self._history(conn, cmd.number or DEFAULT_HISTORY_LINES)

    async def _history(self, conn: ClientConn, n: int) -> None:
        await self.journal.caught_up()  # what this client just said is part of it
        conn.send({"type": "history", "topic": self.topic, "messages": self.room.recent(n)})

    def cmd_topics(self, conn: ClientConn, cmd: Command) -> Pending:
        return self._topics(conn)

    async def _topics(self, conn: ClientConn) -> None:
        reply = control.check(await control.request(self.router_ctl, {"op": "topics"}))
        conn.send({"type": "topics", "topics": reply["topics"]})

    def cmd_nick(self, conn: ClientConn, cmd: Command) -> Pending:
        return self._nick(conn, cmd.arg)

    async def _nick(self, conn: ClientConn, nick: str) -> None:
        reply = await control.request(
            self.router_ctl, {"op": "nick", "sid": conn.session.sid, "nick": nick}
        )
        if self.failed(conn, reply):
            return
        if conn.session.sid not in self.conns:
            return  # left while we asked
        old = self.room.rename(conn.session.sid, nick)
        conn.session.nick = nick
        self.announce({"type": "nick", "sid": conn.session.sid, "nick": nick}, nick, "renamed",
                      skip=conn.session.sid, old=old)
        kept = self.session_changed(conn)
        if kept is not None:
            await self.keeper.settled(kept)
        conn.send({"type": "ok", "cmd": "nick", "nick": nick, "text": f"you are now {nick}"})

    def cmd_msg(self, conn: ClientConn, cmd: Command) -> Pending:
        member = self.room.find(cmd.arg)
        if member is not None:
            self.conns[member.sid].send(
                self.dm_event(conn.session.nick, member.nick, cmd.text, time.time())
            )
            self.dm_sent(conn, member.nick)
            return None
        return self._dm(conn, cmd.arg, cmd.text)

    async def _dm(self, conn: ClientConn, to: str, text: str) -> None:
        reply = await control.request(
            self.router_ctl, {"op": "dm", "from": conn.session.nick, "to": to, "text": text}
        )
        if not self.failed(conn, reply):
            self.dm_sent(conn, str(reply.get("to", to)))

    def cmd_join(self, conn: ClientConn, cmd: Command) -> Pending:
        if fold(cmd.arg) == fold(self.topic):
            conn.send({"type": "error", "code": "already_here",
                       "text": f"you are already in {self.topic}"})
            return None
        return self._join(conn, cmd.arg)

    async def _join(self, conn: ClientConn, name: str) -> None:
        reply = control.check(await control.request(self.router_ctl, {"op": "topics"}))
        names = [str(t) for t in reply.get("names", [])]
        topic = next((t for t in names if fold(t) == fold(name)), None)
        if topic is None:
            conn.send({"type": "error", "code": "no_such_topic",
                       "text": f"no topic {name}; topics: {', '.join(names)}"})
            return
        await self._move(conn, self.d.paths.control(holder(topic).name), topic)

    def cmd_create(self, conn: ClientConn, cmd: Command) -> Pending:
        return self._create(conn, cmd.arg)

    async def _create(self, conn: ClientConn, name: str) -> None:
        reply = await control.request(
            self.router_ctl, {"op": "create_topic", "topic": name, "nick": conn.session.nick},
            timeout=10.0)
        if self.failed(conn, reply):
            return
        topic = str(reply["topic"])
        conn.send({"type": "ok", "cmd": "create", "topic": topic,
                   "text": f"topic {topic} created; you are its operator"})
        await self._move(conn, self.d.paths.control(holder(topic).name), topic)

    def cmd_oper(self, conn: ClientConn, cmd: Command) -> Pending:
        return self._oper(conn, cmd.arg, cmd.text)

    async def _oper(self, conn: ClientConn, name: str, password: str) -> None:
        reply = await control.request(self.router_ctl, {
            "op": "oper", "sid": conn.session.sid, "name": name, "password": password})
        if not self.failed(conn, reply):
            await self.became_oper(conn)

    def is_op(self, conn: ClientConn) -> bool:
        return conn.session.oper or self.room.is_op(conn.session.nick)

    def _not_op(self, conn: ClientConn, what: str) -> None:
        conn.send({"type": "error", "code": "not_operator",
                   "text": f"only operators of {self.topic} can {what}"})

    def cmd_kick(self, conn: ClientConn, cmd: Command) -> Pending:
        if not self.is_op(conn):
            self._not_op(conn, "kick")
            return None
        member = self.room.find(cmd.arg)
        if member is None:
            conn.send({"type": "error", "code": "no_such_nick",
                       "text": f"{cmd.arg} is not in {self.topic}"})
            return None
        return self._kick(conn, self.conns[member.sid], cmd.text)

    async def _kick(self, by: ClientConn, target: ClientConn, reason: str) -> None:
        who, sid = target.session.nick, target.session.sid
        why = f": {reason}" if reason else ""
        notice = f"you were kicked from {self.topic} by {by.session.nick}{why}"
        target.pause()  # its unread lines stay in the socket for the lobby
        moved = await self._move(target, self.router_ctl, None, notice=notice,
                                 kicked_by=by.session.nick, reason=reason)
        if not moved:
            by.send({"type": "error", "code": "unavailable",
                     "text": f"could not move {who} out right now; try again"})
            return
        self.log.info("client_kicked", session=sid, nick=who, by=by.session.nick, reason=reason)
        by.send({"type": "ok", "cmd": "kick", "nick": who, "text": f"{who} was kicked"})

    def cmd_ban(self, conn: ClientConn, cmd: Command) -> Pending:
        if not self.is_op(conn):
            self._not_op(conn, "ban")
            return None
        return self._ban(conn, cmd.arg)

    async def _ban(self, by: ClientConn, nick: str) -> None:
        self.room.apply({"type": "ban", "nick": nick})
        await self._logged({"type": "ban", "nick": nick, "by": by.session.nick})
        self.log.info("client_banned", nick=nick, by=by.session.nick)
        member = self.room.find(nick)
        if member is not None and member.sid in self.conns:
            await self._kick(by, self.conns[member.sid], "banned")
        by.send({"type": "ok", "cmd": "ban", "nick": nick,
                 "text": f"{nick} is banned from {self.topic}"})

    def cmd_drop(self, conn: ClientConn, cmd: Command) -> Pending:
        # Dropping waits for the topic's members to move and its daemons to stop.
        return self._ask_router(conn, {"op": "drop_topic", "topic": cmd.arg,
                                       "op_here": self.is_op(conn)
                                       and fold(cmd.arg) == fold(self.topic)}, timeout=30.0)

    async def evacuate(self, notice: str) -> int:
        """The topic is being dropped: everyone goes back to the lobby, told why."""
        moved = 0
        for conn in list(self.conns.values()):
            conn.pause()
            if await self._move(conn, self.router_ctl, None, notice=notice):
                moved += 1
        return moved

    def cmd_resume(self, conn: ClientConn, cmd: Command) -> Pending:
        conn.send({"type": "error", "code": "not_in_lobby",
                   "text": "/resume is for a new connection, from the lobby"})
        return None

    def cmd_leave(self, conn: ClientConn, cmd: Command) -> Pending:
        return self._leave(conn)

    async def _leave(self, conn: ClientConn) -> None:
        await self._move(conn, self.router_ctl, None)

    async def _move(self, conn: ClientConn, target: Path, topic: str | None,
                    notice: str | None = None, kicked_by: str | None = None,
                    reason: str = "") -> bool:
        """Pass the member on to another topic's server, or back to the lobby."""
        sid, nick = conn.session.sid, conn.session.nick
        # Out of the fan-out first: what we wrote during the move would be lost with our
        # copy of the socket. The log hears of it only once the move happened.
        self.conns.pop(sid, None)
        self.room.remove(sid)
        op: Message = {"op": "adopt", "from": self.topic}
        if notice:
            op["notice"] = notice
        try:
            await conn.hand_over(target, op, self.d.paths.witness(topic))
        except ControlError as e:
            self.room.add(sid, nick)
            self.conns[sid] = conn
            where = topic or "the lobby"
            self.log.warning("handoff_failed", session=sid, to=topic, error=str(e))
            conn.send(handoff_error(e, f"cannot move you to {where} right now; try again"))
            conn.resume()
            return False
        self.keeper.drop(sid)
        if kicked_by is not None:
            self.announce({"type": "kick", "sid": sid, "nick": nick, "by": kicked_by,
                           "reason": reason}, nick, "kicked", reason or None, by=kicked_by)
        else:
            why = f"went to {topic}" if topic else "went to the lobby"
            self.announce({"type": "leave", "sid": sid}, nick, "left", why)
        self.log.info("handoff", session=sid, nick=nick, to=topic)
        return True

    # -- control requests ------------------------------------------------------------------

    async def on_control(self, msg: Message, fds: list[int]) -> Message:
        op = msg["op"]
        if op == "status":
            return ok(daemon=self.d.status(), members=len(self.conns),
                      next_seq=self.room.next_seq)
        if op == "adopt":
            return await self.adopt(msg, fds)
        if op == "members":
            return ok(members=self.room.member_list())
        if op == "evacuate":
            return ok(moved=await self.evacuate(str(msg.get("notice", ""))))
        if op == "drop":  # the router gave this session to a newer connection
            conn = self.conns.get(str(msg.get("sid")))
            if conn is not None:
                self._remove(conn, "resumed elsewhere")
                conn.send({"type": "notice", "text": "this session was resumed elsewhere"})
                conn.close("resumed elsewhere")
            return ok(dropped=conn is not None)
        if op == "fd_resync":
            items = [(sid, c.fileno(), c.session.record()) for sid, c in self.conns.items()]
            return ok(count=fdstore.resync(self.keeper, lambda: items))
        if op == "deliver":
            conn = self.conns.get(str(msg.get("sid")))
            event = msg.get("event")
            if conn is None or not isinstance(event, dict):
                return fail("no_such_nick", "that person just left")
            conn.send(event)
            return ok(to=conn.session.nick)
        return fail("unknown_op", f"unknown op {op!r}")


async def main_async(d: Daemon) -> None:
    await Server(d).run()


def main(argv: list[str] | None = None) -> int:
    return daemon.run(Role.SERVER, main_async, argv)


if __name__ == "__main__":
    sys.exit(main())
