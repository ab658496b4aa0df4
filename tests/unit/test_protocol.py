"""The sans-IO line protocol: LineBuffer, parse(), sanitize(), help_lines()."""

from __future__ import annotations

import random
import unicodedata

import pytest

from theychat.daemons.errors import (
    BadArguments,
    InvalidUtf8,
    LineTooLong,
    ProtocolError,
    UnknownCommand,
)
from theychat.daemons.protocol import (
    COMMANDS,
    HISTORY_MAX,
    MAX_LINE_BYTES,
    Command,
    LineBuffer,
    Say,
    help_lines,
    parse,
    sanitize,
    valid_name,
)

# An outcome of LineBuffer.next_line(): the decoded line, or (error class name, code).
Outcome = str | tuple[str, str]


def _drain(buf: LineBuffer, out: list[Outcome]) -> None:
    while True:
        try:
            line = buf.next_line()
        except ProtocolError as e:
            out.append((type(e).__name__, e.code))
            continue
        if line is None:
            return
        out.append(line)


def run_whole(data: bytes, max_line: int = MAX_LINE_BYTES) -> tuple[list[Outcome], bytes]:
    buf = LineBuffer(max_line)
    out: list[Outcome] = []
    buf.feed(data)
    _drain(buf, out)
    return out, buf.pending()


def run_bytewise(data: bytes, max_line: int = MAX_LINE_BYTES) -> tuple[list[Outcome], bytes]:
    buf = LineBuffer(max_line)
    out: list[Outcome] = []
    for i in range(len(data)):
        buf.feed(data[i : i + 1])
        _drain(buf, out)
    return out, buf.pending()


def outcomes(data: bytes, max_line: int = MAX_LINE_BYTES) -> list[Outcome]:
    """Feed `data` whole and byte by byte; both must agree, and that answer is returned."""
    whole = run_whole(data, max_line)
    bytewise = run_bytewise(data, max_line)
    assert whole == bytewise, f"whole {whole!r} != byte by byte {bytewise!r}"
    return whole[0]


TOO_LONG = ("LineTooLong", "line_too_long")
BAD_UTF8 = ("InvalidUtf8", "bad_utf8")


# --------------------------------------------------------------------------------------
# LineBuffer


