"""The router: the one client port, the lobby, the directory of topics and nicks, and the
supervisor of the router-monitor and of every server-monitor.

Once a client joins a topic its socket belongs to that topic's server; the router is
off the data path of conversations and only answers directory questions (nick
changes, direct messages to people elsewhere, topic counts).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any

from theychat.daemons import control, daemon, fdstore, passwords
from theychat.daemons.clientconn import ClientConn, Session, attach, set_keepalive
from theychat.daemons.commands import CommandHandler, Pending, handoff_error
from theychat.daemons.control import Message, fail, ok
from theychat.daemons.daemon import Daemon
from theychat.daemons.directory import Directory, NickTaken, SessionInfo
from theychat.daemons.errors import ControlError, TheyChatError
from theychat.daemons.fdstore import FdKeeper
from theychat.daemons.journal import Journal
from theychat.daemons.protocol import Command, fold, valid_name
from theychat.daemons.supervisor import Child, Supervisor
from theychat.daemons.tlsbridge import TlsBridge, server_context
from theychat.daemons.tree import Role, holder

LISTENER = "listener"  # fd store key of the client port's listening socket
# Checked against when /oper names no operator, so a wrong name costs as long as a wrong
# password (no timing oracle for operator names).
UNKNOWN_OPERATOR_HASH = passwords.make("no operator has this password")


def bind_listener(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise TheyChatError(f"listen.host: cannot resolve {host!r}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise TheyChatError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(512)
    sock.setblocking(False)
    return sock


class Router(CommandHandler):
    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.cfg = d.cfg
        self.log = d.log
        self.dir = Directory(d.cfg.topics.names)
        self.lobby: dict[str, ClientConn] = {}
        self.unavailable: set[str] = set()  # topics whose supervisor gave up
        monitor = d.id.supervisor
        assert monitor is not None
        self.keeper = FdKeeper(d.paths.control(monitor.name), d.log)
        self._tasks: set[asyncio.Task[None]] = set()
        self.listener: socket.socket | None = None
        self.sup: Supervisor
        self.journal: Journal

    def server_ctl(self, topic: str) -> Path:
        return self.d.paths.control(holder(topic).name)

    # -- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        d = self.d
        self.journal = Journal(d.paths.wal(d.name), self.cfg.wal, self.log,
                               self.dir.snapshot, d.fail)
        if self.journal.replay.snapshot is not None:
            self.dir.restore(self.journal.replay.snapshot)
        for rec in self.journal.replay.records:
            self.dir.apply(rec)
        restored = await self.take_back_sockets()
        if self.listener is None:
            self.listener = bind_listener(self.cfg.listen.host, self.cfg.listen.port)
        listener = self.listener
        ctl = control.ControlServer(d.paths.control(d.name), self.on_control, self.log)
        await ctl.start()
        await self.reconcile_all()
        for conn in restored:
            info = self.dir.sessions.get(conn.session.sid)
            if info is not None and info.topic is not None:
                # Handed to a server just before our death (our monitor had not heard
                # the drop yet): the server owns it now, so let go of our copy.
                self.keeper.drop(conn.session.sid)
                conn.detached = True
                assert conn.transport is not None
                conn.transport.abort()
                self.log.info("fd_released", session=conn.session.sid, owner=info.topic)
                continue
            self.lobby[conn.session.sid] = conn
        for info in self.dir.in_topic(None):  # lobby sessions whose socket is gone
            if info.sid not in self.lobby and info.detached_at is None:
                self._save(self.dir.detach(info.sid, time.time()))
        for conn in restored:
            conn.start()
        self._background(self._expire_sessions())
        await d.listen()
        self.sup = d.supervisor(on_gave_up=self._gave_up)
        self.keeper.start()
        self.keeper.store(LISTENER, listener.fileno(), {"kind": LISTENER})
        for child in d.id.children([]):  # the host's own: the router-monitor
            self.sup.add(d.child_spec(child))
        for topic in self.dir.topics:
            self._supervise_topic(topic)
        servers = await self._serve_clients(listener)
        d.ready(host=self.cfg.listen.host, port=listener.getsockname()[1],
                tls=self.cfg.listen.tls.enabled)
        await d.stop.wait()
        self.log.info("daemon_stopping")
        for server in servers:
            server.close()
        # A shutdown is not a departure: the log keeps these sessions as they are, and
        # the next start finds their sockets gone and keeps them resumable.
        lobby, self.lobby = self.lobby, {}
        for conn in list(lobby.values()):
            conn.send({"type": "notice", "text": "the router is shutting down"})
            conn.close("server shutdown")
        await ctl.close()
        await self.sup.close()
        await self.keeper.close()
        await self.journal.close()

    def _save(self, info: SessionInfo | None) -> None:
        if info is not None:
            self.journal.append(info.record())

    def _end(self, sid: str) -> None:
        if self.dir.close_session(sid) is not None:
            self.journal.append({"type": "end", "sid": sid})

    def _left(self, sid: str, reason: str) -> None:
        """A connection ended: /quit ends the session, anything else keeps it resumable."""
        if reason == "quit":
            self._end(sid)
        else:
            self._save(self.dir.detach(sid, time.time()))

    async def _expire_sessions(self) -> None:
        while True:
            for info in self.dir.expired(time.time(), self.cfg.sessions.expiry_s):
                self._end(info.sid)
                self.log.info("session_expired", session=info.sid, nick=info.nick)
            await asyncio.sleep(1.0)

    async def take_back_sockets(self) -> list[ClientConn]:
        """After a restart: the listening socket and the lobby's clients, from our monitor.

        Reusing the listener means no connection is refused while the router restarts:
        the kernel queues them in its backlog.
        """
        try:
            items = await self.keeper.fetch_all()
        except ControlError as e:
            self.log.info("fds_unavailable", error=str(e))
            return []
        restored = []
        for key, fd, meta in items:
            if key == LISTENER:
                sock = socket.socket(fileno=fd)
                if self.listener is None and sock.getsockname()[:2] == self._listen_addr():
                    sock.setblocking(False)
                    self.listener = sock
                else:
                    sock.close()
                continue
            try:
                session = Session.from_record(meta)
            except ControlError:
                os.close(fd)
                continue
            try:
                self._save(self.dir.register(session.sid, session.nick, None))
            except NickTaken:
                session.nick = self.dir.open_session(session.sid).nick
            restored.append(await attach(self, session, fd, self.cfg.clients, self.log))
        self.log.info("fds_restored", count=len(restored),
                      listener=self.listener is not None)
        return restored

    def _listen_addr(self) -> tuple[str, int] | None:
        """The configured client address as the kernel names it (a host name resolved)."""
        try:
            infos = socket.getaddrinfo(self.cfg.listen.host, self.cfg.listen.port,
                                       type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror:
            return None
        return (str(infos[0][4][0]), int(infos[0][4][1]))

    def _supervise_topic(self, topic: str) -> None:
        """Start (or adopt) the topic's own children of ours: its server-monitor."""
        for child in self.d.id.children([topic]):
            if child.topic == topic:
                self.sup.add(self.d.child_spec(child))

    async def _gave_up(self, child: Child) -> None:
        if child.spec.topic:
            self._topic_down(child.spec.topic)

    def _topic_down(self, topic: str) -> None:
        if topic not in self.unavailable:
            self.unavailable.add(topic)
            self.log.error("topic_unavailable", unavailable=topic)

    def topic_list(self) -> list[dict[str, object]]:
        return [{**c, "available": c["name"] not in self.unavailable} for c in self.dir.counts()]

    async def reconcile_all(self) -> None:
        """After a restart, learn who is in which topic from the servers themselves."""
        for topic in self.dir.topics:
            with contextlib.suppress(ControlError):
                reply = control.check(
                    await control.request(self.server_ctl(topic), {"op": "members"}, timeout=0.5)
                )
                self.reconcile(topic, reply.get("members", []))

    def reconcile(self, topic: str, members: list[dict[str, Any]]) -> None:
        present = set()
        for m in members:
            try:
                known = self.dir.sessions.get(str(m["sid"]))
                if known is None or known.topic != topic or known.detached_at is not None:
                    self._save(self.dir.register(str(m["sid"]), str(m["nick"]), topic))
                present.add(m["sid"])
            except (NickTaken, KeyError, TypeError):
                continue
        now = time.time()
        for info in self.dir.in_topic(topic):
            if info.sid not in present and info.detached_at is None:
                self._save(self.dir.detach(info.sid, now))

    # -- the lobby -------------------------------------------------------------------

    async def _serve_clients(self, listener: socket.socket) -> list[asyncio.Server]:
        loop = asyncio.get_running_loop()
        tls = self.cfg.listen.tls
        if not tls.enabled:
            return [await loop.create_server(self._new_conn, sock=listener)]
        assert tls.cert and tls.key
        ctx = server_context(tls.cert, tls.key)
        servers = [await loop.create_server(
            lambda: TlsBridge(self._tls_client, self.cfg.clients), sock=listener, ssl=ctx)]
        if tls.plain_port:  # plain text stays on loopback, whatever listen.host says
            plain = bind_listener("127.0.0.1", tls.plain_port)
            servers.append(await loop.create_server(self._new_conn, sock=plain))
        return servers

    def _tls_client(self, inner: socket.socket, peer: str) -> None:
        """A TLS client, as the inner end of its bridge: from here on like any other."""
        conn = self._new_conn()
        conn.peer_hint = peer
        self._background(asyncio.get_running_loop().connect_accepted_socket(
            lambda: conn, inner))

    def _new_conn(self) -> ClientConn:
        sid = secrets.token_hex(8)
        return ClientConn(self, Session(sid, "?"), self.cfg.clients, self.log,
                          on_made=self._greet)

    def _greet(self, conn: ClientConn) -> None:
        assert conn.transport is not None
        if len(self.dir.sessions) >= self.cfg.clients.max_connections:
            conn.write(b"! server full; try again later\n")
            conn.close("server full")
            self.log.warning("client_refused", reason="server full", peer=conn.peer)
            return
        with contextlib.suppress(OSError):
            set_keepalive(conn.transport.get_extra_info("socket"), self.cfg.clients)
        info = self.dir.open_session(conn.session.sid)
        self._save(info)
        conn.session.nick = info.nick
        self.lobby[conn.session.sid] = conn
        kept = self.keeper.store(conn.session.sid, conn.fileno(), conn.session.record())
        self.log.info("client_connected", session=conn.session.sid, nick=info.nick,
                      peer=conn.peer)
        self._background(self._welcome(conn, kept))

    async def _welcome(self, conn: ClientConn, kept: asyncio.Future[bool]) -> None:
        # Greet only once our monitor holds the socket: from then on a router restart
        # cannot lose this person.
        await self.keeper.settled(kept)
        conn.send({"type": "hello", "session": conn.session.sid, "nick": conn.session.nick})
        conn.start()

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def lost(self, conn: ClientConn, reason: str) -> None:
        sid = conn.session.sid
        if self.lobby.get(sid) is not conn:
            return  # moved, or its session was taken over by a newer connection
        del self.lobby[sid]
        self.keeper.drop(sid)
        self._left(sid, reason)
        self.log.info("client_left", session=sid, nick=conn.session.nick, reason=reason)

    def say(self, conn: ClientConn, text: str) -> Pending:
        topics = ", ".join(self.dir.topics)
        conn.send({"type": "error", "code": "in_lobby",
                   "text": f"you are in the lobby: /join a topic to talk ({topics})"})
        return None

    def cmd_nick(self, conn: ClientConn, cmd: Command) -> Pending:
        try:
            old = self.dir.rename(conn.session.sid, cmd.arg)
        except NickTaken:
            conn.send({"type": "error", "code": "nick_taken",
                       "text": f"the nick {cmd.arg} is taken"})
            return None
        conn.session.nick = cmd.arg
        self._save(self.dir.sessions[conn.session.sid])
        self.log.info("nick_changed", session=conn.session.sid, old=old, nick=cmd.arg)
        return self._nick_kept(conn)

    async def _nick_kept(self, conn: ClientConn) -> None:
        kept = self.session_changed(conn)
        if kept is not None:
            await self.keeper.settled(kept)
        conn.send({"type": "ok", "cmd": "nick", "nick": conn.session.nick,
                   "text": f"you are now {conn.session.nick}"})

    def cmd_topics(self, conn: ClientConn, cmd: Command) -> Pending:
        conn.send({"type": "topics", "topics": self.topic_list()})
        return None

    def cmd_join(self, conn: ClientConn, cmd: Command) -> Pending:
        topic = self.dir.topic_named(cmd.arg)
        if topic is None:
            conn.send({"type": "error", "code": "no_such_topic",
                       "text": f"no topic {cmd.arg}; topics: {', '.join(self.dir.topics)}"})
            return None
        if topic in self.unavailable:
            conn.send({"type": "error", "code": "unavailable",
                       "text": f"topic {topic} is unavailable: its server keeps failing"})
            return None
        return self._move_to(conn, topic)

    async def _move_to(self, conn: ClientConn, topic: str, resume_after: int | None = None
                       ) -> None:
        sid = conn.session.sid
        op = {"op": "adopt", "from": None, "resume_after": resume_after}
        try:
            await conn.hand_over(self.server_ctl(topic), op, self.d.paths.witness(topic))
        except ControlError as e:
            self.log.warning("handoff_failed", session=sid, to=topic, error=str(e))
            conn.send(handoff_error(e, f"topic {topic} is unavailable right now; try again"))
            return
        self.lobby.pop(sid, None)
        self.keeper.drop(sid)
        self.dir.move(sid, topic)
        self._save(self.dir.sessions.get(sid))
        self.log.info("handoff", session=sid, nick=conn.session.nick, to=topic)

    def cmd_leave(self, conn: ClientConn, cmd: Command) -> Pending:
        conn.send({"type": "error", "code": "not_in_topic", "text": "you are in the lobby"})
        return None

    def _in_lobby(self, conn: ClientConn, what: str) -> Pending:
        conn.send({"type": "error", "code": "not_in_topic",
                   "text": f"you are in the lobby: /join a topic to {what}"})
        return None

    def cmd_me(self, conn: ClientConn, cmd: Command) -> Pending:
        return self._in_lobby(conn, "talk")

    def cmd_kick(self, conn: ClientConn, cmd: Command) -> Pending:
        return self._in_lobby(conn, "kick someone from it")

    def cmd_ban(self, conn: ClientConn, cmd: Command) -> Pending:
        return self._in_lobby(conn, "ban someone from it")

    def cmd_create(self, conn: ClientConn, cmd: Command) -> Pending:
        return self._create_and_join(conn, cmd.arg)

    async def _create_and_join(self, conn: ClientConn, name: str) -> None:
        reply = await self.create_topic(name, conn.session.nick)
        if self.failed(conn, reply):
            return
        topic = reply["topic"]
        conn.send({"type": "ok", "cmd": "create", "topic": topic,
                   "text": f"topic {topic} created; you are its operator"})
        await self._move_to(conn, topic)

    def cmd_oper(self, conn: ClientConn, cmd: Command) -> Pending:
        return self._oper_here(conn, cmd.arg, cmd.text)

    async def _oper_here(self, conn: ClientConn, name: str, password: str) -> None:
        reply = await self.oper(conn.session.sid, name, password)
        if not self.failed(conn, reply):
            await self.became_oper(conn)

    def cmd_drop(self, conn: ClientConn, cmd: Command) -> Pending:
        return self._drop_here(conn, cmd.arg)

    async def _drop_here(self, conn: ClientConn, name: str) -> None:
        self.show(conn, await self.drop_topic(name, conn.session.nick, conn.session.oper, False))

    # -- topics made and dropped at run time, operators --------------------------------------

    async def create_topic(self, name: str, creator: str) -> Message:
        t = self.cfg.topics
        if not t.allow_create:
            return fail("not_allowed", "creating topics is turned off here")
        if self.dir.topic_named(name) is not None:
            return fail("topic_exists", f"topic {self.dir.topic_named(name)} already exists")
        if len(self.dir.topics) >= t.max:
            return fail("too_many_topics", f"there are already {t.max} topics, the most allowed")
        self.dir.add_topic(name, creator)
        await self.journal.append({"type": "topic", "name": name, "creator": creator})
        self.unavailable.discard(name)
        self._supervise_topic(name)
        self.log.info("topic_created", created=name, creator=creator)
        # The creator is moved in next: wait (bounded) until the new server answers.
        deadline = time.monotonic() + self.cfg.supervision.start_timeout_ms / 1000
        while time.monotonic() < deadline:
            with contextlib.suppress(ControlError):
                reply = await control.request(self.server_ctl(name), {"op": "status"},
                                              timeout=0.5)
                if reply.get("ok") and reply["daemon"]["state"] == "ready":
                    return ok(topic=name)
            await asyncio.sleep(0.02)
        return fail("unavailable", f"topic {name} was created but its server is slow to "
                                   "start; try /join in a moment")

    def topic_info(self, topic: str) -> Message:
        name = self.dir.topic_named(topic)
        if name is None:
            return fail("no_such_topic", f"no topic {topic}")
        return ok(topic=name, creator=self.dir.creators.get(name))

    async def oper(self, sid: str, name: str, password: str) -> Message:
        entry = next((o for o in self.cfg.operators if fold(o.name) == fold(name)), None)
        # The hash is checked even for an unknown name, so timing does not tell names.
        stored = entry.password_hash if entry else UNKNOWN_OPERATOR_HASH
        loop = asyncio.get_running_loop()
        good = await loop.run_in_executor(None, passwords.verify, password, stored)
        if entry is None or not good:
            self.log.warning("oper_failed", session=sid, name=name)
            return fail("bad_password", "wrong operator name or password")
        info = self.dir.sessions.get(sid)
        if info is not None:
            info.oper = True
            self._save(info)
        self.log.info("oper_granted", session=sid, name=entry.name)
        return ok()

    async def drop_topic(self, name: str, nick: str, oper: bool, op_here: bool) -> Message:
        topic = self.dir.topic_named(name)
        if topic is None:
            return fail("no_such_topic", f"no topic {name}")
        creator = self.dir.creators.get(topic, "")
        if not (oper or op_here or (creator and fold(creator) == fold(nick))):
            return fail("not_operator", f"only operators of {topic} can drop it")
        # Forgotten first: nobody can join it while its members are moved out.
        self.dir.drop_topic(topic)
        self.unavailable.discard(topic)
        await self.journal.append({"type": "topic_dropped", "name": topic})
        notice = f"topic {topic} was dropped by {nick}; you are in the lobby"
        with contextlib.suppress(ControlError):
            await control.request(self.server_ctl(topic), {"op": "evacuate", "notice": notice},
                                  timeout=10.0)
        monitor = holder(topic).supervisor
        assert monitor is not None
        self.sup.forget(monitor.name)
        with contextlib.suppress(ControlError):
            await control.request(self.d.paths.control(monitor.name),
                                  {"op": "stop_child"}, timeout=15.0)
        wal = self.d.paths.wal(holder(topic).name)
        for leftover in (wal, wal.with_suffix(".fanout")):
            leftover.unlink(missing_ok=True)  # forgotten: a new /create starts afresh
        self.log.info("topic_dropped", dropped=topic, by=nick)
        return ok(event={"type": "ok", "cmd": "drop", "topic": topic,
                         "text": f"topic {topic} dropped"})

    def cmd_resume(self, conn: ClientConn, cmd: Command) -> Pending:
        info = self.dir.sessions.get(cmd.arg)
        if info is None or info.sid == conn.session.sid:
            conn.send({"type": "error", "code": "no_such_session",
                       "text": f"no session {cmd.arg} to resume (sessions expire after "
                               f"{self.cfg.sessions.expiry_s}s)"})
            return None
        return self._resume(conn, info, cmd.number)

    async def _take_over(self, info: SessionInfo) -> bool:
        """The newest connection holding a session's (secret) id wins: the old one may be
        a dead TCP connection nobody noticed yet. False if its holder cannot be asked."""
        if info.detached_at is not None:
            return True
        if info.topic is None:
            old = self.lobby.pop(info.sid, None)
            if old is not None:
                self.keeper.drop(info.sid)
                old.send({"type": "notice", "text": "this session was resumed elsewhere"})
                old.close("resumed elsewhere")
            return True
        try:
            control.check(await control.request(
                self.server_ctl(info.topic), {"op": "drop", "sid": info.sid}))
        except ControlError:
            return False
        return True

    async def _resume(self, conn: ClientConn, info: SessionInfo, last_seq: int | None) -> None:
        if not await self._take_over(info):
            conn.send({"type": "error", "code": "session_busy",
                       "text": f"session {info.sid} is held by {info.topic}, which is "
                               "restarting; try again in a moment"})
            return
        old = conn.session.sid
        self.lobby.pop(old, None)
        self.keeper.drop(old)
        self._end(old)
        conn.session.sid, conn.session.nick = info.sid, info.nick
        conn.session.oper = info.oper
        info.detached_at = None
        self.lobby[info.sid] = conn
        self._save(info)
        await self.keeper.settled(self.keeper.store(info.sid, conn.fileno(),
                                                    conn.session.record()))
        target, info.topic = info.topic, None  # in the lobby until the move succeeds
        self._save(info)
        self.log.info("session_resumed", session=info.sid, nick=info.nick, topic=target)
        conn.send({"type": "resumed", "session": info.sid, "nick": info.nick,
                   "topic": target})
        if target is not None and target not in self.unavailable:
            await self._move_to(conn, target, resume_after=last_seq)

    def cmd_history(self, conn: ClientConn, cmd: Command) -> Pending:
        conn.send({"type": "error", "code": "not_in_topic",
                   "text": "you are in the lobby: /join a topic first"})
        return None

    def cmd_who(self, conn: ClientConn, cmd: Command) -> Pending:
        if cmd.arg:
            return self._who_there(conn, cmd.arg)
        nicks = sorted((c.session.nick for c in self.lobby.values()), key=str.lower)
        conn.send({"type": "who", "topic": None, "members": nicks})
        return None

    async def _who_there(self, conn: ClientConn, topic: str) -> None:
        self.show(conn, await self.who(topic))

    async def who(self, name: str) -> Message:
        topic = self.dir.topic_named(name)
        if topic is None:
            return fail("no_such_topic", f"no topic {name}; topics: {', '.join(self.dir.topics)}")
        try:
            reply = control.check(await control.request(self.server_ctl(topic),
                                                        {"op": "members"}))
        except ControlError:
            return fail("unavailable", f"topic {topic} is unavailable right now")
        nicks = sorted((str(m["nick"]) for m in reply.get("members", [])), key=str.lower)
        return ok(event={"type": "who", "topic": topic, "members": nicks})

    def cmd_msg(self, conn: ClientConn, cmd: Command) -> Pending:
        return self._dm(conn, cmd.arg, cmd.text)

    async def _dm(self, conn: ClientConn, to: str, text: str) -> None:
        reply = await self.deliver_dm(conn.session.nick, to, text)
        if not self.failed(conn, reply):
            self.dm_sent(conn, reply["to"])

    async def deliver_dm(self, sender: str, to: str, text: str) -> Message:
        info = self.dir.find_nick(to)
        if info is None:
            return fail("no_such_nick", f"no one is called {to}")
        event = self.dm_event(sender, info.nick, text, time.time())
        if info.topic is None:
            target = self.lobby.get(info.sid)
            if target is None:
                return fail("no_such_nick", f"no one is called {to}")
            target.send(event)
            return ok(to=info.nick)
        try:
            reply = await control.request(
                self.server_ctl(info.topic), {"op": "deliver", "sid": info.sid, "event": event}
            )
        except ControlError:
            return fail("unavailable", f"{info.nick} cannot be reached right now")
        return ok(to=info.nick) if reply.get("ok") else reply

    # -- control requests from the other daemons and the CLI -----------------------------

    async def on_control(self, msg: Message, fds: list[int]) -> Message:
        op = msg["op"]
        if op == "status":
            return ok(daemon=self.d.status(), children=self.sup.status(),
                      topics=self.dir.topics, lobby=len(self.lobby))
        if op == "topics":
            return ok(topics=self.topic_list(), names=self.dir.topics)
        if op == "adopt":
            return await self._adopt(msg, fds)
        if op == "session_at":
            return self._session_at(msg)
        if op == "session_end":
            sid = str(msg.get("sid"))
            known = sid in self.dir.sessions
            self._left(sid, str(msg.get("reason", "connection lost")))
            return ok(known=known)
        if op == "nick":
            return self._rename(msg)
        if op == "dm":
            for key in ("from", "to", "text"):
                if not isinstance(msg.get(key), str):
                    return fail("bad_request", f"dm.{key}: expected a string")
            return await self.deliver_dm(msg["from"], msg["to"], msg["text"])
        if op == "locate":  # a restarted server checks which restored sockets are its own
            sids = msg.get("sids")
            if not isinstance(sids, list):
                return fail("bad_request", "locate: expected a list of sids")
            where = {}
            for sid in sids:
                info = self.dir.sessions.get(str(sid))
                where[str(sid)] = None if info is None else (info.topic or "")
            return ok(where=where)
        if op == "topic_info":
            return self.topic_info(str(msg.get("topic")))
        if op == "who":
            return await self.who(str(msg.get("topic")))
        if op == "create_topic":
            name, nick = msg.get("topic"), msg.get("nick")
            if not isinstance(name, str) or not valid_name(name) or not isinstance(nick, str):
                return fail("bad_request", "create_topic: expected a topic name and a nick")
            return await self.create_topic(name, nick)
        if op == "oper":
            fields = [msg.get(k) for k in ("sid", "name", "password")]
            if not all(isinstance(x, str) for x in fields):
                return fail("bad_request", "oper: expected sid, name and password")
            return await self.oper(*(str(x) for x in fields))
        if op == "drop_topic":
            return await self.drop_topic(str(msg.get("topic")), str(msg.get("nick")),
                                         msg.get("oper") is True, msg.get("op_here") is True)
        if op == "topic_down":
            topic = msg.get("topic")
            if topic not in self.dir.topics:
                return fail("bad_request", "topic_down: expected a known topic")
            self._topic_down(str(topic))
            return ok()
        if op == "fd_resync":
            return ok(count=fdstore.resync(self.keeper, self._held_sockets))
        if op == "server_hello":
            topic, members = msg.get("topic"), msg.get("members")
            if topic not in self.dir.topics or not isinstance(members, list):
                return fail("bad_request", "server_hello: expected a known topic and members")
            self.reconcile(topic, members)
            return ok()
        return fail("unknown_op", f"unknown op {op!r}")

    def _held_sockets(self) -> list[tuple[str, int, dict[str, Any]]]:
        items = [(sid, c.fileno(), c.session.record()) for sid, c in self.lobby.items()]
        if self.listener is not None:
            items.append((LISTENER, self.listener.fileno(), {"kind": LISTENER}))
        return items

    def session_changed(self, conn: ClientConn) -> asyncio.Future[bool] | None:
        if conn.session.sid not in self.lobby:
            return None
        return self.keeper.store(conn.session.sid, None, conn.session.record())

    def _session_at(self, msg: Message) -> Message:
        sid, nick, topic = msg.get("sid"), msg.get("nick"), msg.get("topic")
        if not isinstance(sid, str) or not isinstance(nick, str) or topic not in self.dir.topics:
            return fail("bad_request", "session_at: expected sid, nick and a known topic")
        try:
            self._save(self.dir.register(sid, nick, topic))
        except NickTaken:
            return fail("nick_taken", f"the nick {nick} is taken")
        return ok()

    def _rename(self, msg: Message) -> Message:
        sid, nick = msg.get("sid"), msg.get("nick")
        if not isinstance(sid, str) or not isinstance(nick, str):
            return fail("bad_request", "nick: expected sid and nick")
        if sid not in self.dir.sessions:
            return fail("no_session", "unknown session")
        try:
            old = self.dir.rename(sid, nick)
        except NickTaken:
            return fail("nick_taken", f"the nick {nick} is taken")
        self._save(self.dir.sessions[sid])
        self.log.info("nick_changed", session=sid, old=old, nick=nick)
        return ok(old=old)

    async def _adopt(self, msg: Message, fds: list[int]) -> Message:
        """A server passes a client back to the lobby (`/leave`)."""
        if len(fds) != 1:
            return fail("bad_request", "adopt: expected exactly one socket")
        session = Session.from_record(msg.get("session"))
        try:
            pending = bytes.fromhex(str(msg.get("pending", "")))
        except ValueError:
            return fail("bad_request", "adopt.pending: expected hex")
        try:
            info = self.dir.register(session.sid, session.nick, None)
        except NickTaken:
            # Only after a router restart lost track of this session: keep the person.
            info = self.dir.open_session(session.sid)
            session.nick = info.nick
        self._save(info)
        conn = await attach(self, session, fds.pop(), self.cfg.clients, self.log)
        self.lobby[session.sid] = conn
        await self.keeper.settled(self.keeper.store(session.sid, conn.fileno(), session.record()))
        self.log.info("handoff", session=session.sid, nick=session.nick, to=None,
                      came_from=msg.get("from"))
        conn.send({"type": "left", "topic": msg.get("from")})
        if isinstance(msg.get("notice"), str):
            conn.send({"type": "notice", "text": msg["notice"]})
        conn.start(pending)
        return ok()


async def main_async(d: Daemon) -> None:
    await Router(d).run()


def main(argv: list[str] | None = None) -> int:
    return daemon.run(Role.ROUTER, main_async, argv)


if __name__ == "__main__":
    sys.exit(main())
