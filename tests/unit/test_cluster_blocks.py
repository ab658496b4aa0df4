"""The blocks a topic's sequencer writes to etcd: what one holds comes back whole, old
plain-JSON blocks still read, and anything else reads as no block rather than a crash."""

from __future__ import annotations

import json
import zlib

from theychat.daemons.clusterlog import _block, _unblock
from theychat.daemons.topiclog import Posted

ENTRIES = [Posted(7, 1733150000.123, "ann", "hello", False, "a1b2c3d4e5f60718", 3),
           Posted(8, 1733150000.5, "bob", "waves", True, "ffeeddccbbaa9988", 12),
           Posted(9, 1733150001.0, "sys", "ann joined", False, None, None)]
TAGS = ["a1b2c3d4e5f60718:3", "retagged", "h0.beef.1"]


def test_a_block_reads_back_as_written() -> None:
    assert _unblock(_block(ENTRIES, TAGS)) == list(zip(ENTRIES, TAGS, strict=True))


def test_a_block_is_smaller_than_its_json() -> None:
    many = [Posted(i, 1733150000.0 + i, "ann", f"line {i} of a chat", False,
                   "a1b2c3d4e5f60718", i) for i in range(1, 251)]
    tags = [f"a1b2c3d4e5f60718:{i}" for i in range(1, 251)]
    plain = json.dumps({"e": [[*p, t] for p, t in zip(many, tags, strict=True)]})
    assert len(_block(many, tags)) * 4 < len(plain)


def test_a_plain_json_block_still_reads() -> None:
    rows = [[*p, t] for p, t in zip(ENTRIES, TAGS, strict=True)]
    raw = json.dumps({"e": rows}).encode()
    assert _unblock(raw) == list(zip(ENTRIES, TAGS, strict=True))


def test_what_is_not_a_block_reads_as_none() -> None:
    assert _unblock(b"\x78\x01garbage") == []
    assert _unblock(zlib.compress(b'{"e": [[1, "x"]]}')) == []
    assert _unblock(zlib.compress(b"[]")) == []
    # a line without a session needs its tag: a null one is refused, not invented
    assert _unblock(zlib.compress(b'{"e": [[1, 1.0, "a", "b", false, null, null, null]]}')) == []


def test_a_block_that_inflates_beyond_the_bound_is_refused() -> None:
    bomb = zlib.compress(b'{"e": [' + b" " * (32 * 1024 * 1024) + b"]}", 9)
    assert len(bomb) < 64 * 1024
    assert _unblock(bomb) == []
