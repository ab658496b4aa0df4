"""The client line protocol, sans-IO: bytes in, lines and commands out.

Nothing here touches a socket or a clock, so the same code serves the router's lobby
and every topic server, and is tested by feeding bytes whole or one at a time. The only
exceptions that leave this module are `ProtocolError` subclasses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from theychat.daemons.errors import BadArguments, InvalidUtf8, LineTooLong, UnknownCommand

MAX_LINE_BYTES = 4096
MAX_NAME = 32  # nicks and topic names
NAME_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_NAME}}}")

# CSI, OSC (up to BEL or ST) and two-byte escapes; whatever is left of a broken sequence
# loses its ESC below and is harmless printable text.
_ANSI_RE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
# C0 and C1 controls, DEL, the Unicode line/paragraph separators (a line break in
# disguise), and the bidi overrides that can make text lie about itself.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def sanitize(text: str) -> str:
    """Make text from one user safe to print on another user's terminal."""
    text = _ANSI_RE.sub("", text).replace("\t", " ")
    return _CONTROL_RE.sub("", text)


def valid_name(name: str) -> bool:
    return NAME_RE.fullmatch(name) is not None


def fold(name: str) -> str:
    """Names compare case-insensitively: `Alice` and `alice` are one person."""
    return name.lower()


class LineBuffer:
    """Splits a byte stream into protocol lines.

    `feed()` bytes as they arrive, then call `next_line()` until it returns None. A line
    that is too long raises `LineTooLong` once and the rest of it is skipped; a line that
    is not UTF-8 raises `InvalidUtf8`. Both leave the buffer ready for the next line.
    """

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_line
        self._skipping = False  # inside an over-long line, dropping bytes up to its end

    def feed(self, data: bytes) -> None:
        self._buf += data

    def pending(self) -> bytes:
        """Bytes received but not yet returned as a line (they travel with a handoff)."""
        return bytes(self._buf)

    def next_line(self) -> str | None:
        while True:
            nl = self._buf.find(b"\n")
            if self._skipping:
                if nl < 0:
                    self._buf.clear()
                    return None
                del self._buf[: nl + 1]
                self._skipping = False
                continue
            if nl < 0:
                if len(self._buf) > self._max + 1:  # +1: room for the \r of a \r\n
                    self._buf.clear()
                    self._skipping = True
                    raise LineTooLong(f"line too long (max {self._max} bytes); ignored")
                return None
            raw = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if len(raw) > self._max:
                raise LineTooLong(f"line too long (max {self._max} bytes); ignored")
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidUtf8("line is not valid UTF-8; ignored") from None


# ---------------------------------------------------------------------------------------
# Commands. The table is the single source of `/help` and of docs/protocol.md.


@dataclass(frozen=True)
class CommandSpec:
    name: str
    usage: str
    summary: str


COMMANDS: dict[str, CommandSpec] = {
    s.name: s
    for s in (
        CommandSpec("nick", "/nick NAME", "choose your name (1-32 of A-Z a-z 0-9 _ -)"),
        CommandSpec("topics", "/topics", "list the topics with their member counts"),
        CommandSpec("join", "/join TOPIC", "enter a topic (leaves the current one)"),
        CommandSpec("leave", "/leave", "go back to the lobby"),
        CommandSpec("who", "/who [TOPIC]", "list the people here, or in TOPIC"),
        CommandSpec("me", "/me TEXT", "send an action (* you TEXT) to your topic"),
        CommandSpec("create", "/create TOPIC", "open a new topic and enter it as its operator"),
        CommandSpec("msg", "/msg NICK TEXT", "send a direct message, wherever NICK is"),
        CommandSpec("history", "/history [N]", "show the last N messages of this topic"),
        CommandSpec("resume", "/resume SESSION [LAST_SEQ]",
                    "take back a session after a lost connection (from the lobby)"),
        CommandSpec("oper", "/oper NAME PASSWORD", "become a server operator"),
        CommandSpec("kick", "/kick NICK [REASON]", "operators: send NICK back to the lobby"),
        CommandSpec("ban", "/ban NICK", "operators: keep NICK out of this topic"),
        CommandSpec("drop", "/drop TOPIC", "operators: close TOPIC and forget it"),
        CommandSpec("say", "/say N TEXT",
                    "send TEXT as your line N (programs number their lines: a line sent "
                    "again after a reconnect is taken once)"),
        CommandSpec("json", "/json [on|off]", "one JSON object per line, for programs"),
        CommandSpec("help", "/help [COMMAND]", "list the commands, or explain one"),
        CommandSpec("quit", "/quit", "disconnect"),
    )
}


