"""The two kinds of monitor (router-monitor, server-monitor@TOPIC): supervise the one
child the tree gives them, hold duplicates of its client sockets (fdstore), answer
`status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from theychat.daemons import control, daemon
from theychat.daemons.control import Message, fail, ok
from theychat.daemons.daemon import Daemon
from theychat.daemons.errors import ControlError
from theychat.daemons.fdstore import FdVault
from theychat.daemons.supervisor import Child
from theychat.daemons.tree import ROOT, DaemonId, Role


def run(role: Role, argv: list[str] | None = None) -> int:
    return daemon.run(role, supervise_one, argv)


async def supervise_one(d: Daemon) -> None:
    (child_id,) = d.id.children([d.topic] if d.topic else [])
    spec = d.child_spec(child_id)
    vault = FdVault()
    worker_ctl = d.paths.control(spec.name)
    router_ctl = d.paths.control(DaemonId(ROOT).name)

    async def gave_up(child: Child) -> None:
        """Escalate: the topic is unavailable, and its people go back to the lobby."""
        if spec.topic is None:
            return  # the lobby itself: nowhere to send its people
        with contextlib.suppress(ControlError):
            await control.request(router_ctl, {"op": "topic_down", "topic": spec.topic})
        notice = f"{spec.topic} is unavailable (its server keeps failing); you are in the lobby"
        moved = 0
        for key, (fd, meta) in list(vault.entries.items()):
            if fd is None:
                continue
            msg = {"op": "adopt", "from": spec.topic, "session": meta, "pending": "",
                   "notice": notice}
            with contextlib.suppress(ControlError):
                control.check(await control.request(router_ctl, msg, fds=[fd]))
                moved += 1
            vault.handle({"op": "fd_drop", "id": key}, [])
        d.log.info("clients_returned_to_lobby", topic=spec.topic, count=moved)

    await d.listen()
    sup = d.supervisor(on_gave_up=gave_up)

    async def on_control(msg: Message, fds: list[int]) -> Message:
        reply = vault.handle(msg, fds)
        if reply is not None:
            return reply
        if msg["op"] == "status":
            return ok(daemon=d.status(), children=sup.status(), fds_held=len(vault))
        if msg["op"] == "stop_child":  # the topic is dropped: end the worker, then us
            await sup.stop(spec.name)
            d.log.info("child_stopped", child=spec.name)
            d.stop.set()
            return ok()
        return fail("unknown_op", f"unknown op {msg['op']!r}")

    ctl = control.ControlServer(d.paths.control(d.name), on_control, d.log)
    await ctl.start()
    child = sup.add(spec)
    d.ready(child=spec.name)
    # A worker that outlived our previous incarnation stored its sockets there: ask it
    # to store them again here (until it answers: it may be busy or hung right now). A
    # worker we started ourselves fetches from us instead.
    deadline = time.monotonic() + d.cfg.supervision.start_timeout_ms / 1000
    while time.monotonic() < deadline and child.state in ("starting", "running"):
        try:
            reply = control.check(await control.request(worker_ctl, {"op": "fd_resync"}))
            d.log.info("fds_resync_requested", child=spec.name, count=reply.get("count"))
            break
        except ControlError:
            await asyncio.sleep(0.1)
    await d.stop.wait()
    d.log.info("daemon_stopping")
    await ctl.close()
    await sup.close()
    vault.close_all()
