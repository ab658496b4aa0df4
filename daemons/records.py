"""Every record a write-ahead log of ours holds, typed, with its encoding and its effect on
the state it rebuilds side by side.

A daemon's log (`wal/NAME.wal`, opened by `local.py`) holds the changes of its
directory store (`Put`, `Delete`) and, for a topic server, the entries of its topic log
(`Message`); a `Snapshot` replaces everything before it. Nothing else builds a record:
`local.py` writes these, and replay applies them in order to a `LogState`.

Logs written before the store existed (records `session`, `end`, `topic`,
`topic_dropped` of the router; `join`, `leave`, `nick`, `kick`, `op`, `ban` of a server,
and their snapshots) are read too, at the bottom: an upgrade keeps its sessions, topics,
operators, bans and history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeGuard

from theychat.daemons.store import KvState
from theychat.daemons.topiclog import Posted, Tail

SNAPSHOT_VERSION = 2


@dataclass
class LogState:
    """What a log rebuilds: a directory store's state, and a topic's tail if it has one."""

    kv: KvState
    tail: Tail | None = None


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: dict[str, Any]
    revision: int
    expires_at: float | None = None

    def encode(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"type": "put", "key": self.key, "value": self.value,
                               "rev": self.revision}
        if self.expires_at is not None:
            rec["exp"] = self.expires_at
        return rec

    @classmethod
    def decode(cls, rec: dict[str, Any]) -> Put | None:
        key, value, rev, exp = rec.get("key"), rec.get("value"), rec.get("rev"), rec.get("exp")
        if not (isinstance(key, str) and isinstance(value, dict) and _int(rev)):
            return None
        return cls(key, value, rev, float(exp) if isinstance(exp, int | float) else None)

    def apply(self, state: LogState) -> None:
        state.kv.put(self.key, self.value, self.expires_at, self.revision)


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    revision: int
    expired: bool = False  # its time was up (a session nobody resumed)

    def encode(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"type": "del", "key": self.key, "rev": self.revision}
        if self.expired:
            rec["expired"] = True
        return rec

    @classmethod
    def decode(cls, rec: dict[str, Any]) -> Delete | None:
        key, rev = rec.get("key"), rec.get("rev")
        if not (isinstance(key, str) and _int(rev)):
            return None
        return cls(key, rev, rec.get("expired") is True)

    def apply(self, state: LogState) -> None:
        state.kv.delete(self.key, self.revision)


@dataclass(frozen=True, slots=True)
class Message:
    """A committed entry of the topic log (the record type of earlier logs, unchanged)."""

    seq: int
    ts: float
    nick: str
    text: str
    action: bool = False
    sid: str | None = None
    line: int | None = None

    @classmethod
    def of(cls, p: Posted) -> Message:
        return cls(p.seq, p.ts, p.nick, p.text, p.action, p.sid, p.line)

    def posted(self) -> Posted:
        return Posted(self.seq, self.ts, self.nick, self.text, self.action, self.sid,
                      self.line)

    def encode(self) -> dict[str, Any]:
        return Message.encode_posted(self.posted())

    @staticmethod
    def encode_posted(p: Posted) -> dict[str, Any]:
        """The record of an entry, built straight from it: the write path of every line."""
        rec: dict[str, Any] = {"type": "msg", "seq": p.seq, "from": p.nick, "text": p.text,
                               "ts": p.ts}
        if p.action:
            rec["action"] = True
        if p.sid:
            rec["sid"] = p.sid
        if p.line is not None:
            rec["line"] = p.line
        return rec

    @classmethod
    def decode(cls, rec: dict[str, Any]) -> Message | None:
        seq, ts, nick, text = rec.get("seq"), rec.get("ts"), rec.get("from"), rec.get("text")
        if not (_int(seq) and isinstance(nick, str) and isinstance(text, str)):
            return None
        sid, line = rec.get("sid"), rec.get("line")
        return cls(seq, float(ts) if isinstance(ts, int | float) else 0.0, nick, text,
                   rec.get("action") is True, sid if isinstance(sid, str) else None,
                   line if _int(line) else None)

    def apply(self, state: LogState) -> None:
        if state.tail is not None:  # in the log: committed
            state.tail.add([self.posted()])
            state.tail.commit(self.seq)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The whole state at one point: what `Wal.compact` writes as the log's new start."""

    kv: dict[str, Any]
    log: dict[str, Any] | None

    @classmethod
    def take(cls, state: LogState) -> Snapshot:
        kv = {"revision": state.kv.revision,
              "entries": [[e.key, e.value, e.revision, e.expires_at]
                          for e in state.kv.entries.values()]}
        log = None
        if state.tail is not None:  # appended ones too: their records precede the snapshot
            log = {"next_seq": state.tail.next_seq,
                   "entries": [Message.encode_posted(p) for p in state.tail.entries]}
        return cls(kv, log)

    def encode(self) -> dict[str, Any]:
        state: dict[str, Any] = {"v": SNAPSHOT_VERSION, "kv": self.kv}
        if self.log is not None:
            state["log"] = self.log
        return state

    def apply(self, state: LogState) -> None:
        for item in self.kv.get("entries", []):
            if (isinstance(item, list) and len(item) == 4 and isinstance(item[0], str)
                    and isinstance(item[1], dict) and _int(item[2])):
                exp = item[3] if isinstance(item[3], int | float) else None
                state.kv.put(item[0], item[1], exp, item[2])
        rev = self.kv.get("revision")
        if _int(rev):
            state.kv.revision = max(state.kv.revision, rev)
        if state.tail is not None and self.log is not None:
            for rec in self.log.get("entries", []):
                msg = Message.decode(rec) if isinstance(rec, dict) else None
                if msg is not None:
                    msg.apply(state)
            nxt = self.log.get("next_seq")
            if _int(nxt):
                state.tail.next_seq = max(state.tail.next_seq, nxt)
                state.tail.commit(nxt - 1)