class TestLineBuffer:
    def test_splits_on_newline(self) -> None:
        assert outcomes(b"hello\nworld\n") == ["hello", "world"]

    def test_crlf_accepted(self) -> None:
        assert outcomes(b"hello\r\nworld\r\n") == ["hello", "world"]

    def test_only_one_trailing_cr_is_stripped(self) -> None:
        assert outcomes(b"a\r\r\n") == ["a\r"]

    def test_empty_lines_are_lines(self) -> None:
        assert outcomes(b"\n\r\n") == ["", ""]

    def test_incomplete_line_is_held(self) -> None:
        buf = LineBuffer()
        buf.feed(b"partial")
        assert buf.next_line() is None
        assert buf.pending() == b"partial"
        buf.feed(b" line\n")
        assert buf.next_line() == "partial line"
        assert buf.next_line() is None
        assert buf.pending() == b""

    def test_pending_is_exactly_the_unconsumed_bytes(self) -> None:
        buf = LineBuffer()
        buf.feed(b"one\ntwo\nthr")
        assert buf.pending() == b"one\ntwo\nthr"
        assert buf.next_line() == "one"
        assert buf.pending() == b"two\nthr"
        assert buf.next_line() == "two"
        assert buf.pending() == b"thr"
        assert buf.next_line() is None
        assert buf.pending() == b"thr"

    def test_line_of_exactly_max_bytes_is_accepted(self) -> None:
        line = "x" * MAX_LINE_BYTES
        assert outcomes(line.encode() + b"\n") == [line]
        assert outcomes(line.encode() + b"\r\n") == [line]

    def test_max_bytes_counts_bytes_not_characters(self) -> None:
        ok = "é" * (MAX_LINE_BYTES // 2)  # 2 bytes each: exactly MAX_LINE_BYTES
        assert outcomes(ok.encode() + b"\n") == [ok]
        assert outcomes(ok.encode() + b"e\n") == [TOO_LONG]

    def test_line_one_byte_too_long_is_refused_once_then_next_line_works(self) -> None:
        data = b"y" * (MAX_LINE_BYTES + 1) + b"\nnext\n"
        assert outcomes(data) == [TOO_LONG, "next"]
        data = b"y" * (MAX_LINE_BYTES + 1) + b"\r\nnext\r\n"
        assert outcomes(data) == [TOO_LONG, "next"]

    def test_very_long_line_raises_once_and_rest_is_skipped(self) -> None:
        data = b"z" * (3 * MAX_LINE_BYTES) + b"\nok\n"
        assert outcomes(data) == [TOO_LONG, "ok"]

    def test_long_line_without_newline_then_newline_later(self) -> None:
        buf = LineBuffer()
        buf.feed(b"q" * (MAX_LINE_BYTES + 10))
        with pytest.raises(LineTooLong) as exc:
            buf.next_line()
        assert exc.value.code == "line_too_long"
        assert buf.next_line() is None
        assert buf.pending() == b""
        buf.feed(b"q" * 10_000)  # still the same over-long line: silently dropped
        assert buf.next_line() is None
        assert buf.pending() == b""
        buf.feed(b"\nok\n")
        assert buf.next_line() == "ok"
        assert buf.next_line() is None

    def test_invalid_utf8_raises_and_next_line_works(self) -> None:
        assert outcomes(b"bad \xff\xfe here\ngood\n") == [BAD_UTF8, "good"]
        buf = LineBuffer()
        buf.feed(b"\xc3\x28\nfine\n")  # an invalid 2-byte sequence
        with pytest.raises(InvalidUtf8) as exc:
            buf.next_line()
        assert exc.value.code == "bad_utf8"
        assert buf.next_line() == "fine"

    def test_truncated_multibyte_at_end_of_line_is_invalid(self) -> None:
        assert outcomes("日".encode()[:2] + b"\nok\n") == [BAD_UTF8, "ok"]

    def test_multibyte_split_across_feeds(self) -> None:
        text = "héllo 日本 🎉"
        data = text.encode() + b"\n"
        for cut in range(1, len(data)):
            buf = LineBuffer()
            buf.feed(data[:cut])
            assert buf.next_line() is None
            buf.feed(data[cut:])
            assert buf.next_line() == text
        assert outcomes(data) == [text]

    def test_errors_then_lines_in_one_feed(self) -> None:
        data = b"a\n" + b"L" * 5000 + b"\n\xff\nb\r\n\n"
        assert outcomes(data) == ["a", TOO_LONG, BAD_UTF8, "b", ""]

    def test_small_max_line_boundaries(self) -> None:
        assert outcomes(b"12345678\n", max_line=8) == ["12345678"]
        assert outcomes(b"12345678\r\n", max_line=8) == ["12345678"]
        assert outcomes(b"123456789\nz\n", max_line=8) == [TOO_LONG, "z"]
        assert outcomes(b"123456789\r\nz\n", max_line=8) == [TOO_LONG, "z"]


# --------------------------------------------------------------------------------------
# Fuzz: LineBuffer + parse() never leak anything but ProtocolError, whole or bytewise.

_FRAGMENTS: list[bytes] = [
    b"a", b"Z", b"0", b"7", b" ", b"\t", b"\n", b"\r", b"\r\n", b"\xff", b"\xc3", b"\x80",
    b"\x1b", b"\x1b[31m", b"\x1b]0;t\x07", b"\x00", b"\x7f", "é".encode(), "日".encode(),
    "🎉".encode(), "\u202e".encode(), b"/", b"//", b"/nick ", b"/join ", b"/msg ",
    b"/history ", b"/json ", b"/help ", b"/quit", b"/who", b"/topics", b"/leave", b"/JOIN ",
    b"/bogus", b"-", b"_",
]


def _random_stream(rng: random.Random, max_line: int) -> bytes:
    parts: list[bytes] = []
    for _ in range(rng.randrange(1, 12)):
        r = rng.random()
        if r < 0.15:  # a long run around the limit
            parts.append(rng.choice(b"x\xff\r ").to_bytes(1, "big") * rng.randrange(
                max(0, max_line - 3), max_line + 4))
        elif r < 0.2:
            parts.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20))))
        else:
            parts.append(rng.choice(_FRAGMENTS))
    return b"".join(parts)


def _check_stream(data: bytes, max_line: int, seen: set[str]) -> None:
    for bytewise in (False, True):
        buf = LineBuffer(max_line)
        feeds = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
        for chunk in feeds:
            buf.feed(chunk)
            while True:
                try:
                    line = buf.next_line()
                except ProtocolError as e:  # anything else fails the test
                    seen.add(type(e).__name__)
                    continue
                if line is None:
                    break
                try:
                    result = parse(line)
                except ProtocolError as e:
                    seen.add(type(e).__name__)
                    continue
                seen.add(type(result).__name__)
                if isinstance(result, Say):
                    assert not any(unicodedata.category(c) == "Cc" for c in result.text)
            assert len(buf.pending()) <= max_line + 1
    # whole and byte-by-byte agree on every outcome and on what is left
    assert run_whole(data, max_line) == run_bytewise(data, max_line)


