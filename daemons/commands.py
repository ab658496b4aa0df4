"""What the lobby's commands (`lobby.py`) and a topic's (`topic.py`) share.

A line a person typed arrives parsed (`protocol.parse`): a `Say`, or a `Command` whose
name is one of `protocol.COMMANDS`, handled by the method `cmd_<name>`. Each place
implements what differs; the commands that behave the same everywhere live here. A
handler returns None when it is done, or a coroutine when it must wait for I/O (the
connection pauses until it finishes, so lines are handled one at a time, in order).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol

from theychat.daemons import render
from theychat.daemons.config import Config
from theychat.daemons.errors import ControlError
from theychat.daemons.protocol import Command, Say, help_lines
from theychat.daemons.render import Event

Pending = Awaitable[None] | None
MOVE_RETRY_S = 0.1  # between tries to reach a topic's server that is (re)starting


class Conn(Protocol):
    """A person's connection as commands see it (`clientconn.ClientConn`; a fake in
    tests): whose it is, how it is spoken to, and how to end or pause it."""

    sid: str
    json: bool
    peer: str
    close_reason: str | None

    def send(self, event: Event) -> None: ...

    def close(self, reason: str, abort: bool = False) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class Updates(Protocol):
    def update(self, conn: Any) -> Awaitable[bool] | None: ...


class Commands:
    log: Any
    sockets: Updates
    cfg: Config

    def handle(self, conn: Any, item: Say | Command) -> Pending:
        if isinstance(item, Say):
            return self.say(conn, item.text, item.line)
        method = getattr(self, f"cmd_{item.name}")
        result: Pending = method(conn, item)
        return result

    def say(self, conn: Any, text: str, line: int | None = None) -> Pending:
        raise NotImplementedError

    def lost(self, conn: Any, reason: str) -> None:
        raise NotImplementedError

    def cmd_help(self, conn: Conn, cmd: Command) -> Pending:
        conn.send({"type": "help", "command": cmd.arg or None, "lines": help_lines(cmd.arg)})
        return None

    def cmd_json(self, conn: Conn, cmd: Command) -> Pending:
        conn.json = cmd.arg == "on"
        self.sockets.update(conn)
        # The limits, so that a program can pace itself (theychat chat does).
        limits = {"rate_per_second": self.cfg.clients.rate_per_second,
                  "rate_burst": self.cfg.clients.rate_burst}
        conn.send({"type": "ok", "cmd": "json", "json": conn.json,
                   "text": f"JSON mode {cmd.arg}", "limits": limits})
        return None

    def cmd_quit(self, conn: Conn, cmd: Command) -> Pending:
        conn.send({"type": "bye", "text": "bye"})
        conn.close("quit")
        return None

    @staticmethod
    def failed(conn: Conn, reply: dict[str, Any]) -> bool:
        """Show a peer daemon's refusal to the person; True if it was one."""
        if reply.get("ok"):
            return False
        conn.send(render.error(str(reply.get("code") or "error"), str(reply.get("error"))))
        return True

    def show(self, conn: Conn, reply: dict[str, Any]) -> None:
        """A peer daemon's answer to a command: its refusal, or the event it carries."""
        if not self.failed(conn, reply) and isinstance(reply.get("event"), dict):
            conn.send(reply["event"])

    @staticmethod
    def now_oper(conn: Conn) -> None:
        conn.send({"type": "ok", "cmd": "oper", "text": "you are now a server operator"})

    @staticmethod
    def dm_event(sender: str, to: str, text: str, ts: float) -> Event:
        return {"type": "dm", "from": sender, "to": to, "text": text, "ts": round(ts, 3)}

    @staticmethod
    def dm_sent(conn: Conn, to: str) -> None:
        conn.send({"type": "ok", "cmd": "msg", "to": to, "text": f"sent to {to}"})

    @staticmethod
    def created(conn: Conn, topic: str) -> None:
        conn.send({"type": "ok", "cmd": "create", "topic": topic,
                   "text": f"topic {topic} created; you are its operator"})

    @staticmethod
    def nick_ok(conn: Conn, nick: str) -> None:
        conn.send({"type": "ok", "cmd": "nick", "nick": nick, "text": f"you are now {nick}"})


def handoff_error(e: ControlError, unavailable: str) -> Event:
    """What a person is told when a move to a topic or the lobby did not happen."""
    if e.code == "flooding":
        return render.error("flooding", "too much unread input; slow down and try again")
    if e.code == "banned":
        return render.error("banned", str(e))
    if e.code == "slow_client":
        return render.error("slow_client", "you are not reading what we send; try again")
    return render.error("unavailable", unavailable)
