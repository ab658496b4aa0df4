"""The typed control ops: every op round-trips, a bad request is refused naming its field,
and a dispatcher answers only what is in its table."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from theychat.daemons import ops
from theychat.daemons.errors import ControlError

SAMPLES: dict[str, dict[str, Any]] = {
    "adopt": {"session": {"sid": "ab12", "json": True}, "nick": "ann", "pending": "6869",
              "came_from": "rust", "notice": "moved", "resume_after": 7},
    "session_at": {"sid": "ab12", "nick": "ann", "topic": "rust"},
    "session_end": {"sid": "ab12", "reason": "quit"},
    "nick": {"sid": "ab12", "nick": "bob"},
    "dm": {"sid": "ab12", "to": "bob", "text": "hi"},
    "who": {"topic": "rust"},
    "create_topic": {"topic": "go", "sid": "ab12"},
    "drop_topic": {"topic": "go", "sid": "ab12", "op_here": True},
    "oper": {"sid": "ab12", "user": "root", "password": "pw"},
    "topic_info": {"topic": "rust"},
    "session": {"sid": "ab12"},
    "locate": {"sids": ["ab12", "cd34"]},
    "server_hello": {"topic": "rust", "members": [{"sid": "ab12", "nick": "ann"}]},
    "topic_down": {"topic": "rust"},
    "deliver": {"sid": "ab12", "event": {"type": "dm"}},
    "drop": {"sid": "ab12"},
    "evacuate": {"notice": "dropped"},
    "fd_store": {"id": "ab12", "meta": {"sid": "ab12"}},
    "fd_drop": {"id": "ab12"},
    "fd_fetch": {"after": "ab"},
    "fd_held": {"id": "ab12"},
    "kick": {"sid": "ab12", "by": "ann", "reason": "spam"},
    "take_link": {"pending": "00"},
    "cluster_lost": {"notice": "bye"},
    "host_gone": {"host": "h2"},
}


@pytest.mark.parametrize("name", sorted(ops.every_op()))
def test_every_op_round_trips(name: str) -> None:
    msg = {"op": name, **SAMPLES.get(name, {})}
    op = ops.decode(msg)
    assert type(op).name == name
    again = ops.decode(op.message())
    assert again == op
    for key, value in SAMPLES.get(name, {}).items():
        assert op.message()[key] == value


@pytest.mark.parametrize(("msg", "error"), [
    ({"op": "adopt"}, "adopt.session: missing"),
    ({"op": "adopt", "session": "x"}, "adopt.session: expected an object, got 'x'"),
    ({"op": "adopt", "session": {"sid": 5}}, "adopt.session.sid: expected a string, got 5"),
    ({"op": "adopt", "session": {"sid": ""}}, "adopt.session.sid: expected a session id"),
    ({"op": "adopt", "session": {"sid": "a"}, "resume_after": "7"},
     "adopt.resume_after: expected an integer, got '7'"),
    ({"op": "nick", "sid": "a", "nick": "bad nick!"}, "nick.nick: expected a nick"),
    ({"op": "drop_topic", "topic": "go", "sid": "a", "op_here": 1},
     "drop_topic.op_here: expected true or false, got 1"),
    ({"op": "locate", "sids": ["a", 3]}, r"locate.sids\[1\]: expected a string, got 3"),
    ({"op": "server_hello", "topic": "rust", "members": [{"sid": "a"}]},
     r"server_hello.members\[0\].nick: missing"),
    ({"op": "deliver", "sid": "a", "event": []}, "deliver.event: expected an object"),
    ({"op": 5}, "missing 'op'"),
    ({"op": "nope"}, "unknown op 'nope'"),
])
def test_a_bad_request_is_refused_naming_the_field(msg: dict[str, Any], error: str) -> None:
    with pytest.raises(ControlError, match=error) as e:
        ops.decode(msg)
    assert e.value.code in ("bad_request", "unknown_op")


def test_bad_hex_in_an_adopt_is_named() -> None:
    op = ops.decode({"op": "adopt", "session": {"sid": "a"}, "pending": "zz"})
    assert isinstance(op, ops.Adopt)
    with pytest.raises(ControlError, match=r"adopt\.pending: expected hex"):
        op.pending_bytes()


def test_ops_are_frozen() -> None:
    op = ops.Who(topic="rust")
    with pytest.raises(dataclasses.FrozenInstanceError):
        op.topic = "go"  # type: ignore[misc]


def test_a_dispatcher_answers_from_its_table_only() -> None:
    seen: list[ops.Op] = []

    async def who(op: ops.Who, fds: list[int]) -> dict[str, Any]:
        seen.append(op)
        return {"ok": True, "topic": op.topic}

    d = ops.Dispatcher("server@rust", {ops.Who: who, ops.Status: lambda op, fds: {"ok": True}})

    async def body() -> None:
        assert await d({"op": "who", "topic": "rust"}, []) == {"ok": True, "topic": "rust"}
        assert await d({"op": "status"}, []) == {"ok": True}
        not_here = await d({"op": "adopt", "session": {"sid": "a"}}, [])
        assert not_here["code"] == "unknown_op" and "server@rust" in not_here["error"]
        assert (await d({"op": "nope"}, []))["code"] == "unknown_op"
        with pytest.raises(ControlError, match=r"who\.topic: missing"):
            await d({"op": "who"}, [])

    asyncio.run(body())
    assert seen == [ops.Who(topic="rust")]
    assert d.serves() == ["status", "who"]
