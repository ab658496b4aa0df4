"""Fixtures of the cluster tests: real etcd members (tests/etcdlab.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from theychat.daemons.soak.etcdlab import EtcdCluster, why_no_etcd


@pytest.fixture(scope="module")
def etcd1() -> Iterator[EtcdCluster]:
    """One etcd member on loopback, for the tests of one module."""
    reason = why_no_etcd()
    if reason:
        pytest.skip(reason)
    cluster = EtcdCluster(1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
