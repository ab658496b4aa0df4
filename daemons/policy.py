"""Restart intensity, Erlang/OTP style: pure decisions over a list of restart times.

OTP's rule is "more than MaxR restarts within MaxT seconds and the supervisor gives up";
we add a short exponential backoff so a child that dies at once does not burn through
its MaxR restarts within a few milliseconds, before a transient cause (a port still in
TIME_WAIT, a peer mid-restart) has had a chance to clear.

Times are `time.monotonic()` seconds passed in by the caller; nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5  # MaxR; 0 means give up at the first death
    window_s: float = 30.0  # MaxT
    backoff_initial_ms: int = 0  # a first death in a while is restarted at once
    backoff_step_ms: int = 50
    backoff_max_ms: int = 1000

    def __post_init__(self) -> None:
        # The config loader reports operator mistakes by key; reaching these is a bug.
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if not self.window_s > 0:
            raise ValueError(f"window_s must be > 0, got {self.window_s}")
        for name in ("backoff_initial_ms", "backoff_step_ms", "backoff_max_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class Decision:
    action: Literal["restart", "give_up"]
    delay_s: float  # wait this long before restarting (0.0 when giving up)
    restarts_in_window: int  # earlier restarts counted against the limit, not this one


def _in_window(t: float, now: float, window_s: float) -> bool:
    # Strict, so a restart exactly window_s ago has aged out. A time after `now` (only
    # possible if the caller mixed clocks) still counts: erring towards giving up beats
    # restarting forever.
    return now - t < window_s


def prune(recent: Sequence[float], now: float, window_s: float) -> list[float]:
    """The restart times that still count at `now`, in their original order.

    Callers keep only these, so the history of a long-lived child stays bounded.
    """
    return [t for t in recent if _in_window(t, now, window_s)]


def decide(policy: RestartPolicy, recent: Sequence[float], now: float) -> Decision:
    """What to do about a child that just died, given when it was restarted before.

    With the defaults, successive deaths within 30 s get delays of 0, 50, 100, 200 and
    400 ms, and the sixth gives up: five restarts were allowed, a sixth would be "more
    than MaxR".
    """
    n = len(prune(recent, now, policy.window_s))
    if n >= policy.max_restarts:
        return Decision("give_up", 0.0, n)
    # Python ints do not overflow: a huge max_restarts only makes the product big, and
    # min() brings it back to the cap.
    delay_ms = policy.backoff_initial_ms if n == 0 else policy.backoff_step_ms << (n - 1)
    return Decision("restart", min(delay_ms, policy.backoff_max_ms) / 1000, n)