ALL_KINDS = {"LineTooLong", "InvalidUtf8", "UnknownCommand", "BadArguments", "Say",
             "Command", "NoneType"}


def test_fuzz_small_max_line() -> None:
    rng = random.Random(20240611)
    seen: set[str] = set()
    for _ in range(3000):
        max_line = rng.choice((1, 2, 8, 16, 32))
        _check_stream(_random_stream(rng, max_line), max_line, seen)
    assert seen == ALL_KINDS  # the fuzz reaches every outcome


def test_fuzz_default_max_line() -> None:
    rng = random.Random(7)
    seen: set[str] = set()
    for _ in range(40):
        _check_stream(_random_stream(rng, MAX_LINE_BYTES), MAX_LINE_BYTES, seen)
    assert "LineTooLong" in seen


def test_fuzz_parse_random_text() -> None:
    """parse() on arbitrary decoded text raises only ProtocolError."""
    rng = random.Random(99)
    alphabet = "ab Z09_-/\t\x1b[]\x07\x00\x7f\x9b\u202eé日🎉 "
    prefixes = ["", "/", "//", "/nick ", "/join ", "/msg ", "/msg bob ", "/history ",
                "/json ", "/help ", "/who ", "/NICK "]
    for _ in range(3000):
        text = rng.choice(prefixes) + "".join(
            rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        try:
            result = parse(text)
        except ProtocolError:
            continue
        assert result is None or isinstance(result, Say | Command)


# --------------------------------------------------------------------------------------
# parse()


class TestParse:
    @pytest.mark.parametrize("line", ["", " ", "   \t ", "\t"])
    def test_blank_is_none(self, line: str) -> None:
        assert parse(line) is None

    def test_plain_text_is_say(self) -> None:
        assert parse("hello world") == Say("hello world")

    def test_say_is_sanitized_and_right_stripped(self) -> None:
        assert parse("\x1b[31mred\x1b[0m text   ") == Say("red text")
        assert parse("  indented") == Say("  indented")

    def test_double_slash_escapes_a_slash(self) -> None:
        assert parse("//x") == Say("/x")
        assert parse("//join rust") == Say("/join rust")

    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            ("/nick alice", Command("nick", arg="alice")),
            ("/nick A-b_9", Command("nick", arg="A-b_9")),
            ("/topics", Command("topics")),
            ("/join rust", Command("join", arg="rust")),
            ("/leave", Command("leave")),
            ("/who", Command("who")),
            ("/msg bob hi there", Command("msg", arg="bob", text="hi there")),
            ("/msg bob \x1b[1mbold\x1b[0m", Command("msg", arg="bob", text="bold")),
            ("/history", Command("history", number=None)),
            ("/history 5", Command("history", number=5)),
            ("/json", Command("json", arg="on")),
            ("/json on", Command("json", arg="on")),
            ("/json off", Command("json", arg="off")),
            ("/json OFF", Command("json", arg="off")),
            ("/help", Command("help", arg="")),
            ("/help join", Command("help", arg="join")),
            ("/help /JOIN", Command("help", arg="join")),
            ("/quit", Command("quit")),
            ("/resume 0a1b2c", Command("resume", arg="0a1b2c", number=None)),
            ("/who rust", Command("who", arg="rust")),
            ("/me waves \x1b[31mhi", Command("me", text="waves hi")),
            ("/kick bob", Command("kick", arg="bob", text="")),
            ("/kick bob stop spamming", Command("kick", arg="bob", text="stop spamming")),
            ("/oper root two words", Command("oper", arg="root", text="two words")),
            ("/create go", Command("create", arg="go")),
            ("/resume 0a1b2c 42", Command("resume", arg="0a1b2c", number=42)),
            ("/resume 0a1b2c 0", Command("resume", arg="0a1b2c", number=0)),
        ],
    )
    def test_valid_commands(self, line: str, expected: Command) -> None:
        assert parse(line) == expected

    def test_every_command_in_table_parses(self) -> None:
        samples = {
            "nick": "/nick alice", "topics": "/topics", "join": "/join rust",
            "leave": "/leave", "who": "/who", "msg": "/msg bob hi",
            "history": "/history 3", "json": "/json off", "help": "/help msg",
            "quit": "/quit", "resume": "/resume 3f9a 7", "me": "/me waves",
            "create": "/create go", "oper": "/oper root pw", "kick": "/kick bob spam",
            "ban": "/ban bob", "drop": "/drop go", "say": "/say 1 hi",
        }
        assert set(samples) == set(COMMANDS), "a command was added: give it a sample"
        for name, line in samples.items():
            result = parse(line)
            if name == "say":  # a numbered message
                assert result == Say("hi", line=1)
                continue
            assert isinstance(result, Command)
            assert result.name == name

    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            ("/say 1 hello", Say("hello", line=1)),
            ("/say 7   two leading spaces kept", Say("  two leading spaces kept", line=7)),
            ("/say 9 /usr/bin", Say("/usr/bin", line=9)),  # taken as is: no // escape
            ("/SAY 12 x \x1b[31mred", Say("x red", line=12)),
            (f"/say {2**53} last", Say("last", line=2**53)),
        ],
    )
    def test_numbered_messages(self, line: str, expected: Say) -> None:
        assert parse(line) == expected

    @pytest.mark.parametrize(
        "line", ["/say", "/say 3", "/say 3   ", "/say x hi", "/say 0 hi", "/say -1 hi",
                 "/say ² hi", f"/say {2**53 + 1} hi", "/say 1.5 hi"],
    )
    def test_bad_numbered_messages(self, line: str) -> None:
        with pytest.raises(BadArguments, match="usage: /say N TEXT"):
            parse(line)

    @pytest.mark.parametrize(
        "line", ["/JOIN rust", "/Join rust", "/jOiN   rust  "],
    )
    def test_commands_are_case_insensitive(self, line: str) -> None:
        assert parse(line) == Command("join", arg="rust")

    def test_argument_case_is_kept(self) -> None:
        assert parse("/nick Alice") == Command("nick", arg="Alice")

    @pytest.mark.parametrize(
        "line",
        [
            "/nick", "/nick a b", "/join", "/join a b", "/msg", "/msg bob", "/msg bob   ",
            "/msg bob \x1b[0m", "/topics x", "/leave now", "/who a b", "/quit now",
            "/json maybe", "/history 0", "/history -1", "/history x", "/history 1.5",
            f"/history {HISTORY_MAX + 1}", "/help nosuch",
        ],
    )
    def test_bad_arguments(self, line: str) -> None:
        with pytest.raises(BadArguments) as exc:
            parse(line)
        assert exc.value.code == "bad_args"

    def test_usage_in_bad_args_text(self) -> None:
        with pytest.raises(BadArguments, match=r"usage: /join TOPIC"):
            parse("/join")
        with pytest.raises(BadArguments, match=r"usage: /msg NICK TEXT"):
            parse("/msg bob")

    @pytest.mark.parametrize(
        ("line", "word"),
        [
            ("/nick al!ce", "name"), ("/nick " + "a" * 33, "name"), ("/nick é", "name"),
            ("/join c++", "topic name"), ("/join " + "t" * 33, "topic name"),
        ],
    )
    def test_bad_names(self, line: str, word: str) -> None:
        with pytest.raises(BadArguments) as exc:
            parse(line)
        assert exc.value.code == "bad_name"
        assert f"invalid {word}" in exc.value.text

    def test_bad_name_text_is_sanitized_and_bounded(self) -> None:
        with pytest.raises(BadArguments) as exc:
            parse("/nick \x1b]0;pwned\x07" + "x" * 100)
        assert "\x1b" not in exc.value.text and "\x07" not in exc.value.text
        assert len(exc.value.text) < 120

    def test_invalid_nick_in_msg_is_no_such_nick(self) -> None:
        with pytest.raises(BadArguments) as exc:
            parse("/msg b@d hello")
        assert exc.value.code == "no_such_nick"
        assert "b@d" in exc.value.text

    def test_history_bounds(self) -> None:
        assert parse("/history 1") == Command("history", number=1)
        assert parse(f"/history {HISTORY_MAX}") == Command("history", number=HISTORY_MAX)

    def test_history_superscript_digit_is_bad_args(self) -> None:
        with pytest.raises(BadArguments):
            parse("/history ²")

    @pytest.mark.parametrize("line", ["/bogus", "/BOGUS x y", "/", "/ join"])
    def test_unknown_command(self, line: str) -> None:
        with pytest.raises(UnknownCommand) as exc:
            parse(line)
        assert exc.value.code == "unknown_command"
        assert "/help" in exc.value.text

    def test_unknown_command_text_is_sanitized_and_bounded(self) -> None:
        with pytest.raises(UnknownCommand) as exc:
            parse("/\x1b[2J" + "w" * 200)
        assert exc.value.text == f"unknown command /{'w' * 40}; type /help for the list"

    def test_help_for_unknown_command_mentions_help(self) -> None:
        with pytest.raises(BadArguments, match=r"/help"):
            parse("/help frobnicate")


