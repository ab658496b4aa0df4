"""The one error hierarchy of TheyChat.

Anything a user, an operator or a peer daemon can cause is a `TheyChatError`; anything
else escaping a daemon is a bug.
"""

from __future__ import annotations


class TheyChatError(Exception):
    """Base of every error TheyChat raises on purpose."""


class ConfigError(TheyChatError):
    """The configuration is invalid; the message names the dotted key."""


class ProtocolError(TheyChatError):
    """A client line cannot be handled; `code` is stable, the message is for people."""

    code = "protocol_error"

    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        if code is not None:
            self.code = code

    @property
    def text(self) -> str:
        return str(self)


class LineTooLong(ProtocolError):
    code = "line_too_long"


class InvalidUtf8(ProtocolError):
    code = "bad_utf8"


class UnknownCommand(ProtocolError):
    code = "unknown_command"


class BadArguments(ProtocolError):
    code = "bad_args"


class ControlError(TheyChatError):
    """A control-socket request failed: the peer is down, slow, or said no."""

    def __init__(self, text: str, code: str = "control_error") -> None:
        super().__init__(text)
        self.code = code


class StateDirError(TheyChatError):
    """The state directory cannot be used (permissions, a lock held elsewhere)."""
