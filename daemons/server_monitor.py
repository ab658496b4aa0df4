"""server-monitor@TOPIC: restarts its topic's server when it dies."""

from __future__ import annotations

import sys

from theychat.daemons import monitor
from theychat.daemons.tree import Role


def main(argv: list[str] | None = None) -> int:
    return monitor.run(Role.SERVER_MONITOR, argv)


if __name__ == "__main__":
    sys.exit(main())
