"""An asyncio event loop on a virtual clock, for tests of code that sleeps and times out.

`loop.time()` starts at 0 and moves only when nothing is ready to run: the loop then
jumps straight to its next timer instead of waiting for it. A test of a 30-second
restart window takes milliseconds, and the order of events is exactly what the timers
say, whatever the machine is doing. Code under test must take its clock from the loop
(`asyncio.get_running_loop().time()`), as the supervisor does.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class _WarpSelector(selectors.DefaultSelector):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(0)
        if not events:
            if timeout is None:
                raise RuntimeError("virtual clock: nothing will ever happen (deadlock)")
            self.now += timeout  # nothing to do until the next timer: go there
        return events


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._warp = _WarpSelector()
        super().__init__(self._warp)

    def time(self) -> float:
        return self._warp.now


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to its end on a fresh virtual-clock loop."""
    loop = VirtualLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
