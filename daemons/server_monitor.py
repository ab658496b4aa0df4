"""server-monitor@TOPIC: restarts its topic's server when it dies."""

from __future__ import annotations

import sys

from theychat.daemons import daemon
from theychat.daemons.daemon import Daemon
from theychat.daemons.errors import TheyChatError
from theychat.daemons.monitor import supervise_one
from theychat.daemons.supervisor import ChildSpec


async def main_async(d: Daemon) -> None:
    if d.topic is None:
        raise TheyChatError("--topic is required")
    spec = ChildSpec(f"server@{d.topic}", "server", d.topic,
                     d.child_args("theychat.daemons.server", d.topic))
    await supervise_one(d, spec)


def main(argv: list[str] | None = None) -> int:
    return daemon.run("server-monitor", main_async, argv)


if __name__ == "__main__":
    sys.exit(main())
