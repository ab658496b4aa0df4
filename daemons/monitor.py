"""The two kinds of monitor (router-monitor, server-monitor@TOPIC): supervise the one
child the tree gives them, hold duplicates of its client sockets (fdstore), answer
`status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

from theychat.daemons import cluster, control, daemon, ops
from theychat.daemons.control import Message, check, ok
from theychat.daemons.daemon import Daemon
from theychat.daemons.errors import ControlError, TheyChatError
from theychat.daemons.fdstore import FdVault
from theychat.daemons.heartbeat import HeartbeatSender
from theychat.daemons.peers import ControlPeers
from theychat.daemons.supervisor import Child
from theychat.daemons.tree import ROOT, DaemonId, Role


def run(role: Role, argv: list[str] | None = None) -> int:
    return daemon.run(role, supervise_one, argv)


async def supervise_one(d: Daemon) -> None:
    (child_id,) = d.id.children([d.topic] if d.topic else [])
    spec = d.child_spec(child_id)
    vault = FdVault()
    peers = ControlPeers(d.paths)
    router = DaemonId(ROOT)

    async def gave_up(child: Child) -> None:
        """Escalate: the topic is unavailable, and its people go back to the lobby."""
        if spec.topic is None:
            return  # the lobby itself: nowhere to send its people
        with contextlib.suppress(ControlError):
            await peers.ask(router, ops.TopicDown(topic=spec.topic))
        notice = f"{spec.topic} is unavailable (its server keeps failing); you are in the lobby"
        moved = 0
        for key, fd, meta in vault.held():
            with contextlib.suppress(ControlError):
                adopt = ops.Adopt(session=ops.record(ops.Conn, meta, "meta"),
                                  came_from=spec.topic, notice=notice)
                check(await peers.ask(router, adopt, fds=[fd]))
                moved += 1
            vault.drop(key)
        d.log.info("clients_returned_to_lobby", topic=spec.topic, count=moved)

    await d.listen()
    host_beats = _beat_for_the_host(d)
    sup = d.supervisor(on_gave_up=gave_up)

    async def stop_child() -> Message:
        """The topic is dropped: end the worker for good, then us."""
        await sup.stop(spec.name)
        d.log.info("child_stopped", child=spec.name)
        d.stop.set()
        return ok()

    ctl = control.ControlServer(d.paths.control(d.name), ops.Dispatcher(d.name, {
        **vault.table(),
        ops.Status: lambda op, fds: ok(daemon=d.status(), children=sup.status(),
                                       fds_held=len(vault)),
        ops.StopChild: lambda op, fds: stop_child(),
    }), d.log)
    await ctl.start()
    child = sup.add(spec)
    d.ready(child=spec.name)
    # A worker that outlived our previous incarnation stored its sockets there: ask it
    # to store them again here (until it answers: it may be busy or hung right now). A
    # worker we started ourselves fetches from us instead.
    deadline = time.monotonic() + d.cfg.supervision.start_timeout_ms / 1000
    while time.monotonic() < deadline and child.state in ("starting", "running"):
        try:
            reply = check(await peers.ask(child_id, ops.FdResync()))
            d.log.info("fds_resync_requested", child=spec.name, count=reply.get("count"))
            break
        except ControlError:
            await asyncio.sleep(0.1)
    await d.stop.wait()
    d.log.info("daemon_stopping")
    await ctl.close()
    await sup.close()
    vault.close_all()
    if host_beats is not None:
        host_beats.stop()


def _beat_for_the_host(d: Daemon) -> HeartbeatSender | None:
    """In a cluster, the router-monitor beats for its host beside the router (to the
    hosts its router last listed): the host stays alive, for the others, while its
    router restarts."""
    c = d.cfg.cluster
    if c is None or d.role is not Role.ROUTER_MONITOR:
        return None
    try:
        key = cluster.load_key(c.key_file)
    except TheyChatError as e:
        d.log.error("host_beats_failed", error=str(e))  # the router will say it too
        return None
    peers = cluster.PeersFile(d.paths.cluster_peers)
    sender = cluster.host_beats(c.host, d.name, os.getpid(), d.incarnation, key,
                                d.cfg.heartbeat.interval_ms, peers.read)
    sender.start()
    return sender
