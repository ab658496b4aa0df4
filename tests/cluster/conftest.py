"""Fixtures of the cluster tests: real etcd members (tests/etcdlab.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from theychat.daemons.soak.etcdlab import EtcdCluster, why_no_etcd


def _members(n: int) -> Iterator[EtcdCluster]:
    reason = why_no_etcd()
    if reason:
        pytest.skip(reason)
    cluster = EtcdCluster(n)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def etcd1() -> Iterator[EtcdCluster]:
    """One etcd member on loopback, for the tests of one module."""
    yield from _members(1)


@pytest.fixture
def etcd3() -> Iterator[EtcdCluster]:
    """Three members on loopback, for one test (which may kill one)."""
    yield from _members(3)