# --------------------------------------------------------------------------------------
# valid_name()


class TestValidName:
    @pytest.mark.parametrize("name", ["a", "Alice", "x_y-z", "0", "a" * 32])
    def test_valid(self, name: str) -> None:
        assert valid_name(name)

    @pytest.mark.parametrize("name", ["", "a" * 33, "a b", "é", "a.b", "a\tb", "-\x00"])
    def test_invalid(self, name: str) -> None:
        assert not valid_name(name)

    def test_trailing_newline_is_invalid(self) -> None:
        assert not valid_name("alice\n")


# --------------------------------------------------------------------------------------
# sanitize()


class TestSanitize:
    @pytest.mark.parametrize(
        ("raw", "clean"),
        [
            ("\x1b[31mred\x1b[0m", "red"),
            ("\x1b[1;32;40mX\x1b[m", "X"),
            ("a\x1b[2Jb", "ab"),
            ("\x1b]0;pwned\x07after", "after"),
            ("\x1b]0;pwned\x1b\\after", "after"),
            ("bare\x1besc", "bareesc"),  # ESC + lowercase: only the ESC goes
            ("a\x1bMb", "ab"),  # a two-byte escape (reverse index) goes whole
            ("a\x1b", "a"),
            ("bell\x07 nul\x00 bs\x08 cr\r lf\n", "bell nul bs cr lf"),
            ("del\x7f", "del"),
            ("c1\x9b31mred", "c131mred"),
            ("c1\x85next", "c1next"),
            ("\u202eevil\u202c", "evil"),
            ("\u2066iso\u2069", "iso"),
            ("tab\there", "tab here"),
            ("café 日本 🎉", "café 日本 🎉"),
            ("", ""),
        ],
    )
    def test_cases(self, raw: str, clean: str) -> None:
        assert sanitize(raw) == clean

    def test_bare_esc_removed(self) -> None:
        out = sanitize("x\x1b y")
        assert "\x1b" not in out
        assert out.startswith("x") and out.endswith("y")

    def test_normal_unicode_untouched(self) -> None:
        text = "Ça va? 日本語 Ελληνικά עברית 👩‍💻 ñ"
        assert sanitize(text) == text

    def test_no_control_characters_survive(self) -> None:
        rng = random.Random(1234)
        pool = (
            [chr(c) for c in range(0x00, 0x20)]
            + [chr(c) for c in range(0x7F, 0xA0)]
            + list("[]0;mJ\\abc 123é日🎉\u202a\u202e\u2066\u2069")
        )
        for _ in range(3000):
            s = "".join(rng.choice(pool) for _ in range(rng.randrange(0, 30)))
            out = sanitize(s)
            assert not any(unicodedata.category(ch) == "Cc" for ch in out), repr(s)
            assert not any(ch in out for ch in "\u202a\u202b\u202c\u202d\u202e\u2066\u2069")

    def test_idempotent(self) -> None:
        rng = random.Random(5)
        pool = list("\x1b[]0;m\x07\\ab\t\x9b\u202e")
        for _ in range(1000):
            s = "".join(rng.choice(pool) for _ in range(rng.randrange(0, 20)))
            once = sanitize(s)
            assert sanitize(once) == once


