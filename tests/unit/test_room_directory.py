"""Pure state: a topic's Room, the router's Directory, and the TokenBucket rate limit."""

from __future__ import annotations

import random

import pytest

from theychat.daemons.directory import Directory, NickTaken
from theychat.daemons.ratelimit import TokenBucket
from theychat.daemons.room import Room

# --------------------------------------------------------------------------------------
# Room


def room_with(*nicks: str, history_size: int = 100) -> Room:
    room = Room("rust", history_size)
    for i, nick in enumerate(nicks):
        room.add(f"s{i}", nick)
    return room


def test_post_numbers_messages_in_order() -> None:
    room = room_with("alice", "bob")
    first = room.post("s0", "hi", 10.0)
    second = room.post("s1", "hello", 11.0)
    third = room.post("s0", "bye", 12.0)
    assert [m["seq"] for m in (first, second, third)] == [1, 2, 3]
    assert first == {"type": "message", "topic": "rust", "from": "alice", "text": "hi",
                     "seq": 1, "ts": 10.0}
    assert second["from"] == "bob"


def test_post_rounds_timestamp() -> None:
    room = room_with("alice")
    assert room.post("s0", "x", 1.23456789)["ts"] == 1.235


def test_post_continues_from_next_seq() -> None:
    room = Room("rust", 10, next_seq=41)
    room.add("s", "alice")
    assert room.post("s", "x", 0)["seq"] == 41
    assert room.next_seq == 42


def test_post_uses_current_nick() -> None:
    room = room_with("alice")
    assert room.rename("s0", "alicia") == "alice"
    assert room.post("s0", "x", 0)["from"] == "alicia"


def test_history_bounded() -> None:
    room = room_with("alice", history_size=3)
    for i in range(5):
        room.durable(room.post("s0", f"m{i}", float(i))["seq"])
    assert [m["text"] for m in room.history] == ["m2", "m3", "m4"]
    assert [m["seq"] for m in room.recent(10)] == [3, 4, 5]


def test_history_size_zero_keeps_nothing_but_still_numbers() -> None:
    room = room_with("alice", history_size=0)
    msgs = [room.post("s0", "x", 0) for _ in range(3)]
    assert [m["seq"] for m in msgs] == [1, 2, 3]
    assert list(room.history) == []
    assert room.recent(5) == []


def test_recent() -> None:
    room = room_with("alice")
    for i in range(5):
        room.durable(room.post("s0", f"m{i}", 0)["seq"])
    assert [m["text"] for m in room.recent(2)] == ["m3", "m4"]
    assert [m["text"] for m in room.recent(5)] == ["m0", "m1", "m2", "m3", "m4"]
    assert len(room.recent(100)) == 5
    assert room.recent(0) == []
    assert room.recent(-3) == []


def test_recent_is_a_copy() -> None:
    room = room_with("alice")
    room.durable(room.post("s0", "x", 0)["seq"])
    room.recent(1).clear()
    assert len(room.recent(1)) == 1


def test_find_is_case_insensitive() -> None:
    room = room_with("Alice", "bob")
    member = room.find("alice")
    assert member is not None and member.sid == "s0" and member.nick == "Alice"
    assert room.find("BOB") is not None
    assert room.find("carol") is None


def test_nicks_sorted_case_insensitively() -> None:
    room = room_with("charlie", "Bob", "alice", "Dave")
    assert room.nicks() == ["alice", "Bob", "charlie", "Dave"]


def test_add_remove() -> None:
    room = room_with("alice", "bob")
    removed = room.remove("s0")
    assert removed is not None and removed.nick == "alice"
    assert room.remove("s0") is None
    assert room.nicks() == ["bob"]
    assert room.find("alice") is None


def test_rename_updates_find_and_nicks() -> None:
    room = room_with("alice", "bob")
    room.rename("s1", "zed")
    assert room.nicks() == ["alice", "zed"]
    assert room.find("bob") is None
    found = room.find("ZED")
    assert found is not None and found.sid == "s1"


# --------------------------------------------------------------------------------------
# Directory


def directory(*topics: str, seed: int = 1) -> Directory:
    return Directory(list(topics) or ["general", "Random"], rng=random.Random(seed))


def test_open_session_gives_unique_guest_nicks() -> None:
    d = directory()
    nicks = [d.open_session(f"s{i}").nick for i in range(500)]
    assert len({n.lower() for n in nicks}) == 500
    assert all(n.startswith("guest") and n[5:].isdigit() for n in nicks)
    assert all(d.sessions[f"s{i}"].topic is None for i in range(500))


