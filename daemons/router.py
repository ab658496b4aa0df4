"""The router: the one client port, the lobby, the directory of topics and nicks, and the
supervisor of the router-monitor and of every server-monitor.

Once a client joins a topic its socket belongs to that topic's server; the router is
off the data path of conversations and only answers directory questions (nick
changes, direct messages to people elsewhere, topic counts).

This module is the shell: `run` reads as start-up, serve, shutdown. What people do in
the lobby is `lobby.py`, topic administration `topics.py`, the directory
`directory.py` (kept in the router's write-ahead log, `local.py`), and the sockets
`handoff.py`; the table in `_dispatcher` says which of them answers each control op.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from typing import Any

from theychat.daemons import control, daemon, ops
from theychat.daemons.backends import RouterState
from theychat.daemons.clientconn import ClientConn
from theychat.daemons.cluster import LOST_NOTICE
from theychat.daemons.commands import Pending
from theychat.daemons.control import Message, fail, ok
from theychat.daemons.daemon import Daemon
from theychat.daemons.directory import DROPPED, TOPIC, Directory, NickTaken
from theychat.daemons.errors import ControlError, TheyChatError
from theychat.daemons.handoff import Sockets
from theychat.daemons.lobby import Lobby
from theychat.daemons.peers import ControlPeers
from theychat.daemons.protocol import Command, Say
from theychat.daemons.routerhost import RouterCluster
from theychat.daemons.store import Change
from theychat.daemons.supervisor import Child, Supervisor
from theychat.daemons.tlsbridge import TlsBridge, server_context
from theychat.daemons.topics import Topics
from theychat.daemons.tree import Role, holder

LISTENER = "listener"  # kept with the router-monitor: the client port's listening socket
MONITOR_POLL_S = 0.02


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


def listen_addr(host: str, port: int) -> tuple[str, int] | None:
    """The configured client address as the kernel names it (a host name resolved)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return None
    return (str(infos[0][4][0]), int(infos[0][4][1]))


