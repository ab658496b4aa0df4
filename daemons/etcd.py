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
# A request not answered this long after it was first sent is sent again, to the next
# member (a member that forwarded it to a leader that died never answers; the next may
# know the new leader). Few and spaced out: under overload, more copies are more load.
# An attempt also gives up by itself (its own HTTP timeout, never a cancellation) after
# a share of the request's time, so that copies stuck on a lost proposal do not hold
# the budget of copies until the request's end.
HEDGE_AFTER_S = (0.25, 0.5, 0.75, 1.0, 1.5)
ATTEMPT_SHARE = 0.4  # of the request's timeout, at least ATTEMPT_MIN_S
ATTEMPT_MIN_S = 0.75
HEDGES_MAX = 32  # extra attempts in flight at once, over all of a client's requests
MAX_CONNECTIONS = 64  # watches hold one each; attempts left behind, one until they end
KEEP_IDLE = 8  # idle connections kept: httpcore looks at every one for every request


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
    attempts: int = 1  # more than one: a failed compare may be our own other attempt

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
        self._stragglers: set[asyncio.Future[dict[str, Any]]] = set()  # attempts not waited for
        self._hedging = 0  # extra attempts in flight
        self._http = httpx.AsyncClient(timeout=self._timeout(timeout_s),
                                       limits=httpx.Limits(max_connections=MAX_CONNECTIONS,
                                                           max_keepalive_connections=KEEP_IDLE))

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
        for task in list(self._stragglers):
            task.cancel()  # the pool goes with them
        await self._http.aclose()

    async def _post(self, path: str, body: dict[str, Any],
                    timeout_s: float | None = None) -> dict[str, Any]:
        return (await self._request(path, body, timeout_s))[0]

    async def _request(self, path: str, body: dict[str, Any],
                       timeout_s: float | None = None) -> tuple[dict[str, Any], int]:
        """One request, answered by the first member that answers; and how many
        attempts were sent.

        A request that a member forwarded to a leader that then died is never answered:
        etcd drops the proposal and holds the request until its own timeout (seconds).
        So a request not answered HEDGE_AFTER_S after it was sent is sent again to the
        next member (keeping the first one waiting), a few times until `timeout_s`;
        the first answer wins. A mutation may therefore reach etcd twice: TheyChat's
        are idempotent puts, or transactions fenced by a compare, so the second one
        fails its compare; a caller that must tell "someone else won" from "my other
        attempt won" asks `TxnResult.attempts`."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        total = timeout_s or self.timeout_s
        deadline = start + total
        attempt_s = max(ATTEMPT_MIN_S, total * ATTEMPT_SHARE)
        order = self._order()
        attempts: dict[asyncio.Task[dict[str, Any]], int] = {}
        hedges = list(HEDGE_AFTER_S)  # when the next copies may go
        tried = 0
        send_now = True
        last: Exception | None = None

        def send() -> None:
            nonlocal tried
            at = order[tried % len(order)]
            if tried:
                self._hedging += 1
            tried += 1
            ends = min(deadline, loop.time() + attempt_s)
            task = asyncio.ensure_future(self._attempt(at, path, body, ends, tried > 1))
            attempts[task] = at

        try:
            while True:
                now = loop.time()
                if now >= deadline:
                    break
                if hedges and now >= start + hedges[0]:
                    hedges.pop(0)
                    send_now = send_now or self._hedging < HEDGES_MAX  # else: no copy
                if send_now:
                    send_now = False
                    send()
                wake = min(deadline, start + hedges[0]) if hedges else deadline
                if not attempts:  # every member refused at once: wait, then again
                    if not hedges:
                        break
                    await asyncio.sleep(max(0.0, wake - now))
                    send_now = True
                    continue
                done, _ = await asyncio.wait(attempts, timeout=max(0.001, wake - now),
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    at = attempts.pop(task)
                    try:
                        data = task.result()
                    except EtcdUnavailable as e:  # unreachable, or without a quorum
                        last = e
                        self._failed(at)
                        # The next member at once: on the first round, or if this one
                        # gave up waiting (its proposal lost) and no other is trying.
                        send_now = tried < len(order) or (not attempts and tried <= len(
                            HEDGE_AFTER_S))
                        continue
                    return data, tried
        finally:
            # The other attempts are left to end by their own timeouts, not cancelled:
            # httpcore's pool can lose a connection slot to a request cancelled while
            # it waits for one (encode/httpcore#1093), and then every request fails.
            for task in attempts:
                self._stragglers.add(task)
                task.add_done_callback(self._straggler_done)
        raise EtcdUnavailable(f"no etcd endpoint answered ({', '.join(self.endpoints)}): "
                              f"{last or 'timed out'}")

    def _straggler_done(self, task: asyncio.Future[dict[str, Any]]) -> None:
        self._stragglers.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: its answer came too late to matter

    async def _attempt(self, at: int, path: str, body: dict[str, Any],
                       deadline: float, hedge: bool = False) -> dict[str, Any]:
        url = self.endpoints[at] + path
        left = max(0.01, deadline - asyncio.get_running_loop().time())
        try:
            r = await self._http.post(url, json=body, timeout=self._timeout(left))
        except (httpx.TransportError, OSError) as e:
            raise EtcdUnavailable(f"{url}: {e!r}") from None
        finally:
            if hedge:
                self._hedging -= 1
        try:
            data = r.json()
        except ValueError:
            raise EtcdError(f"{url}: not JSON (HTTP {r.status_code})") from None
        if r.status_code != 200 or "error" in data:
            message = str(data.get("message") or data.get("error") or r.status_code)
            if "leader" in message or "timed out" in message or "unavailable" in message:
                raise EtcdUnavailable(message)  # a member without a quorum: next one
            raise EtcdError(message)
        return dict(data)

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
        data, attempts = await self._request("/v3/kv/txn", {
            "compare": compare, "success": success, "failure": list(failure)})
        return TxnResult(bool(data.get("succeeded", False)),
                         int(data.get("header", {}).get("revision", 0)),
                         list(data.get("responses", [])), attempts)

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