def test_open_session_retries_a_taken_guest_nick() -> None:
    first = directory(seed=3)
    taken = first.open_session("a").nick
    d = directory(seed=3)  # same seed: would draw the same nick first
    d.register("other", taken.upper(), None)
    info = d.open_session("a")
    assert info.nick.lower() != taken.lower()
    owner = d.find_nick(taken)
    assert owner is not None and owner.sid == "other"


def test_open_session_is_deterministic_with_seed() -> None:
    assert directory(seed=9).open_session("x").nick == directory(seed=9).open_session("x").nick


def test_rename_to_taken_nick_raises() -> None:
    d = directory()
    d.register("a", "alice", None)
    d.register("b", "bob", "general")
    with pytest.raises(NickTaken):
        d.rename("b", "ALICE")
    info = d.find_nick("bob")
    assert info is not None and info.sid == "b"  # unchanged
    assert d.sessions["b"].nick == "bob"


def test_rename_frees_old_nick_and_allows_own_case_change() -> None:
    d = directory()
    d.register("a", "alice", None)
    assert d.rename("a", "Alice") == "alice"
    assert d.sessions["a"].nick == "Alice"
    assert d.rename("a", "al") == "Alice"
    assert d.find_nick("alice") is None
    d.register("b", "alice", None)  # free again
    info = d.find_nick("AL")
    assert info is not None and info.sid == "a"


def test_close_session_frees_the_nick() -> None:
    d = directory()
    d.register("a", "alice", "general")
    closed = d.close_session("a")
    assert closed is not None and closed.nick == "alice"
    assert d.find_nick("alice") is None
    assert d.close_session("a") is None
    d.register("b", "Alice", None)
    info = d.find_nick("alice")
    assert info is not None and info.sid == "b"


def test_register_nick_of_another_session_raises() -> None:
    d = directory()
    d.register("a", "alice", None)
    with pytest.raises(NickTaken):
        d.register("b", "Alice", "general")
    assert "b" not in d.sessions
    info = d.find_nick("alice")
    assert info is not None and info.sid == "a"


def test_register_same_session_again_replaces_its_nick() -> None:
    d = directory()
    d.register("a", "alice", None)
    d.register("a", "alicia", "general")
    assert d.find_nick("alice") is None
    info = d.find_nick("alicia")
    assert info is not None and info.topic == "general"
    assert len(d.sessions) == 1


def test_counts_per_topic() -> None:
    d = directory("general", "random", "rust")
    d.register("a", "alice", "general")
    d.register("b", "bob", "general")
    d.register("c", "carol", "rust")
    d.register("l", "lobbyist", None)
    assert d.counts() == [{"name": "general", "members": 2}, {"name": "random", "members": 0},
                          {"name": "rust", "members": 1}]
    d.move("b", "random")
    d.close_session("c")
    assert d.counts() == [{"name": "general", "members": 1}, {"name": "random", "members": 1},
                          {"name": "rust", "members": 0}]


def test_in_topic_and_lobby() -> None:
    d = directory("general")
    d.register("a", "alice", "general")
    d.register("b", "bob", None)
    assert [s.nick for s in d.in_topic("general")] == ["alice"]
    assert [s.nick for s in d.in_topic(None)] == ["bob"]
    d.move("b", "general")
    assert sorted(s.nick for s in d.in_topic("general")) == ["alice", "bob"]
    assert d.in_topic(None) == []


def test_topic_named_case_insensitive() -> None:
    d = directory("general", "Random")
    assert d.topic_named("GENERAL") == "general"
    assert d.topic_named("random") == "Random"
    assert d.topic_named("rust") is None


# --------------------------------------------------------------------------------------
# TokenBucket


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


def test_history_shows_only_what_was_sent_out() -> None:
    room = room_with("alice")
    first = room.post("s0", "sent", 0)
    room.durable(first["seq"])
    room.post("s0", "not yet durable", 0)
    assert [m["text"] for m in room.recent(10)] == ["sent"]
    assert room.after(0) == [first]


def test_ops_and_bans_survive_a_snapshot() -> None:
    room = room_with("alice")
    room.apply({"type": "op", "nick": "Alice"})
    room.apply({"type": "ban", "nick": "Mallory"})
    again = Room("rust", 10)
    again.restore(room.snapshot())
    assert again.is_op("alice") and again.banned("MALLORY") and not again.banned("alice")
