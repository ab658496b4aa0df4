"""What the two kinds of monitor share: supervise one child, answer `status`."""

from __future__ import annotations

from daemons import control
from daemons.control import Message, fail, ok
from daemons.daemon import Daemon
from daemons.supervisor import ChildSpec, Supervisor


async def supervise_one(d: Daemon, spec: ChildSpec) -> None:
    sup = Supervisor(d.paths, d.log, d.cfg.supervision.restart_delay_ms / 1000)

    async def on_control(msg: Message, fds: list[int]) -> Message:
        if msg["op"] == "status":
            return ok(daemon=d.status(), children=sup.status())
        return fail("unknown_op", f"unknown op {msg['op']!r}")

    ctl = control.ControlServer(d.paths.control(d.name), on_control, d.log)
    await ctl.start()
    sup.add(spec)
    d.ready(child=spec.name)
    await d.stop.wait()
    d.log.info("daemon_stopping")
    await ctl.close()
    await sup.close()
