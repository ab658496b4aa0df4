"""router-monitor: restarts the router when it dies (and the router restarts it back)."""

from __future__ import annotations

import sys

from theychat.daemons import monitor
from theychat.daemons.tree import Role


def main(argv: list[str] | None = None) -> int:
    return monitor.run(Role.ROUTER_MONITOR, argv)


if __name__ == "__main__":
    sys.exit(main())
