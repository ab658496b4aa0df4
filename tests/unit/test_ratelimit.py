"""The token bucket that limits each client's lines, pure."""

from __future__ import annotations

from theychat.daemons.ratelimit import TokenBucket


def test_bucket_burst_then_refusal() -> None:
    bucket = TokenBucket(rate=2.0, burst=5, now=100.0)
    assert [bucket.allow(100.0) for _ in range(7)] == [True] * 5 + [False] * 2


def test_bucket_refills_over_time() -> None:
    bucket = TokenBucket(rate=2.0, burst=5, now=0.0)
    for _ in range(5):
        assert bucket.allow(0.0)
    assert not bucket.allow(0.0)
    assert not bucket.allow(0.4)  # 0.8 token
    assert bucket.allow(0.5)  # 1.0 token
    assert not bucket.allow(0.5)
    assert bucket.allow(1.0)


def test_bucket_refill_capped_at_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=3, now=0.0)
    assert [bucket.allow(1000.0) for _ in range(5)] == [True, True, True, False, False]


def test_bucket_sustained_rate() -> None:
    bucket = TokenBucket(rate=5.0, burst=3, now=0.0)
    allowed = sum(bucket.allow(t / 100) for t in range(1000))  # 10 s, polled every 10 ms
    # the initial burst, then 5 per second for 9.99 s
    assert 3 + 49 <= allowed <= 3 + 50
