"""router-monitor: restarts the router when it dies (and the router restarts it back)."""

from __future__ import annotations

import sys

from daemons import daemon
from daemons.daemon import Daemon
from daemons.monitor import supervise_one
from daemons.supervisor import ChildSpec


async def main_async(d: Daemon) -> None:
    await supervise_one(d, ChildSpec("router", "router", None, d.child_args("daemons.router")))


def main(argv: list[str] | None = None) -> int:
    return daemon.run("router-monitor", main_async, argv)


if __name__ == "__main__":
    sys.exit(main())
