"""An asyncio client of etcd v3, over etcd's JSON gateway (the `/v3/...` HTTP API every
etcd member serves on its client URLs).

Why this and not a gRPC client: the gateway is part of etcd itself (no second
implementation of its protocol to trust), httpx is a well-kept HTTP client with
asyncio and streaming, and the few operations TheyChat needs (range, txn, put,
delete, leases, watch) map one to one onto it. `aetcd` (gRPC) was the alternative; it
pulls in grpcio and has had no release since 2023.

Keys and values are bytes on the wire (base64 in JSON); here keys are str and values
bytes. Every call goes to one endpoint and, if that one cannot be reached, to the next:
any member answers for the cluster, and a member cut off from the quorum answers with
an error (or not at all) instead of a stale success.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from theychat.daemons.errors import TheyChatError

DEFAULT_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 0.25  # a member on the same network answers a SYN in well under this
AVOID_S = 2.0  # an endpoint that failed is tried last for this long


class EtcdError(TheyChatError):
    """etcd answered with an error (or not at all: `EtcdUnavailable`)."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered in time: this host may be cut off from the cluster."""


class Compacted(EtcdError):
    """A watch asked for revisions etcd has compacted away; read afresh."""


def _enc(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _dec(data: str | None) -> bytes:
    return base64.b64decode(data) if data else b""


def prefix_end(prefix: str) -> str:
    """The end of the range of every key starting with `prefix` (etcd's convention)."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return raw.decode("latin-1")
        raw.pop()
    return "\0"


def _range_end(prefix: str) -> str:
    return _enc(prefix_end(prefix).encode("latin-1"))


@dataclass(frozen=True, slots=True)
class Kv:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0

    @classmethod
    def of(cls, raw: dict[str, Any]) -> Kv:
        return cls(_dec(raw.get("key")).decode(), _dec(raw.get("value")),
                   int(raw.get("create_revision", 0)), int(raw.get("mod_revision", 0)),
                   int(raw.get("lease", 0)))

    def json(self) -> Any:
        return json.loads(self.value)


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # "put" or "delete"
    kv: Kv  # on a delete: the key, and mod_revision = the revision of the delete
    prev: Kv | None


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: list[dict[str, Any]]

    def ranges(self) -> list[list[Kv]]:
        """The kvs of each range request in the branch that ran."""
        return [[Kv.of(kv) for kv in r["response_range"].get("kvs", [])]
                for r in self.responses if "response_range" in r]


# -- building transactions (etcd's Compare and RequestOp, as JSON) -------------------------


def created(key: str, revision: int = 0) -> dict[str, Any]:
    """Compare: the key was created at `revision` (0: it does not exist)."""
    return {"target": "CREATE", "key": _enc(key), "result": "EQUAL",
            "create_revision": str(revision)}


def modified(key: str, revision: int) -> dict[str, Any]:
    """Compare: the key was last changed at `revision` (0: it does not exist)."""
    return {"target": "MOD", "key": _enc(key), "result": "EQUAL",
            "mod_revision": str(revision)}


def put(key: str, value: bytes, lease: int = 0) -> dict[str, Any]:
    req: dict[str, Any] = {"key": _enc(key), "value": _enc(value)}
    if lease:
        req["lease"] = str(lease)
    return {"request_put": req}


def delete(key: str, prefix: bool = False) -> dict[str, Any]:
    req: dict[str, Any] = {"key": _enc(key)}
    if prefix:
        req["range_end"] = _range_end(key)
    return {"request_delete_range": req}


def get(key: str, prefix: bool = False) -> dict[str, Any]:
    req: dict[str, Any] = {"key": _enc(key)}
    if prefix:
        req["range_end"] = _range_end(key)
    return {"request_range": req}


class Etcd:
    def __init__(self, endpoints: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not endpoints:
            raise ValueError("etcd: at least one endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout_s = timeout_s
        # Endpoints are tried in the order given (the docs list the host's own member
        # first: reachable whenever this host is), except one that failed lately.
        self._failed_at = [-AVOID_S] * len(self.endpoints)
        self._http = httpx.AsyncClient(timeout=self._timeout(timeout_s),
                                       limits=httpx.Limits(max_connections=32))

    @staticmethod
    def _timeout(timeout_s: float, quiet_ok: bool = False) -> httpx.Timeout:
        """`timeout_s` for a request, a short connect; no read timeout for a watch (a
        quiet watch is no failure)."""
        return httpx.Timeout(timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S),
                             read=None if quiet_ok else timeout_s)

    def _order(self) -> list[int]:
        """Endpoints in the order to try them now: the ones that did not fail lately
        first, each group in the configured order."""
        now = time.monotonic()
        return sorted(range(len(self.endpoints)),
                      key=lambda i: (now - self._failed_at[i] < AVOID_S, i))

    def _failed(self, at: int) -> None:
        self._failed_at[at] = time.monotonic()

    async def close(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, body: dict[str, Any],
                    timeout_s: float | None = None) -> dict[str, Any]:
        last: Exception | None = None
        for at in self._order():
            url = self.endpoints[at] + path
            try:
                r = await self._http.post(url, json=body,
                                          timeout=self._timeout(timeout_s or self.timeout_s))
            except (httpx.TransportError, OSError) as e:
                last = e
                self._failed(at)
                continue
            try:
                data = r.json()
            except ValueError:
                raise EtcdError(f"{url}: not JSON (HTTP {r.status_code})") from None
            if r.status_code != 200 or "error" in data:
                message = str(data.get("message") or data.get("error") or r.status_code)
                if "leader" in message or "timed out" in message or "unavailable" in message:
                    last = EtcdUnavailable(message)  # a member without a quorum: next one
                    self._failed(at)
                    continue
                raise EtcdError(message)
            return dict(data)
        raise EtcdUnavailable(f"no etcd endpoint answered ({', '.join(self.endpoints)}): "
                              f"{last}")

    # -- keys --------------------------------------------------------------------------------

    async def range(self, key: str, prefix: bool = False, limit: int = 0,
                    descending: bool = False, revision: int = 0) -> tuple[list[Kv], int]:
        body: dict[str, Any] = {"key": _enc(key)}
        if prefix:
            body["range_end"] = _range_end(key)
        if limit:
            body["limit"] = str(limit)
        if descending:
            body["sort_order"] = "DESCEND"
            body["sort_target"] = "KEY"
        if revision:
            body["revision"] = str(revision)
        data = await self._post("/v3/kv/range", body)
        return ([Kv.of(kv) for kv in data.get("kvs", [])],
                int(data.get("header", {}).get("revision", 0)))

    async def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
                  failure: Sequence[dict[str, Any]] = ()) -> TxnResult:
        data = await self._post("/v3/kv/txn", {"compare": compare, "success": success,
                                               "failure": list(failure)})
        return TxnResult(bool(data.get("succeeded", False)),
                         int(data.get("header", {}).get("revision", 0)),
                         list(data.get("responses", [])))

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        return (await self.txn([], [put(key, value, lease)])).revision

    async def delete(self, key: str, prefix: bool = False) -> int:
        return (await self.txn([], [delete(key, prefix)])).revision

    # -- leases ------------------------------------------------------------------------------

    async def grant(self, ttl_s: int) -> int:
        data = await self._post("/v3/lease/grant", {"TTL": str(ttl_s)})
        return int(data["ID"])

    async def keepalive(self, lease: int) -> int:
        """Refresh a lease; its TTL now (0: the lease is gone, expired or revoked)."""
        data = await self._post("/v3/lease/keepalive", {"ID": str(lease)})
        return int(data.get("result", {}).get("TTL", 0))

    async def time_to_live(self, lease: int) -> int:
        """Seconds a lease has left (-1: it is gone)."""
        data = await self._post("/v3/lease/timetolive", {"ID": str(lease)})
        return int(data.get("TTL", -1))

    async def revoke(self, lease: int) -> None:
        with contextlib.suppress(EtcdError):  # already gone is gone
            await self._post("/v3/lease/revoke", {"ID": str(lease)})

    # -- watches -----------------------------------------------------------------------------

    async def watch(self, key: str, prefix: bool = False,
                    start_revision: int = 0) -> AsyncIterator[list[Event]]:
        """Every change from `start_revision` on, in revision order, in batches. A broken
        stream is opened again from where it stopped (on another endpoint if need be);
        `Compacted` if etcd no longer has those revisions. Never ends by itself."""
        next_rev = start_revision
        at = self._order()[0]
        while True:
            req: dict[str, Any] = {"key": _enc(key), "prev_kv": True}
            if prefix:
                req["range_end"] = _range_end(key)
            if next_rev:
                req["start_revision"] = str(next_rev)
            try:
                async for batch in self._watch_stream(at, {"create_request": req}):
                    next_rev = batch[-1].kv.mod_revision + 1
                    yield batch
            except (httpx.TransportError, OSError, EtcdUnavailable):
                self._failed(at)
                at = self._order()[0]
                await asyncio.sleep(0.1)

    async def _watch_stream(self, at: int, body: dict[str, Any]
                            ) -> AsyncIterator[list[Event]]:
        url = self.endpoints[at] + "/v3/watch"
        timeout = self._timeout(self.timeout_s, quiet_ok=True)
        async with self._http.stream("POST", url, json=body, timeout=timeout) as r:
            async for line in r.aiter_lines():
                if not line.strip():
                    continue
                msg = json.loads(line)
                if "error" in msg:
                    raise EtcdUnavailable(str(msg["error"].get("message", msg["error"])))
                result = msg.get("result", {})
                if result.get("compact_revision") and result.get("canceled"):
                    raise Compacted(f"compacted at {result['compact_revision']}")
                events = [Event("delete" if e.get("type") == "DELETE" else "put",
                                Kv.of(e.get("kv", {})),
                                Kv.of(e["prev_kv"]) if e.get("prev_kv") else None)
                          for e in result.get("events", [])]
                if events:
                    yield events
        raise EtcdUnavailable("watch stream ended")