# --------------------------------------------------------------------------------------
# help_lines()


class TestHelp:
    def test_all_commands_listed(self) -> None:
        lines = help_lines()
        assert len(lines) == len(COMMANDS) + 1
        for spec, line in zip(COMMANDS.values(), lines[:-1], strict=True):
            assert line.startswith(spec.usage)
            assert line.endswith(spec.summary)
        assert "//" in lines[-1]

    def test_columns_aligned(self) -> None:
        lines = help_lines()[:-1]
        starts = {line.index(spec.summary) for line, spec in zip(lines, COMMANDS.values(),
                                                                    strict=True)}
        assert len(starts) == 1

    def test_one_command(self) -> None:
        assert help_lines("join") == ["/join TOPIC  enter a topic (leaves the current one)"]

    def test_help_command_feeds_help_lines(self) -> None:
        cmd = parse("/help MSG")
        assert isinstance(cmd, Command)
        assert help_lines(cmd.arg) == [f"{COMMANDS['msg'].usage}  {COMMANDS['msg'].summary}"]


@pytest.mark.parametrize("line", ["/resume", "/resume XYZ", "/resume 0a1b -1", "/resume 0a1b x",
                                  "/resume 0a1b 1 2", "/resume " + "a" * 65, "/resume 0a1b ²"])
def test_resume_rejects_bad_arguments(line: str) -> None:
    with pytest.raises(BadArguments) as err:
        parse(line)
    assert err.value.code == "bad_args"
