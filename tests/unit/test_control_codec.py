"""The pure parts of the control channel: encode/decode, ok/fail, check."""

from __future__ import annotations

import json
from typing import Any

import pytest

from theychat.daemons.control import MAX_PACKET, check, decode, encode, fail, ok
from theychat.daemons.errors import ControlError, TheyChatError


@pytest.mark.parametrize(
    "msg",
    [
        {"op": "topics"},
        {"op": "dm", "from": "alice", "to": "bob", "text": "café 日本 🎉\n"},
        ok(topics=[{"name": "general", "members": 0}]),
        fail("nick_taken", "bob is taken"),
        {},
    ],
)
def test_round_trip(msg: dict[str, Any]) -> None:
    data = encode(msg)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert decode(data) == msg


def test_encode_is_ascii_json() -> None:
    data = encode({"op": "dm", "text": "é"})
    assert data == b'{"op":"dm","text":"\\u00e9"}\n'


def test_ok_and_fail_shapes() -> None:
    assert ok() == {"ok": True}
    assert ok(nick="bob", n=2) == {"ok": True, "nick": "bob", "n": 2}
    assert fail("bad_request", "missing 'op'") == {
        "ok": False, "code": "bad_request", "error": "missing 'op'"}


@pytest.mark.parametrize("data", [b"{", b"", b"not json", b'{"a":}', b"\xff\xfe",
                                  b'{"a": 1} trailing'])
def test_decode_malformed(data: bytes) -> None:
    with pytest.raises(ControlError) as exc:
        decode(data)
    assert exc.value.code == "bad_json"


@pytest.mark.parametrize("data", [b"[1, 2]", b'"op"', b"3", b"null", b"true"])
def test_decode_non_object(data: bytes) -> None:
    with pytest.raises(ControlError) as exc:
        decode(data)
    assert exc.value.code == "bad_request"


def test_decode_deep_nesting_is_control_error() -> None:
    data = b"[" * 100_000
    assert len(data) < MAX_PACKET
    with pytest.raises(ControlError):
        decode(data)


def test_encode_oversize_raises() -> None:
    with pytest.raises(ControlError) as exc:
        encode({"op": "x", "blob": "a" * MAX_PACKET})
    assert exc.value.code == "too_large"
    assert isinstance(exc.value, TheyChatError)


def test_encode_just_under_limit() -> None:
    overhead = len(encode({"op": "x", "blob": ""}))
    data = encode({"op": "x", "blob": "a" * (MAX_PACKET - overhead)})
    assert len(data) == MAX_PACKET
    with pytest.raises(ControlError):
        encode({"op": "x", "blob": "a" * (MAX_PACKET - overhead + 1)})


def test_check_returns_ok_reply() -> None:
    reply = ok(nick="bob")
    assert check(reply) is reply


def test_check_raises_peer_code_and_text() -> None:
    with pytest.raises(ControlError) as exc:
        check(fail("nick_taken", "bob is taken"))
    assert exc.value.code == "nick_taken"
    assert str(exc.value) == "bob is taken"


def test_check_missing_ok_is_failure() -> None:
    with pytest.raises(ControlError) as exc:
        check({"error": "huh", "code": "weird"})
    assert exc.value.code == "weird"


def test_check_missing_error_text() -> None:
    with pytest.raises(ControlError, match="request failed"):
        check({"ok": False, "code": "x"})


def test_check_missing_code_is_not_none_string() -> None:
    with pytest.raises(ControlError) as exc:
        check({"ok": False, "error": "x"})
    assert exc.value.code == "control_error"


def test_decode_of_encoded_reply_through_check() -> None:
    wire = encode(fail("unavailable", "router.ctl: no reply"))
    assert json.loads(wire)["ok"] is False
    with pytest.raises(ControlError) as exc:
        check(decode(wire))
    assert exc.value.code == "unavailable"
