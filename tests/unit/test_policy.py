"""Restart intensity and backoff: pure, with the clock passed in."""

from __future__ import annotations

import pytest

from theychat.daemons.policy import Decision, RestartPolicy, decide, prune


def test_defaults_back_off_then_give_up_at_the_sixth_death() -> None:
    policy = RestartPolicy()
    recent: list[float] = []
    now = 1000.0
    delays = []
    for _ in range(5):
        d = decide(policy, recent, now)
        assert d.action == "restart"
        assert d.restarts_in_window == len(recent)
        delays.append(round(d.delay_s * 1000))
        recent.append(now + d.delay_s)
        now += 1.0
    assert delays == [0, 50, 100, 200, 400]
    assert decide(policy, recent, now) == Decision("give_up", 0.0, 5)


def test_restarts_outside_the_window_do_not_count() -> None:
    policy = RestartPolicy()
    old = [0.0, 1.0, 2.0, 3.0, 4.0]
    assert decide(policy, old, 4.0).action == "give_up"
    # 30 s after each of them they have all aged out: a fresh start, no delay.
    assert decide(policy, old, 34.0) == Decision("restart", 0.0, 0)
    # Partly aged out: three remain, so the fourth step of the backoff.
    assert decide(policy, old, 31.5) == Decision("restart", 0.2, 3)


def test_window_edge_is_exclusive() -> None:
    assert prune([0.0, 0.001], 30.0, 30.0) == [0.001]


def test_backoff_is_capped() -> None:
    policy = RestartPolicy(max_restarts=100, backoff_initial_ms=10, backoff_step_ms=50,
                           backoff_max_ms=300)
    delays = [decide(policy, [0.0] * n, 1.0).delay_s for n in range(8)]
    assert delays == [0.01, 0.05, 0.1, 0.2, 0.3, 0.3, 0.3, 0.3]
    # A huge history is only capped, never an overflow.
    assert decide(RestartPolicy(max_restarts=10_000), [0.0] * 5000, 1.0).delay_s == 1.0


def test_zero_max_restarts_gives_up_at_once() -> None:
    assert decide(RestartPolicy(max_restarts=0), [], 5.0) == Decision("give_up", 0.0, 0)


def test_prune_keeps_order_and_future_times() -> None:
    assert prune([5.0, 40.0, 20.0, 100.0], 45.0, 30.0) == [40.0, 20.0, 100.0]
    assert prune([], 1.0, 30.0) == []


@pytest.mark.parametrize(
    "kwargs",
    [{"max_restarts": -1}, {"window_s": 0.0}, {"backoff_step_ms": -1},
     {"backoff_initial_ms": -5}, {"backoff_max_ms": -1}],
)
def test_nonsense_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RestartPolicy(**kwargs)  # type: ignore[arg-type]
