"""The lobby: where a new connection lands, what people can do there, and the directory
services the topic servers ask the router for (nicks, direct messages, operators).

A connection is greeted only once the router-monitor holds a copy of its socket (a
router restart then cannot lose it). `/join` moves the socket itself to the topic's
server (`handoff.Sockets.move`); `/leave`, a kick or a dropped topic bring it back
(`adopt`). People's facts are in the directory (`directory.py`); connections hold only
their session id.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Coroutine
from typing import Any

from theychat.daemons import ops, passwords, render
from theychat.daemons.clientconn import ClientConn, set_keepalive
from theychat.daemons.commands import MOVE_RETRY_S, Commands, Conn, Pending, handoff_error
from theychat.daemons.config import Config
from theychat.daemons.control import Message, check, fail, ok
from theychat.daemons.directory import Directory, NickTaken, Session
from theychat.daemons.errors import ControlError, TheyChatError
from theychat.daemons.handoff import Sockets
from theychat.daemons.peers import Peers
from theychat.daemons.protocol import Command, fold
from theychat.daemons.topics import Topics
from theychat.daemons.tree import holder

# Checked against when /oper names no operator, so a wrong name costs as long as a wrong
# password (no timing oracle for operator names).
UNKNOWN_OPERATOR_HASH = passwords.make("no operator has this password")


class Lobby(Commands):
    sockets: Sockets

    def __init__(self, directory: Directory, topics: Topics, sockets: Sockets, peers: Peers,
                 cfg: Config, log: Any) -> None:
        self.dir = directory
        self.topics = topics
        self.sockets = sockets
        self.peers = peers
        self.cfg = cfg
        self.log = log
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closing = False  # shutting down: connections end, sessions stay
        self.cut_off = False  # cluster mode: our host lost the cluster (no newcomers)

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def nick(self, sid: str) -> str:
        s = self.dir.session(sid)
        return s.nick if s else "?"

    # -- arriving and leaving ---------------------------------------------------------------

    def new_conn(self) -> ClientConn:
        """A connection accepted on the client port (greeted once it is made)."""
        return ClientConn(self, secrets.token_hex(8), self.cfg.clients, self.log,
                          on_made=self._made)

    def _made(self, conn: ClientConn) -> None:
        limits = self.cfg.clients
        if self.cut_off:
            self._refuse(conn, "lost the cluster", "this host lost the cluster; connect to "
                                                   "another host")
            return
        if len(self.dir.sessions()) >= limits.max_connections:
            self._refuse(conn, "server full", "server full; try again later")
            return
        if self.dir.connected_from(conn.addr) >= limits.max_per_address:
            self._refuse(conn, "too many from this address",
                         "too many connections from your address; try again later")
            return
        assert conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # not on a TLS bridge's Unix socket
                set_keepalive(sock, self.cfg.clients)
        self.background(self._welcome(conn))

    def _refuse(self, conn: ClientConn, reason: str, text: str) -> None:
        conn.write(f"! {text}\n".encode())
        conn.close(reason)
        self.log.warning("client_refused", reason=reason, peer=conn.peer)

    async def _welcome(self, conn: ClientConn) -> None:
        try:
            session = await self.dir.open_session(conn.sid, conn.addr)
        except TheyChatError as e:  # etcd does not answer (cluster mode): not here, then
            self._refuse(conn, "no directory", "this host cannot take you now (it lost the "
                         "cluster); try another host")
            self.log.warning("command_unavailable", session=conn.sid, error=str(e))
            return
        kept = self.sockets.hold(conn)
        self.log.info("client_connected", session=conn.sid, nick=session.nick, peer=conn.peer)
        # Greet only once our monitor holds the socket: from then on a router restart
        # cannot lose this person.
        await self.sockets.keeper.settled(kept)
        conn.send({"type": "hello", "session": conn.sid, "nick": session.nick})
        conn.start()

    def lost(self, conn: Any, reason: str) -> None:
        if self.closing or not self.sockets.lost(conn):
            return  # moved, or its session was taken over by a newer connection
        self.log.info("client_left", session=conn.sid, nick=self.nick(conn.sid), reason=reason)
        self.background(self.left(conn.sid, reason))

    async def left(self, sid: str, reason: str) -> bool:
        """A connection ended: /quit ends the session, anything else keeps it resumable.
        False if the directory does not know the session."""
        if reason == "quit":
            return await self.dir.end(sid) is not None
        return await self.dir.detach(sid) is not None

    async def adopt(self, op: ops.Adopt, fds: list[int]) -> Message:
        """A server passes a person back to the lobby (`/leave`, a kick, a dropped topic,
        a topic given up on)."""
        conn = await self.sockets.adopt(op, fds)
        sid = conn.sid
        if self.dir.session(sid) is None:
            # Only after a router restart lost track of this session: keep the person.
            await self.dir.register(sid, f"guest{secrets.randbelow(90000) + 10000}", None)
        await self.dir.move(sid, None)
        self.log.info("handoff", session=sid, nick=self.nick(sid), to=None,
                      came_from=op.came_from)
        conn.send({"type": "left", "topic": op.came_from})
        if op.notice:
            conn.send({"type": "notice", "text": op.notice})
        conn.start(op.pending_bytes())
        return ok()

    # -- what people say and ask in the lobby ----------------------------------------------

    def say(self, conn: Conn, text: str, line: int | None = None) -> Pending:
        topics = ", ".join(self.dir.topics)
        conn.send(render.error("in_lobby", f"you are in the lobby: /join a topic to talk "
                                           f"({topics})", line=line))
        return None

    def _in_lobby(self, conn: Conn, what: str) -> Pending:
        conn.send(render.error("not_in_topic", f"you are in the lobby: /join a topic to {what}"))
        return None

    def cmd_me(self, conn: Conn, cmd: Command) -> Pending:
        return self._in_lobby(conn, "talk")

    def cmd_kick(self, conn: Conn, cmd: Command) -> Pending:
        return self._in_lobby(conn, "kick someone from it")

    def cmd_ban(self, conn: Conn, cmd: Command) -> Pending:
        return self._in_lobby(conn, "ban someone from it")

    def cmd_history(self, conn: Conn, cmd: Command) -> Pending:
        conn.send(render.error("not_in_topic", "you are in the lobby: /join a topic first"))
        return None

    def cmd_leave(self, conn: Conn, cmd: Command) -> Pending:
        conn.send(render.error("not_in_topic", "you are in the lobby"))
        return None

    def cmd_nick(self, conn: Conn, cmd: Command) -> Pending:
        return self._nick(conn, cmd.arg)

    async def _nick(self, conn: Conn, nick: str) -> None:
        if not self.failed(conn, await self.rename(ops.Rename(sid=conn.sid, nick=nick))):
            self.nick_ok(conn, nick)

    async def rename(self, op: ops.Rename) -> Message:
        if self.dir.session(op.sid) is None:
            return fail("no_session", "unknown session")
        try:
            old = await self.dir.rename(op.sid, op.nick)
        except NickTaken:
            return fail("nick_taken", f"the nick {op.nick} is taken")
        self.log.info("nick_changed", session=op.sid, old=old, nick=op.nick)
        return ok(old=old)

    def cmd_topics(self, conn: Conn, cmd: Command) -> Pending:
        conn.send({"type": "topics", "topics": self.topics.listing()})
        return None

    def cmd_join(self, conn: Conn, cmd: Command) -> Pending:
        topic = self.dir.topic_named(cmd.arg)
        if topic is None:
            conn.send(render.error("no_such_topic", f"no topic {cmd.arg}; topics: "
                                                    f"{', '.join(self.dir.topics)}"))
            return None
        if topic in self.topics.unavailable:
            conn.send(render.error("unavailable",
                                   f"topic {topic} is unavailable: its server keeps failing"))
            return None
        # Its server may be starting (a topic just made on another host) or restarting.
        return self.move_to(conn, topic, patience=self.join_patience)

    @property
    def join_patience(self) -> float:
        return self.cfg.supervision.start_timeout_ms / 1000

    async def move_to(self, conn: Any, topic: str, resume_after: int | None = None,
                      resumed: bool = False, patience: float = 0.0) -> None:
        """Hand the person to the topic's server; for `patience` seconds a server that
        cannot be reached (it is restarting) is asked again."""
        sid = conn.sid
        deadline = time.monotonic() + patience
        while True:
            try:
                await self.sockets.move(conn, topic, ops.Adopt(session=conn.record(),
                                                               resume_after=resume_after,
                                                               resumed=resumed))
                break
            except ControlError as e:
                if e.code == "unavailable" and time.monotonic() < deadline \
                        and topic not in self.topics.unavailable and not conn.close_reason:
                    await asyncio.sleep(MOVE_RETRY_S)
                    continue
                self.log.warning("handoff_failed", session=sid, to=topic, error=str(e))
                conn.send(handoff_error(e, f"topic {topic} is unavailable right now; "
                                           "try again"))
                return
        await self.dir.move(sid, topic)
        self.log.info("handoff", session=sid, nick=self.nick(sid), to=topic)

    def cmd_create(self, conn: Conn, cmd: Command) -> Pending:
        return self._create(conn, cmd.arg)

    async def _create(self, conn: Conn, name: str) -> None:
        reply = await self.topics.create(name, self.nick(conn.sid))
        if self.failed(conn, reply):
            return
        topic = str(reply["topic"])
        self.created(conn, topic)
        await self.move_to(conn, topic)

    def cmd_oper(self, conn: Conn, cmd: Command) -> Pending:
        return self._oper(conn, cmd.arg, cmd.text)

    async def _oper(self, conn: Conn, name: str, password: str) -> None:
        if not self.failed(conn, await self.oper(ops.Oper(sid=conn.sid, user=name,
                                                          password=password))):
            self.now_oper(conn)

    async def oper(self, op: ops.Oper) -> Message:
        entry = next((o for o in self.cfg.operators if fold(o.name) == fold(op.user)), None)
        # The hash is checked even for an unknown name, so timing does not tell names.
        stored = entry.password_hash if entry else UNKNOWN_OPERATOR_HASH
        loop = asyncio.get_running_loop()
        good = await loop.run_in_executor(None, passwords.verify, op.password, stored)
        if entry is None or not good:
            self.log.warning("oper_failed", session=op.sid, name=op.user)
            return fail("bad_password", "wrong operator name or password")
        await self.dir.grant_oper(op.sid)
        self.log.info("oper_granted", session=op.sid, name=entry.name)
        return ok()

    def cmd_drop(self, conn: Conn, cmd: Command) -> Pending:
        return self._drop(conn, cmd.arg)

    async def _drop(self, conn: Conn, name: str) -> None:
        self.show(conn, await self.topics.drop(name, conn.sid, op_here=False))

    def cmd_who(self, conn: Conn, cmd: Command) -> Pending:
        if cmd.arg:
            return self._who_there(conn, cmd.arg)
        nicks = sorted((self.nick(c.sid) for c in self.sockets), key=str.lower)
        conn.send({"type": "who", "topic": None, "members": nicks})
        return None

    async def _who_there(self, conn: Conn, topic: str) -> None:
        self.show(conn, await self.topics.who(topic))

    def cmd_msg(self, conn: Conn, cmd: Command) -> Pending:
        return self._dm(conn, cmd.arg, cmd.text)

    async def _dm(self, conn: Conn, to: str, text: str) -> None:
        reply = await self.deliver_dm(ops.Dm(sid=conn.sid, to=to, text=text))
        if not self.failed(conn, reply):
            self.dm_sent(conn, reply["to"])

    async def deliver_dm(self, op: ops.Dm) -> Message:
        target = self.dir.find_nick(op.to)
        if target is None:
            return fail("no_such_nick", f"no one is called {op.to}")
        event = self.dm_event(self.nick(op.sid), target.nick, op.text, time.time())
        deliver = ops.Deliver(sid=target.sid, event=event)
        if target.topic is None and target.host == self.dir.host:
            return self.deliver_here(deliver)
        try:
            reply = await self.peers.ask(holder(target.topic), deliver, host=target.host)
        except ControlError:
            return fail("unavailable", f"{target.nick} cannot be reached right now")
        return ok(to=target.nick) if reply.get("ok") else reply

    def deliver_here(self, op: ops.Deliver) -> Message:
        """A direct message for someone in our lobby."""
        conn = self.sockets.get(op.sid)
        if conn is None:
            return fail("no_such_nick", "that person just left")
        conn.send(op.event)
        return ok(to=self.nick(op.sid))

    def drop_session(self, op: ops.DropSession) -> Message:
        """Another host's connection took this lobby session over."""
        old = self.sockets.get(op.sid)
        if old is not None:
            self.sockets.lost(old)
            old.send({"type": "notice", "text": "this session was resumed elsewhere"})
            old.close("resumed elsewhere")
        return ok(dropped=old is not None)

    def lost_cluster(self, notice: str) -> None:
        """Our host is cut off: every lobby client goes (our monitor's copies too), and
        new ones are turned away until it is back (`cut_off`)."""
        self.cut_off = True
        for conn in self.sockets:
            self.sockets.lost(conn)
            conn.send({"type": "notice", "text": notice})
            conn.close("lost the cluster")

    # -- resuming a session -----------------------------------------------------------------

    def cmd_resume(self, conn: Conn, cmd: Command) -> Pending:
        target = self.dir.session(cmd.arg)
        if target is None or target.sid == conn.sid:
            conn.send(render.error("no_such_session",
                                   f"no session {cmd.arg} to resume (sessions expire after "
                                   f"{self.cfg.sessions.expiry_s}s)"))
            return None
        return self._resume(conn, target, cmd.number)

    async def _take_over(self, s: Session) -> bool:
        """The newest connection holding a session's (secret) id wins: the old one may be
        a dead TCP connection nobody noticed yet. False if its holder cannot be asked."""
        if s.detached_at is not None:
            return True
        if s.topic is None and s.host == self.dir.host:
            self.drop_session(ops.DropSession(sid=s.sid))
            return True
        try:
            check(await self.peers.ask(holder(s.topic), ops.DropSession(sid=s.sid),
                                       host=s.host))
        except ControlError:
            return s.host != self.dir.host  # another host's: taken over all the same
        return True

    async def _resume(self, conn: Any, s: Session, last_seq: int | None) -> None:
        if not await self._take_over(s):
            conn.send(render.error("session_busy",
                                   f"session {s.sid} is held by {s.topic}, which is "
                                   "restarting; try again in a moment"))
            return
        fresh = conn.sid
        self.sockets.lost(conn)
        await self.dir.end(fresh)
        conn.sid = s.sid
        target = s.topic  # in the lobby until the move there succeeds
        await self.dir.attach(s.sid, conn.addr)
        await self.sockets.keeper.settled(self.sockets.hold(conn))
        self.log.info("session_resumed", session=s.sid, nick=s.nick, topic=target)
        conn.send({"type": "resumed", "session": s.sid, "nick": s.nick, "topic": target})
        if target is not None and target not in self.topics.unavailable:
            # Its server may be restarting (it died with its monitor, say): wait for it.
            await self.move_to(conn, target, resume_after=last_seq, resumed=True,
                               patience=self.join_patience)

    # -- what topic servers tell the directory ----------------------------------------------

    async def session_at(self, op: ops.SessionAt) -> Message:
        try:
            await self.dir.register(op.sid, op.nick, op.topic)
        except NickTaken:
            return fail("nick_taken", f"the nick {op.nick} is taken")
        return ok()

    async def session_end(self, op: ops.SessionEnd) -> Message:
        return ok(known=await self.left(op.sid, op.reason))

    def session_info(self, op: ops.SessionInfo) -> Message:
        s = self.dir.session(op.sid)
        if s is None:
            return fail("no_session", "unknown session")
        return ok(nick=s.nick, topic=s.topic, oper=s.oper)

    def locate(self, op: ops.Locate) -> Message:
        """Where the directory places these sessions: a topic, '' for the lobby; with
        their nicks. Sessions it does not know are left out."""
        found = {}
        for sid in op.sids:
            s = self.dir.session(sid)
            if s is not None:
                found[sid] = {"topic": s.topic or "", "nick": s.nick}
        return ok(sessions=found)

    async def expire(self, s: Session) -> None:
        await self.dir.release_expired(s)
        if s.host == self.dir.host:  # every router hears it; the one that had it says so
            self.log.info("session_expired", session=s.sid, nick=s.nick)

    async def close(self) -> None:
        """A shutdown is not a departure: the sessions stay as they are, and the next
        start keeps them resumable (the monitor's copies were let go of already)."""
        self.closing = True
        for conn in self.sockets:
            conn.send({"type": "notice", "text": "the router is shutting down"})
            conn.close("server shutdown")
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
