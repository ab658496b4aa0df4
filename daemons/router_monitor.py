"""router-monitor: restarts the router when it dies (and the router restarts it back)."""

from __future__ import annotations

import sys

from theychat.daemons import daemon
from theychat.daemons.daemon import Daemon
from theychat.daemons.monitor import supervise_one
from theychat.daemons.supervisor import ChildSpec


async def main_async(d: Daemon) -> None:
    spec = ChildSpec("router", "router", None, d.child_args("theychat.daemons.router"))
    await supervise_one(d, spec)


def main(argv: list[str] | None = None) -> int:
    return daemon.run("router-monitor", main_async, argv)


if __name__ == "__main__":
    sys.exit(main())
