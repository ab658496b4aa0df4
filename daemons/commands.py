"""Command dispatch shared by the lobby (router) and the topic servers.

Each place implements `cmd_<name>` for what differs; the commands that behave the same
everywhere live here. A handler returns None when it is done, or a coroutine when it
must wait for I/O (the connection pauses until it finishes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from theychat.daemons import render
from theychat.daemons.clientconn import ClientConn
from theychat.daemons.errors import ControlError
from theychat.daemons.fdstore import FdKeeper
from theychat.daemons.protocol import Command, Say, help_lines

Pending = Awaitable[None] | None


class CommandHandler:
    log: Any
    keeper: FdKeeper

    def handle(self, conn: ClientConn, item: Say | Command) -> Pending:
        if isinstance(item, Say):
            return self.say(conn, item.text)
        method = getattr(self, f"cmd_{item.name}")
        result: Pending = method(conn, item)
        return result

    def say(self, conn: ClientConn, text: str) -> Pending:
        raise NotImplementedError

    def lost(self, conn: ClientConn, reason: str) -> None:
        raise NotImplementedError

    def cmd_help(self, conn: ClientConn, cmd: Command) -> Pending:
        conn.send({"type": "help", "command": cmd.arg or None, "lines": help_lines(cmd.arg)})
        return None

    def session_changed(self, conn: ClientConn) -> asyncio.Future[bool] | None:
        """The session record changed (nick, mode): places that keep a copy update it.

        Returns a future that says when the copy is kept, or None if there is none."""
        return None

    def cmd_json(self, conn: ClientConn, cmd: Command) -> Pending:
        conn.session.json = cmd.arg == "on"
        self.session_changed(conn)
        conn.send({"type": "ok", "cmd": "json", "json": conn.session.json,
                   "text": f"JSON mode {cmd.arg}"})
        return None

    def cmd_quit(self, conn: ClientConn, cmd: Command) -> Pending:
        conn.send({"type": "bye", "text": "bye"})
        conn.close("quit")
        return None

    @staticmethod
    def failed(conn: ClientConn, reply: dict[str, Any]) -> bool:
        """Show a peer daemon's refusal to the person; True if it was one."""
        if reply.get("ok"):
            return False
        conn.send(render.error(str(reply.get("code") or "error"), str(reply.get("error"))))
        return True

    def show(self, conn: ClientConn, reply: dict[str, Any]) -> None:
        """A peer daemon's answer to a command: its refusal, or the event it carries."""
        if not self.failed(conn, reply) and isinstance(reply.get("event"), dict):
            conn.send(reply["event"])

    async def became_oper(self, conn: ClientConn) -> None:
        conn.session.oper = True
        kept = self.session_changed(conn)
        if kept is not None:
            await self.keeper.settled(kept)
        conn.send({"type": "ok", "cmd": "oper", "text": "you are now a server operator"})

    @staticmethod
    def dm_event(sender: str, to: str, text: str, ts: float) -> render.Event:
        return {"type": "dm", "from": sender, "to": to, "text": text, "ts": round(ts, 3)}

    @staticmethod
    def dm_sent(conn: ClientConn, to: str) -> None:
        conn.send({"type": "ok", "cmd": "msg", "to": to, "text": f"sent to {to}"})


def handoff_error(e: ControlError, unavailable: str) -> render.Event:
    """What a person is told when a move to a topic or the lobby did not happen."""
    if e.code == "flooding":
        return render.error("flooding", "too much unread input; slow down and try again")
    if e.code == "banned":
        return render.error("banned", str(e))
    if e.code == "slow_client":
        return render.error("slow_client", "you are not reading what we send; try again")
    return render.error("unavailable", unavailable)
