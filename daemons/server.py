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

from daemons import control, daemon, fdstore
from daemons.clientconn import ClientConn, Session, attach
from daemons.commands import CommandHandler, Pending, handoff_error
from daemons.control import Message, fail, ok
from daemons.daemon import Daemon
from daemons.errors import ControlError, TheyChatError
from daemons.fdstore import FdKeeper
from daemons.journal import Journal
from daemons.protocol import Command, fold
from daemons.render import Event, encode_json, encode_text
from daemons.room import Room

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
        self.keeper = FdKeeper(d.paths.control(f"server-monitor@{d.topic}"), d.log)
        self.journal: Journal
        self.closing = False  # shutting down: connections end, but nobody left

    @property
    def router_ctl(self) -> Path:
        return self.d.paths.control("router")

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
        ctl = control.ControlServer(d.paths.control(d.name), self.on_control, self.log)
        await self.restore_sockets()
        self.reconcile(in_log)
        # Only now: a line sent during the outage must reach every member, so none may
        # be handled before all are back.
        for conn in list(self.conns.values()):
            conn.start()
        self.keeper.start()
        await ctl.start()
        self._background(self._tell_router(
            {"op": "server_hello", "topic": self.topic, "members": self.members()}
        ))
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
        for _key, fd, meta in items:
            try:
                session = Session.from_record(meta)
            except ControlError:
                os.close(fd)
                continue
            conn = await attach(self, session, fd, self.cfg.clients, self.log)
            self.conns[session.sid] = conn
            if session.sid not in self.room.members:  # joined just before the crash
                self.room.add(session.sid, session.nick)
                self._logged({"type": "join", "sid": session.sid, "nick": session.nick})
        self.log.info("fds_restored", count=len(items))

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

    def session_changed(self, conn: ClientConn) -> asyncio.Future[bool] | None:
        return self.keeper.store(conn.session.sid, None, conn.session.record())

    def members(self) -> list[dict[str, str]]:
        return [{"sid": m.sid, "nick": m.nick} for m in self.room.members.values()]

    # -- fan-out ---------------------------------------------------------------------

    def broadcast(self, event: Event, skip: str | None = None) -> None:
        """Send one event to every member but `skip`, encoded once per mode."""
        encoded: dict[bool, bytes] = {}
        for sid, conn in list(self.conns.items()):
            if sid == skip:
                continue
            mode = conn.session.json
            data = encoded.get(mode)
            if data is None:
                data = encoded[mode] = encode_json(event) if mode else encode_text(event)
            conn.write(data)

    def announce(self, rec: dict[str, Any], nick: str, what: str, reason: str | None = None,
                 skip: str | None = None, **extra: Any) -> None:
        """Log a membership change; tell the others once it is durable. Durability comes
        in log order, so nobody's departure overtakes what they said just before it."""
        event: Event = {"type": "presence", "topic": self.topic, "nick": nick, "event": what,
                        **extra}
        if reason:
            event["reason"] = reason
        self._logged(rec).add_done_callback(lambda f: self._fan_out(f, event, skip))

    def _fan_out(self, durable: asyncio.Future[None], event: Event, skip: str | None) -> None:
        if not durable.cancelled() and durable.exception() is None:
            self.broadcast(event, skip=skip)

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
        conn = await attach(self, session, fds.pop(), self.cfg.clients, self.log)
        self.room.add(session.sid, session.nick)
        self.conns[session.sid] = conn
        # Reply (and so let the sender drop its copy) only once our monitor has one.
        await self.keeper.settled(self.keeper.store(session.sid, conn.fileno(), session.record()))
        self.log.info("client_joined", session=session.sid, nick=session.nick,
                      came_from=msg.get("from"), pending_bytes=len(pending))
        conn.send({"type": "joined", "topic": self.topic, "members": self.room.nicks()})
        if isinstance(resume_after, int) and not isinstance(resume_after, bool):
            # Missed while away: everything after the client's last seq, then live.
            for missed in self.room.after(resume_after):
                conn.send(missed)
        self.announce({"type": "join", "sid": session.sid, "nick": session.nick},
                      session.nick, "joined", skip=session.sid)
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

    def say(self, conn: ClientConn, text: str) -> Pending:
        if not text:
            return None
        sid = conn.session.sid
        msg = self.room.post(sid, text, time.time())
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
        conn.send({"type": "who", "topic": self.topic, "members": self.room.nicks()})
        return None

    def cmd_history(self, conn: ClientConn, cmd: Command) -> Pending:
        n = cmd.number or DEFAULT_HISTORY_LINES
        conn.send({"type": "history", "topic": self.topic, "messages": self.room.recent(n)})
        return None

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
        if not reply.get("ok"):
            conn.send({"type": "error", "code": reply.get("code", "error"),
                       "text": str(reply.get("error"))})
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
        if reply.get("ok"):
            self.dm_sent(conn, str(reply.get("to", to)))
        else:
            conn.send({"type": "error", "code": reply.get("code", "error"),
                       "text": str(reply.get("error"))})

    def cmd_join(self, conn: ClientConn, cmd: Command) -> Pending:
        if fold(cmd.arg) == fold(self.topic):
            conn.send({"type": "error", "code": "already_here",
                       "text": f"you are already in {self.topic}"})
            return None
        topic = next((t for t in self.cfg.topics if fold(t) == fold(cmd.arg)), None)
        if topic is None:
            conn.send({"type": "error", "code": "no_such_topic",
                       "text": f"no topic {cmd.arg}; topics: {', '.join(self.cfg.topics)}"})
            return None
        return self._move(conn, self.d.paths.control(f"server@{topic}"), topic)

    def cmd_resume(self, conn: ClientConn, cmd: Command) -> Pending:
        conn.send({"type": "error", "code": "not_in_lobby",
                   "text": "/resume is for a new connection, from the lobby"})
        return None

    def cmd_leave(self, conn: ClientConn, cmd: Command) -> Pending:
        return self._move(conn, self.router_ctl, None)

    async def _move(self, conn: ClientConn, target: Path, topic: str | None) -> None:
        """Pass the member on to another topic's server, or back to the lobby."""
        sid, nick = conn.session.sid, conn.session.nick
        # Out of the fan-out first: what we wrote during the move would be lost with our
        # copy of the socket. The log hears of it only once the move happened.
        self.conns.pop(sid, None)
        self.room.remove(sid)
        try:
            await conn.hand_over(target, {"op": "adopt", "from": self.topic})
        except ControlError as e:
            self.room.add(sid, nick)
            self.conns[sid] = conn
            where = topic or "the lobby"
            self.log.warning("handoff_failed", session=sid, to=topic, error=str(e))
            conn.send(handoff_error(e, f"cannot move you to {where} right now; try again"))
            return
        self.keeper.drop(sid)
        reason = f"went to {topic}" if topic else "went to the lobby"
        self.announce({"type": "leave", "sid": sid}, nick, "left", reason)
        self.log.info("handoff", session=sid, nick=nick, to=topic)

    # -- control requests ------------------------------------------------------------------

    async def on_control(self, msg: Message, fds: list[int]) -> Message:
        op = msg["op"]
        if op == "status":
            return ok(daemon=self.d.status(), members=len(self.conns),
                      next_seq=self.room.next_seq)
        if op == "adopt":
            return await self.adopt(msg, fds)
        if op == "members":
            return ok(members=self.members())
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
    if d.topic is None or d.topic not in d.cfg.topics:
        raise TheyChatError(f"--topic: expected one of {', '.join(d.cfg.topics)}")
    await Server(d).run()


def main(argv: list[str] | None = None) -> int:
    return daemon.run("server", main_async, argv)


if __name__ == "__main__":
    sys.exit(main())
