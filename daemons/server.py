"""server@TOPIC: one topic's members, messages and history, and its members' sockets.

Clients arrive as sockets passed by the router (or by another server) and from then on
this process reads and writes them directly.

This module is the shell: `run` reads as start-up, serve, shutdown. What members do is
`topic.py`; who is here `room.py`; the messages the topic log (`topiclog.py`); both kept
in the server's write-ahead log (`local.py`); the sockets `handoff.py`. The table in
`_dispatcher` says which of them answers each control op.
"""

from __future__ import annotations

import asyncio
import socket
import sys

from theychat.daemons import control, daemon, links, ops, procs
from theychat.daemons.backends import TopicState
from theychat.daemons.clientconn import ClientConn
from theychat.daemons.cluster import Mailbox
from theychat.daemons.commands import Pending
from theychat.daemons.control import Message, check, fail, ok
from theychat.daemons.daemon import Daemon
from theychat.daemons.errors import ControlError
from theychat.daemons.handoff import Sockets
from theychat.daemons.peers import ControlPeers
from theychat.daemons.protocol import Command, Say
from theychat.daemons.room import Room
from theychat.daemons.topic import ROUTER, TopicCommands
from theychat.daemons.tree import Role
from theychat.daemons.wal import WalError
from theychat.daemons.watermark import Watermark