@dataclass(frozen=True)
class Say:
    """A plain line: a message to the current topic, numbered by `/say N` or not."""

    text: str
    line: int | None = None  # the sender's number for it (increasing within a session)


@dataclass(frozen=True)
class Command:
    name: str
    arg: str = ""  # the first argument, validated per command
    text: str = ""  # free text after it (`/msg NICK TEXT`)
    number: int | None = None  # `/history N`


HISTORY_MAX = 1000
LINE_MAX = 2**53  # a line number fits every JSON reader's integers


def parse(line: str) -> Say | Command | None:
    """Turn one decoded line into a message or a checked command; None for blank lines."""
    if not line.strip():
        return None
    if not line.startswith("/"):
        return Say(sanitize(line).rstrip())
    if line.startswith("//"):  # escape hatch: a message that starts with a slash
        return Say(sanitize(line[1:]).rstrip())
    word, _, rest = line[1:].partition(" ")
    name = word.lower()
    rest = rest.strip()
    if name not in COMMANDS:
        shown = sanitize(word)[:40]
        raise UnknownCommand(f"unknown command /{shown}; type /help for the list")
    usage = COMMANDS[name].usage
    if name in ("nick", "join", "create", "ban", "drop") or (name == "who" and rest):
        if not rest or " " in rest:
            raise BadArguments(f"usage: {usage}")
        if not valid_name(rest):
            what = "name" if name in ("nick", "ban") else "topic name"
            raise BadArguments(
                f"invalid {what} {sanitize(rest)[:40]!r}: use 1-32 of A-Z a-z 0-9 _ -",
                code="bad_name",
            )
        return Command(name, arg=rest)
    if name == "say":
        number, _, text = rest.partition(" ")
        text = sanitize(text).rstrip()
        if not (number.isascii() and number.isdigit()) or not 1 <= int(number) <= LINE_MAX \
                or not text.strip():
            raise BadArguments(f"usage: {usage} with N a whole number from 1")
        return Say(text, line=int(number))
    if name == "me":
        text = sanitize(rest).strip()
        if not text:
            raise BadArguments(f"usage: {usage}")
        return Command(name, text=text)
    if name == "kick":
        nick, _, reason = rest.partition(" ")
        if not nick or not valid_name(nick):
            raise BadArguments(f"usage: {usage}")
        return Command(name, arg=nick, text=sanitize(reason).strip()[:200])
    if name == "oper":
        who, _, password = rest.partition(" ")
        if not who or not password or not valid_name(who):
            raise BadArguments(f"usage: {usage}")
        return Command(name, arg=who, text=password)
    if name == "msg":
        nick, _, text = rest.partition(" ")
        text = sanitize(text).strip()
        if not nick or not text:
            raise BadArguments(f"usage: {usage}")
        if not valid_name(nick):
            raise BadArguments(f"no such nick {sanitize(nick)[:40]!r}", code="no_such_nick")
        return Command(name, arg=nick, text=text)
    if name == "resume":
        sid, _, seq = rest.partition(" ")
        seq = seq.strip()
        if not re.fullmatch(r"[0-9a-f]{1,64}", sid) or (
            seq and not (seq.isascii() and seq.isdigit())
        ):
            raise BadArguments(f"usage: {usage} (SESSION from your greeting)")
        return Command(name, arg=sid, number=int(seq) if seq else None)
    if name == "history":
        if not rest:
            return Command(name, number=None)
        # isascii: "²".isdigit() is true but int() rejects it
        if not (rest.isascii() and rest.isdigit()) or not 1 <= int(rest) <= HISTORY_MAX:
            raise BadArguments(f"usage: {usage} with N from 1 to {HISTORY_MAX}")
        return Command(name, number=int(rest))
    if name == "json":
        mode = rest.lower() or "on"
        if mode not in ("on", "off"):
            raise BadArguments(f"usage: {usage}")
        return Command(name, arg=mode)
    if name == "help":
        topic = rest.lstrip("/").lower()
        if topic and topic not in COMMANDS:
            raise BadArguments(f"no command /{sanitize(topic)[:40]}; type /help for the list")
        return Command(name, arg=topic)
    if rest:
        raise BadArguments(f"usage: {usage}")
    return Command(name)


def help_lines(command: str = "") -> list[str]:
    specs = [COMMANDS[command]] if command else list(COMMANDS.values())
    width = max(len(s.usage) for s in specs)
    lines = [f"{s.usage.ljust(width)}  {s.summary}" for s in specs]
    if not command:
        lines.append("any other line is a message to your topic (start it with // to send a /)")
    return lines