class Router:
    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.cfg = d.cfg
        self.log = d.log
        self.host = d.cfg.cluster.host if d.cfg.cluster else ""
        self.peers = ControlPeers(d.paths, self.host)
        self.state = RouterState(d.cfg, d.paths, d.name, d.log, d.fail)
        self.dir = Directory(self.state.store, d.cfg.topics.names, d.cfg.sessions.expiry_s,
                             host=self.host)
        self.topics = Topics(self.dir, d.cfg, d.paths, self.peers, self, d.log)
        self.sockets = Sockets(d.id, d.paths, self, d.cfg.clients, d.log)
        self.lobby = Lobby(self.dir, self.topics, self.sockets, self.peers, d.cfg, d.log)
        self.sup: Supervisor | None = None  # exists once start-up has reached it
        self.listener: socket.socket | None = None
        self.watched: set[str] = set()  # topics whose server-monitor we supervise
        self.cluster: RouterCluster | None = None
        if d.cfg.cluster is not None:
            assert self.state.etcd is not None
            self.cluster = RouterCluster(d.cfg, self.state.etcd, self.peers, d.log,
                                         self._dispatcher(), lambda: self.dir.topics,
                                         self._cluster_lost, self._cluster_back,
                                         self._host_gone, d.paths.cluster_peers,
                                         d.incarnation)

    # The lobby owns the connections it accepts and adopts; restored ones start here.
    def handle(self, conn: ClientConn, item: Say | Command) -> Pending:
        return self.lobby.handle(conn, item)

    def lost(self, conn: ClientConn, reason: str) -> None:
        self.lobby.lost(conn, reason)

    async def run(self) -> None:
        ctl = control.ControlServer(self.d.paths.control(self.d.name), self._dispatcher(),
                                    self.log)
        servers = await self.startup(ctl)
        await self.d.stop.wait()
        await self.shutdown(ctl, servers)

    # -- start-up ---------------------------------------------------------------------------

    async def startup(self, ctl: control.ControlServer) -> list[asyncio.Server]:
        d = self.d
        await self.state.start()
        if self.cluster is not None:
            await self.cluster.start()
        await self.dir.repair()
        self.dir.on_expired(lambda s: self.lobby.background(self.lobby.expire(s)))
        # Who is in which topic: the servers know best (a move may not have reached
        # our log before we died).
        await self.topics.reconcile_all()
        restored, kept = await self.sockets.restore(self._still_ours)
        self.listener = self._listener(kept)
        await ctl.start()  # status answers `starting` until we are ready
        for s in self.dir.in_topic(None, here=True):  # lobby sessions whose socket is gone
            if s.sid not in self.sockets and s.detached_at is None:
                await self.dir.detach(s.sid)
        for conn in restored:
            conn.start()
        await d.listen()
        self.sup = d.supervisor(on_gave_up=self._gave_up)
        for child in d.id.children([]):  # the host's own: the router-monitor
            self.sup.add(d.child_spec(child))
        # No client is accepted before our monitor can keep a copy of its socket.
        await self._monitor_ready()
        self.sockets.start()
        self.sockets.keep(LISTENER, self.listener.fileno(), {"kind": LISTENER})
        for topic in self.dir.topics:
            self.watch(topic)
        # Topics made or dropped elsewhere (another host, in cluster mode) too.
        self.dir.on_change(TOPIC, self._topics_changed)
        self.dir.on_change(DROPPED, self._topics_changed)
        servers = await self._serve_clients(self.listener)
        d.ready(host=self.cfg.listen.host, port=self.listener.getsockname()[1],
                tls=self.cfg.listen.tls.enabled)
        if self.cluster is not None and self.cluster.agent.took_new_lease and d.incarnation > 1:
            # Our predecessor's lease is gone: the others thought this host dead (both
            # roots died at once, say) and detached its people. Whoever our servers still
            # hold must come back by resuming, to be part of the cluster again.
            self.log.warning("host_lease_lost", lease=self.cluster.agent.old_lease,
                             at_start=True)
            await self._cluster_lost()
            await self._cluster_back()
        return servers

    async def _still_ours(self, sids: list[str]) -> set[str]:
        """Of the lobby sockets our monitor kept, those we hold: not those the servers
        now hold, handed to them just before our death."""
        ours = set()
        for sid in sids:
            s = self.dir.session(sid)
            if s is not None and (s.topic is not None or s.host != self.host):
                continue
            try:
                if s is None:  # the log lost it (it cannot, but keep the person)
                    await self.dir.register(sid, f"guest{sid[:5].upper()}", None)
                else:
                    await self.dir.attach(sid, s.addr)
            except NickTaken:
                continue
            ours.add(sid)
        return ours

    def _listener(self, kept: dict[str, tuple[int, dict[str, Any]]]) -> socket.socket:
        """The listening socket our monitor kept, if it is still the configured address
        (no connection is refused while the router restarts: the kernel queues them),
        else a new one."""
        found = None
        for key, (fd, _) in kept.items():
            sock = socket.socket(fileno=fd)
            want = listen_addr(self.cfg.listen.host, self.cfg.listen.port)
            if key == LISTENER and found is None and sock.getsockname()[:2] == want:
                sock.setblocking(False)
                found = sock
            else:
                sock.close()
        return found or bind_listener(self.cfg.listen.host, self.cfg.listen.port)

    async def _monitor_ready(self) -> None:
        """Wait (bounded) until the router-monitor answers ready."""
        monitor = self.d.id.supervisor
        assert monitor is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.supervision.start_timeout_ms / 1000
        while loop.time() < deadline:
            with contextlib.suppress(ControlError):
                reply = await self.peers.ask(monitor, ops.Status(), timeout=0.5)
                if reply.get("ok") and reply["daemon"]["state"] == "ready":
                    return
            await asyncio.sleep(MONITOR_POLL_S)
        self.log.warning("monitor_not_ready", monitor=monitor.name,
                         waited_ms=self.cfg.supervision.start_timeout_ms)

    async def _serve_clients(self, listener: socket.socket) -> list[asyncio.Server]:
        loop = asyncio.get_running_loop()
        tls = self.cfg.listen.tls
        if not tls.enabled:
            return [await loop.create_server(self.lobby.new_conn, sock=listener)]
        assert tls.cert and tls.key
        ctx = server_context(tls.cert, tls.key)
        servers = [await loop.create_server(
            lambda: TlsBridge(self._tls_client, self.cfg.clients), sock=listener, ssl=ctx)]
        if tls.plain_port:  # plain text stays on loopback, whatever listen.host says
            plain = bind_listener("127.0.0.1", tls.plain_port)
            servers.append(await loop.create_server(self.lobby.new_conn, sock=plain))
        return servers

    def _tls_client(self, inner: socket.socket, peer: str) -> None:
        """A TLS client, as the inner end of its bridge: from here on like any other."""
        conn = self.lobby.new_conn()
        conn.peer_hint = peer
        self.lobby.background(asyncio.get_running_loop().connect_accepted_socket(
            lambda: conn, inner))

    # -- supervision of the topics (topics.Supervision) --------------------------------------

    def watch(self, topic: str) -> None:
        assert self.sup is not None
        if topic in self.watched:
            return
        self.watched.add(topic)
        for child in self.d.id.children([topic]):
            if child.topic == topic:
                self.sup.add(self.d.child_spec(child))

    async def unwatch(self, topic: str) -> None:
        assert self.sup is not None
        if topic not in self.watched:
            return
        self.watched.discard(topic)
        monitor = holder(topic).supervisor
        assert monitor is not None
        self.sup.forget(monitor.name)
        with contextlib.suppress(ControlError):
            await self.peers.ask(monitor, ops.StopChild(), timeout=15.0)

    def _topics_changed(self, change: Change) -> None:
        """The topics changed, here or on another host: run the servers they need."""
        if self.sup is None:
            return
        now = set(self.dir.topics)
        for topic in now - self.watched:
            self.watch(topic)
        for topic in self.watched - now - self.topics.dropping:  # dropped on another host
            self.lobby.background(self.topics.evacuate(
                topic, f"topic {topic} was dropped; you are in the lobby"))

    async def _gave_up(self, child: Child) -> None:
        if child.spec.topic:
            self.topics.down(child.spec.topic)

    # -- control requests ---------------------------------------------------------------------

    def _dispatcher(self) -> ops.Dispatcher:
        lobby, topics = self.lobby, self.topics
        return ops.Dispatcher(self.d.name, {
            ops.Status: lambda op, fds: self.status(),
            ops.Topics: lambda op, fds: ok(topics=topics.listing(), names=self.dir.topics),
            ops.Adopt: lobby.adopt,
            ops.SessionAt: lambda op, fds: lobby.session_at(op),
            ops.SessionEnd: lambda op, fds: lobby.session_end(op),
            ops.SessionInfo: lambda op, fds: lobby.session_info(op),
            ops.Rename: lambda op, fds: lobby.rename(op),
            ops.Dm: lambda op, fds: lobby.deliver_dm(op),
            ops.Oper: lambda op, fds: lobby.oper(op),
            ops.Locate: lambda op, fds: lobby.locate(op),
            ops.Who: lambda op, fds: topics.who(op.topic),
            ops.TopicInfo: lambda op, fds: topics.info(op.topic),
            ops.CreateTopic: lambda op, fds: self._ready(topics.create(op.topic,
                                                                       lobby.nick(op.sid))),
            ops.DropTopic: lambda op, fds: self._ready(topics.drop(op.topic, op.sid,
                                                                   op.op_here)),
            ops.ServerHello: lambda op, fds: self._known(op.topic, topics.reconcile(
                op.topic, op.members)),
            ops.TopicDown: lambda op, fds: self._topic_down(op.topic),
            ops.FdResync: lambda op, fds: ok(count=self.sockets.resync()),
            ops.Deliver: lambda op, fds: lobby.deliver_here(op),
            ops.DropSession: lambda op, fds: lobby.drop_session(op),
        })

    async def _cluster_lost(self) -> None:
        """Cut off from the cluster: every client of this host is told, and closed, so
        that it resumes on another host."""
        notice = LOST_NOTICE
        self.lobby.lost_cluster(notice)
        for topic in self.dir.topics:
            with contextlib.suppress(ControlError):
                await self.peers.ask(holder(topic), ops.ClusterLost(notice=notice))

    async def _host_gone(self, host: str) -> None:
        """Another host is gone: its people's sessions are detached (resumable here), and
        they leave their topics, as a lost connection does."""
        detached = await self.dir.detach_host(host)
        self.log.info("host_sessions_detached", host=host, count=detached)
        for topic in self.dir.topics:
            with contextlib.suppress(ControlError):
                await self.peers.ask(holder(topic), ops.HostGone(host=host))

    async def _cluster_back(self) -> None:
        """etcd answers again: newcomers are welcome (those who left come by themselves)."""
        self.lobby.cut_off = False

    def status(self) -> Message:
        children = self.sup.status() if self.sup else []
        return ok(daemon=self.d.status(), children=children, topics=self.dir.topics,
                  lobby=len(self.sockets))

    async def _ready(self, work: Any) -> Message:
        """Ops that start or stop daemons wait for the supervisor to exist."""
        if self.sup is None:
            work.close()
            return fail("starting", "the router is starting; try again in a moment")
        result: Message = await work
        return result

    async def _known(self, topic: str, work: Any) -> Message:
        if topic not in self.dir.topics:
            work.close()
            return fail("bad_request", f"{topic}: not a topic of this router")
        await work
        return ok()

    def _topic_down(self, topic: str) -> Message:
        if topic not in self.dir.topics:
            return fail("bad_request", f"{topic}: not a topic of this router")
        self.topics.down(topic)
        return ok()

    # -- shutdown -----------------------------------------------------------------------------

    async def shutdown(self, ctl: control.ControlServer, servers: list[asyncio.Server]) -> None:
        self.log.info("daemon_stopping")
        for server in servers:
            server.close()
        await self.sockets.close()  # our monitor keeps its copies for our next start
        await self.lobby.close()
        await ctl.close()
        if self.sup is not None:
            await self.sup.close()
        if self.cluster is not None:
            if self.d.paths.stopping.exists():  # `theychat down`: the host leaves
                await self.cluster.agent.leave()
            await self.cluster.close()
        await self.state.close()


async def main_async(d: Daemon) -> None:
    await Router(d).run()


def main(argv: list[str] | None = None) -> int:
    return daemon.run(Role.ROUTER, main_async, argv)


if __name__ == "__main__":
    sys.exit(main())
