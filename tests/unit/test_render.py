"""Events rendered for people (text) and programs (JSON)."""

from __future__ import annotations

import json

import pytest

from theychat.daemons.render import Event, encode, encode_json, encode_text, error, text_lines

MSG: Event = {"type": "message", "topic": "rust", "from": "alice", "text": "hi",
              "seq": 7, "ts": 1.5}


@pytest.mark.parametrize(
    ("event", "lines"),
    [
        (MSG, ["[rust] alice: hi"]),
        ({"type": "dm", "from": "bob", "to": "alice", "text": "psst"},
         ["[dm from bob] psst"]),
        ({"type": "error", "code": "bad_args", "text": "usage: /join TOPIC"},
         ["! usage: /join TOPIC"]),
        ({"type": "presence", "topic": "rust", "nick": "bob", "event": "joined"},
         ["* bob joined rust"]),
        ({"type": "presence", "topic": "rust", "nick": "bob", "event": "left"},
         ["* bob left rust"]),
        ({"type": "presence", "topic": "rust", "nick": "bob", "event": "left",
          "reason": "connection lost"},
         ["* bob left rust (connection lost)"]),
        ({"type": "presence", "topic": "rust", "nick": "bob", "event": "left", "reason": None},
         ["* bob left rust"]),
        ({"type": "presence", "topic": "rust", "nick": "robert", "old": "bob",
          "event": "renamed"},
         ["* bob is now known as robert"]),
        ({"type": "topics", "topics": [{"name": "general", "members": 2},
                                       {"name": "random", "members": 0}]},
         ["* topics (members): general (2), random (0)"]),
        ({"type": "topics", "topics": []}, ["* topics (members): none"]),
        ({"type": "who", "topic": "rust", "members": ["alice", "bob"]},
         ["* in rust: alice, bob"]),
        ({"type": "who", "topic": None, "members": ["guest1"]},
         ["* in the lobby: guest1"]),
        ({"type": "who", "topic": "rust", "members": []}, ["* in rust: nobody"]),
        ({"type": "joined", "topic": "rust", "members": ["alice"]},
         ["* you are in rust with alice; type to talk, /leave for the lobby"]),
        ({"type": "joined", "topic": "rust", "members": []},
         ["* you are in rust with nobody; type to talk, /leave for the lobby"]),
        ({"type": "left", "topic": "rust"}, ["* you left rust; you are in the lobby"]),
        ({"type": "help", "command": None, "lines": ["/a  x", "/b  y"]},
         ["* /a  x", "* /b  y"]),
        ({"type": "ok", "cmd": "nick", "text": "you are now bob"}, ["* you are now bob"]),
        ({"type": "ok", "cmd": "json"}, []),
        ({"type": "notice", "text": "the router is shutting down"},
         ["* the router is shutting down"]),
        ({"type": "bye", "text": "bye"}, ["* bye"]),
        ({"type": "sent", "topic": "rust", "seq": 3}, []),
        ({"type": "mystery", "text": "fallback"}, ["* fallback"]),
        ({"type": "mystery"}, ["* mystery"]),
    ],
)
def test_text_lines(event: Event, lines: list[str]) -> None:
    assert text_lines(event) == lines


def test_history_lines_carry_seq() -> None:
    second = {**MSG, "seq": 8, "from": "bob", "text": "yo"}
    event = {"type": "history", "topic": "rust", "messages": [MSG, second]}
    assert text_lines(event) == [
        "* history of rust: 2 message(s)",
        "[rust #7] alice: hi",
        "[rust #8] bob: yo",
    ]


def test_empty_history() -> None:
    event = {"type": "history", "topic": "rust", "messages": []}
    assert text_lines(event) == ["* history of rust: 0 message(s)"]


def test_hello_names_session_and_help() -> None:
    (line,) = text_lines({"type": "hello", "session": "s-1234abcd", "nick": "guest42"})
    assert "s-1234abcd" in line
    assert "guest42" in line
    assert "/help" in line


def test_encode_text_one_line_per_text_line() -> None:
    assert encode_text(MSG) == b"[rust] alice: hi\n"
    history = {"type": "history", "topic": "t", "messages": [MSG]}
    assert encode_text(history) == b"* history of t: 1 message(s)\n[rust #7] alice: hi\n"
    assert encode_text({"type": "sent", "seq": 1}) == b""


def test_encode_text_is_utf8() -> None:
    event = {**MSG, "text": "café 日本 🎉"}
    assert encode_text(event) == "[rust] alice: café 日本 🎉\n".encode()


@pytest.mark.parametrize(
    "event",
    [
        MSG,
        {**MSG, "text": "café 日本 🎉"},
        {**MSG, "text": "line1\nline2\r\u2028end"},
        {"type": "who", "topic": None, "members": []},
        {"type": "history", "topic": "rust", "messages": [MSG, MSG]},
        error("bad_args", "quote \" and backslash \\"),
    ],
)
def test_json_round_trip_one_line(event: Event) -> None:
    data = encode_json(event)
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1
    assert b"\r" not in data
    assert json.loads(data) == event


def test_json_keeps_non_ascii_and_is_compact() -> None:
    data = encode_json({"type": "message", "text": "日本"})
    assert "日本".encode() in data
    assert b"\\u" not in data
    assert data == '{"type":"message","text":"日本"}\n'.encode()


def test_encode_switches_on_mode() -> None:
    assert encode(MSG, json_mode=True) == encode_json(MSG)
    assert encode(MSG, json_mode=False) == encode_text(MSG)
    assert encode({"type": "sent", "seq": 2}, json_mode=False) == b""
    assert json.loads(encode({"type": "sent", "seq": 2}, json_mode=True)) == {
        "type": "sent", "seq": 2}


def test_error_event() -> None:
    assert error("nick_taken", "bob is taken") == {
        "type": "error", "code": "nick_taken", "text": "bob is taken"}
    assert text_lines(error("nick_taken", "bob is taken")) == ["! bob is taken"]