class Server:
    def __init__(self, d: Daemon) -> None:
        assert d.topic is not None
        self.d = d
        self.log = d.log
        self.topic = d.topic
        self.state = TopicState(d.cfg, d.paths, d.name, d.topic, d.log, d.fail)
        self.peers = ControlPeers(d.paths, self.state.host)
        self.topic_log = self.state.log
        self.room = Room(d.topic, self.state.store, host=self.state.host)
        self.mailbox: Mailbox | None = None
        self.fanned = Watermark(d.paths.wals / f"{d.name}.fanout")
        self.sockets = Sockets(d.id, d.paths, self, d.cfg.clients, d.log)
        self.members = TopicCommands(d.topic, self.room, self.topic_log, self.sockets,
                                     self.peers, d.cfg, d.log, self.fanned.set)
        self.members.held = True  # until our members are back (startup)
        self._nicks: dict[str, str] = {}  # of restored sockets, as the router knows them

    # Members' connections are the topic's; restored ones start here.
    def handle(self, conn: ClientConn, item: Say | Command) -> Pending:
        return self.members.handle(conn, item)

    def lost(self, conn: ClientConn, reason: str) -> None:
        self.members.lost(conn, reason)

    async def run(self) -> None:
        ctl = control.ControlServer(self.d.paths.control(self.d.name), self._dispatcher(),
                                    self.log)
        await self.startup(ctl)
        await self.d.stop.wait()
        await self.shutdown(ctl)

    # -- start-up ---------------------------------------------------------------------------

    async def startup(self, ctl: control.ControlServer) -> None:
        await self.state.start()
        if self.state.etcd is not None and self.state.lease is not None:
            self.mailbox = Mailbox(self.state.etcd, self.state.keys, self.state.host,
                                   self.d.name, self._dispatcher(), self.log)
            self.peers.mailbox, self.peers.lease = self.mailbox, self.state.lease
            await self.mailbox.start()
        in_log = set(self.room.here())  # our host's members, as the room last had them
        restored, _ = await self.sockets.restore(self._still_ours)
        for conn in restored:
            if self.room.nick_of(conn.sid) is None:  # joined just before our death
                nick = self._nicks.get(conn.sid)
                if nick is None:  # nobody can say who this is: let them resume
                    self.sockets.lost(conn)
                    conn.send({"type": "notice", "text": f"the server of {self.topic} lost "
                               f"track of you; reconnect and /resume {conn.sid}"})
                    conn.close("lost in a restart")
                    continue
                self.room.join(conn.sid, nick)
        self.reconcile(in_log)
        self.members.held = False
        self.send_unsent()
        if self.fanned.paused and not await self._writable_again():
            return  # still full: we stop again, silently (the members were told)
        # Only now: a line sent during the outage must reach every member, so none may
        # be handled before all are back.
        for conn in self.sockets:
            # What our last incarnation read but did not log is gone from the socket: a
            # client that numbers its lines sends again those after this one.
            conn.send(self.members.caught_up(conn.sid, restarted=True))
            conn.start()
        self.sockets.start()
        await ctl.start()
        self.members.background(self.members.tell_router(
            ops.ServerHello(topic=self.topic, members=[
                ops.MemberRecord(sid=m["sid"], nick=m["nick"]) for m in self.room.member_list()
            ])))
        self.members.background(self._learn_creator())
        self.d.ready(members=len(self.sockets), next_seq=self.topic_log.last_seq + 1)

    async def _writable_again(self) -> bool:
        """Our last incarnation stopped for a full disk: if a write goes through now, the
        members hear that the topic takes lines again, before any line is handled."""
        try:
            await self.state.writable()
        except WalError:
            return False  # the log failed: the daemon is stopping already
        self.fanned.paused = False
        self.log.info("topic_resumed", topic=self.topic)
        self.members.broadcast({"type": "notice", "text": f"{self.topic} is back: what you "
                                "send is taken again"})
        return True

    async def _still_ours(self, sids: list[str]) -> set[str]:
        """Of the sockets our monitor kept, those the router does not place elsewhere
        (handed on just before our death, before the monitor heard of it)."""
        if not sids:
            return set()
        try:
            reply = check(await self.peers.ask(ROUTER, ops.Locate(sids=sids), timeout=1.0))
        except ControlError:
            return set(sids)  # the router cannot say: keep them; they were ours
        found = reply.get("sessions", {})
        ours = set()
        for sid in sids:
            where = found.get(sid)
            if isinstance(where, dict) and where.get("topic") not in ("", self.topic):
                continue
            if isinstance(where, dict) and isinstance(where.get("nick"), str):
                self._nicks[sid] = where["nick"]
            ours.add(sid)
        return ours

    def reconcile(self, in_log: set[str]) -> None:
        """Members the log knows but whose socket is gone (our monitor died with us)
        leave, visibly; they can still /resume their session from the lobby."""
        reason = "connection lost in a restart"
        for sid in sorted(in_log - set(self.sockets.conns)):
            nick = self.room.nick_of(sid)
            if nick is None:
                continue
            self.members.announce(self.room.leave(sid), nick, "left", reason)
            self.log.info("client_left", session=sid, nick=nick, reason=reason)
            self.members.background(self.members.tell_router(
                ops.SessionEnd(sid=sid, reason=reason)))

    def send_unsent(self) -> None:
        """Committed messages our previous incarnation died before fanning out: the
        members still here get them now (their senders get the acknowledgement)."""
        unsent = self.topic_log.after(self.fanned.get())
        for e in unsent:
            event = e.event(self.topic)
            for conn in self.sockets:
                if conn.sid != e.sid:
                    conn.send(event)
                elif conn.json:
                    conn.send(self.members.sent(e))
        if unsent:
            self.log.info("unsent_delivered", count=len(unsent), first=unsent[0].seq)
        self.fanned.set(self.topic_log.last_seq)

    async def _learn_creator(self) -> None:
        """A topic made with /create has its creator as operator: keep that in our log."""
        try:
            reply = check(await self.peers.ask(ROUTER, ops.TopicInfo(topic=self.topic)))
        except ControlError:
            return
        creator = reply.get("creator")
        if isinstance(creator, str) and creator:
            await self.room.add_op(creator)

    # -- control requests ---------------------------------------------------------------------

    def _dispatcher(self) -> ops.Dispatcher:
        m = self.members
        return ops.Dispatcher(self.d.name, {
            ops.Status: lambda op, fds: self.status(),
            ops.Adopt: m.adopt,
            ops.Members: lambda op, fds: ok(members=self.room.member_list()),
            ops.Deliver: lambda op, fds: m.deliver(op),
            ops.DropSession: lambda op, fds: m.drop_session(op),
            ops.Evacuate: lambda op, fds: m.evacuate(op),
            ops.FdResync: lambda op, fds: ok(count=self.sockets.resync()),
            ops.Kick: lambda op, fds: m.kick_here(op),
            ops.ClusterLost: lambda op, fds: m.lost_cluster(op),
            ops.HostGone: lambda op, fds: m.host_gone(op),
            ops.TakeLink: self._take_link,
        })

    async def _take_link(self, op: ops.TakeLink, fds: list[int]) -> Message:
        """A follower's link, passed on by our router: the topic log serves it."""
        if len(fds) != 1 or self.state.cluster is None:
            return fail("bad_request", "take_link: one socket, in cluster mode")
        sock = socket.socket(fileno=fds.pop())
        reader, writer = await asyncio.open_connection(sock=sock, limit=links.MAX_LINE)
        self.members.background(self.state.serve_link(reader, writer))
        return ok()

    def status(self) -> Message:
        return ok(daemon=self.d.status(), members=len(self.sockets),
                  next_seq=self.topic_log.last_seq + 1)

    # -- shutdown -----------------------------------------------------------------------------

    async def shutdown(self, ctl: control.ControlServer) -> None:
        self.log.info("daemon_stopping")
        await ctl.close()
        await self.sockets.close()  # our monitor keeps its copies for our next start
        notice: str | None = ""
        if self.d.failed_status == procs.EXIT_NO_SPACE:
            # Told once, however many restarts it takes to get room again.
            notice = None if self.fanned.paused else (
                f"{self.topic} is paused: its server cannot write to disk (no space left); "
                "it comes back by itself when there is room; what you send meanwhile is "
                "not taken")
            self.fanned.paused = True
            self.log.warning("topic_paused", topic=self.topic)
        await self.members.close(notice)
        if self.mailbox is not None:
            await self.mailbox.close()
        await self.state.close()


async def main_async(d: Daemon) -> None:
    await Server(d).run()


def main(argv: list[str] | None = None) -> int:
    return daemon.run(Role.SERVER, main_async, argv)


if __name__ == "__main__":
    sys.exit(main())