Record = Put | Delete | Message
_DECODERS = {"put": Put.decode, "del": Delete.decode, "msg": Message.decode}


def _int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def replay(state: LogState, snapshot: dict[str, Any] | None,
           records: list[dict[str, Any]]) -> int:
    """Rebuild `state` from a log's latest snapshot and the records after it; returns how
    many records were skipped as unknown or malformed (never fatal)."""
    if snapshot is not None:
        if snapshot.get("v") == SNAPSHOT_VERSION:
            kv, log = snapshot.get("kv"), snapshot.get("log")
            Snapshot(kv if isinstance(kv, dict) else {},
                     log if isinstance(log, dict) else None).apply(state)
        else:
            _legacy_snapshot(state, snapshot)
    skipped = 0
    for raw in records:
        decoder = _DECODERS.get(str(raw.get("type")))
        rec = decoder(raw) if decoder else None
        if rec is not None:
            rec.apply(state)
        elif not _legacy(state, raw):
            skipped += 1
    return skipped


# --- logs written before the directory store ------------------------------------------


def _legacy(state: LogState, rec: dict[str, Any]) -> bool:
    """Apply one record of the earlier formats; False if it is none of them."""
    from theychat.daemons import directory, room

    kind = rec.get("type")
    sid, nick = rec.get("sid"), rec.get("nick")
    kv = state.kv
    if kind in ("join", "nick") and isinstance(sid, str) and isinstance(nick, str):
        if kind == "join" or kv.entries.get(room.member_key(sid)):
            kv.put(room.member_key(sid), room.member_value(nick), None)
    elif kind in ("leave", "kick"):
        kv.delete(room.member_key(str(sid)))
    elif kind in ("op", "ban") and isinstance(nick, str):
        key = room.op_key(nick) if kind == "op" else room.ban_key(nick)
        kv.put(key, {} if kind == "op" else {"by": str(rec.get("by", ""))}, None)
    elif kind == "session" and isinstance(sid, str) and isinstance(nick, str):
        directory.legacy_session(kv, sid, nick, rec)
    elif kind == "end":
        directory.legacy_end(kv, str(sid))
    elif kind == "topic" and isinstance(rec.get("name"), str):
        directory.legacy_topic(kv, rec["name"], str(rec.get("creator", "")))
    elif kind == "topic_dropped" and isinstance(rec.get("name"), str):
        directory.legacy_dropped(kv, rec["name"])
    else:
        return False
    return True


def _legacy_snapshot(state: LogState, snap: dict[str, Any]) -> None:
    for m in snap.get("members", []):
        if isinstance(m, dict):
            _legacy(state, {"type": "join", **m})
    for nick in snap.get("ops", []):
        _legacy(state, {"type": "op", "nick": nick})
    for nick in snap.get("bans", []):
        _legacy(state, {"type": "ban", "nick": nick})
    for rec in snap.get("history", []):
        msg = Message.decode(rec) if isinstance(rec, dict) else None
        if msg is not None:
            msg.apply(state)
    if state.tail is not None and _int(snap.get("next_seq")):
        state.tail.next_seq = max(state.tail.next_seq, snap["next_seq"])
        state.tail.commit(snap["next_seq"] - 1)
    for rec in snap.get("created", []):
        if isinstance(rec, dict):
            _legacy(state, {"type": "topic", **rec})
    for name in snap.get("dropped", []):
        _legacy(state, {"type": "topic_dropped", "name": name})
    for rec in snap.get("sessions", []):
        if isinstance(rec, dict):
            _legacy(state, rec)
