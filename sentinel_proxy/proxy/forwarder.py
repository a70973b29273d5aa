"""The request path: guard -> pick a node -> forward -> pass the answer through.

Bodies pass through as bytes: the request is parsed once to validate it and apply the method
policy, but what goes upstream is the caller's own body (and what comes back is the node's own
answer), except when some batch items were refused locally, in which case only the allowed items
go upstream and the answers are merged back in the caller's order.
"""
from __future__ import annotations

import hashlib
import json
import math
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from sentinel_proxy.core import answers
from sentinel_proxy.core import jsonrpc
from sentinel_proxy.core import routing
from sentinel_proxy.core.answers import entry_from_store, item_bytes, store_value
from sentinel_proxy.state.backends import Backend, BackendPool
from sentinel_proxy.core.cache_policy import FOREVER, NEVER, Decision, decide, storable
from sentinel_proxy.proxy.coalesce import Entry, Flight, SingleFlight
from sentinel_proxy.ops.logs import AccessLog, observer
from sentinel_proxy.ops.metrics import NO_BACKEND, Metrics
from sentinel_proxy.stores.ratelimit import request_cost
from sentinel_proxy.state.status import RequestTotals
from sentinel_proxy.upstream.client import UpstreamClient, UpstreamError, UpstreamResponse

if TYPE_CHECKING:  # importing the cache module imports txredisapi, which installs a reactor
    from sentinel_proxy.interfaces import IResponseCache
    from sentinel_proxy.interfaces import IRateLimiter

log = Logger(observer=observer)

#: Headers of answers the gateway writes itself; CORS as the nodes send it, so browsers see errors.
JSON_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-type", b"application/json"), (b"access-control-allow-origin", b"*"))

#: Request headers worth passing on; the rest (hop-by-hop, cookies, host) stay with us.
_FORWARD_REQUEST_HEADERS = (b"content-type", b"content-encoding", b"accept-encoding", b"user-agent")

#: Response headers that describe the connection to the node, not the answer.
_DROP_RESPONSE_HEADERS = frozenset({
    b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"date", b"server",
    b"proxy-authenticate", b"trailer", b"upgrade",
})


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=lambda: list(JSON_HEADERS))
    backend: Backend | None = None
    #: ok, rpc_error, upstream_error, timeout or rejected (docs/metrics.md).
    outcome: str = "rejected"
    attempts: int = 0
    methods: tuple[str, ...] = ()
    batch: int | None = None


def error_reply(status: int, code: int, message: str, outcome: str = "rejected",
                backend: Backend | None = None) -> Reply:
    return Reply(status, jsonrpc.error_body(None, code, message), backend=backend, outcome=outcome,
                 attempts=0 if backend is None else 1)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asked: for the access log, the rate limit, and the request id echoed to the node and back."""

    request_id: str
    address: str = "-"
    #: The API key the caller presented (header or ?key=); never logged.
    api_key: str | None = None


def _answer_outcome(status: int, body: bytes, encoding: bytes | None) -> str:
    """rpc_error when the node answered with a JSON-RPC error (HTTP 4xx, or an error item in an
    uncompressed answer: a substring search, no parse), else ok."""
    if status >= 400 or (encoding is None and b'"error":' in body):
        return "rpc_error"
    return "ok"


def _items(body: bytes, batch: bool, count: int) -> list[Any] | None:
    """The node's answer items, or None when the answer does not have the request's shape."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if batch:
        return document if isinstance(document, list) and len(document) == count else None
    return [document] if isinstance(document, dict) else None


def methods_summary(methods: tuple[str, ...], shown: int = 3) -> str:
    if not methods:
        return "-"
    text = ",".join(methods[:shown])
    return text if len(methods) <= shown else f"{text},+{len(methods) - shown}"


def _media_type(value: bytes | None) -> bytes:
    return (value or b"").split(b";", 1)[0].strip().lower()


def decode_body(body: bytes, encoding: bytes | None, limit: int) -> bytes:
    """Undo ``Content-Encoding`` for validation, refusing anything that inflates past ``limit``."""
    coding = (encoding or b"identity").strip().lower()
    if coding == b"identity":
        return body
    if coding not in (b"gzip", b"deflate"):
        raise jsonrpc.RequestError(jsonrpc.INVALID_REQUEST, f"Unsupported Content-Encoding: {coding.decode('latin-1')}")
    wbits = 16 + zlib.MAX_WBITS if coding == b"gzip" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise jsonrpc.RequestError(jsonrpc.PARSE_ERROR, f"Parse error: body is not valid {coding.decode()}") from None
    if len(plain) > limit:
        raise jsonrpc.RequestError(jsonrpc.INVALID_REQUEST, f"Request body exceeds {limit} bytes",
                                   http_status=413)
    return plain


def _looks_like_json(body: bytes, encoding: bytes | None, is_batch: bool) -> bool:
    """A cheap shape check of the node's answer, so garbage never reaches a caller as success.

    Parsing every answer would cost more than the rest of the request path; the first and last
    bytes tell a JSON-RPC object or array from an HTML error page, a truncated body or noise.
    """
    if encoding is not None and encoding.strip().lower() == b"gzip":
        return body[:2] == b"\x1f\x8b"
    text = body.strip()
    if not text:
        return False
    return (text[:1], text[-1:]) in ((b"[", b"]"), (b"{", b"}")) if is_batch else \
        (text[:1], text[-1:]) == (b"{", b"}")


@dataclass(frozen=True)
class Limits:
    """The request path's bounds and resilience settings (docs/failure-handling.md)."""

    max_batch: int = 100
    max_body: int = 1 << 20
    #: Overall deadline of a request, all attempts included (REQUEST_TIMEOUT_MS).
    timeout: float = 30.0
    attempt_timeout: float = 10.0
    max_attempts: int = 3
    hedge: bool = False
    #: Seconds before the hedge goes out; 0 = the first node's p95 latency.
    hedge_delay: float = 0.0
    max_in_flight: int = 1024
    #: Method policy per route ("/", "/archiver", "/pruned"); absent routes use the default.
    policies: dict[str, jsonrpc.MethodPolicy] = field(default_factory=dict)
    #: Token bucket per client address, and per API key (docs/rate-limiting.md).
    rate: float = 20.0
    burst: float = 200.0
    key_rate: float = 200.0
    key_burst: float = 2000.0
    #: SHA-256 digests (hex) of the valid API keys: the keys themselves are not kept.
    key_digests: frozenset[str] = frozenset()


#: Hedge delay while a node has too few answers for a p95.
DEFAULT_HEDGE_DELAY = 0.05
#: Attempt failures after which another node may get the same call (when it is safe to repeat).
_RETRYABLE = frozenset({"timeout", "connect", "transport", "bad_answer"})


@dataclass(slots=True)
class Attempt:
    """One call of one node: a usable answer (``kind`` "ok"), or why not."""

    backend: Backend
    kind: str
    message: str = ""
    answer: UpstreamResponse | None = None
    body: bytes = b""
    encoding: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


@dataclass(slots=True)
class Plan:
    """What one request sends, wherever it goes."""

    route: str
    parsed: jsonrpc.ParsedRequest
    body: bytes
    headers: Headers
    request_id: str
    block: int | None
    safe: bool
    deadline: float


def _shield(deferred: defer.Deferred[Any]) -> defer.Deferred[Any]:
    """A Deferred with ``deferred``'s result whose cancellation leaves ``deferred`` running,
    so a race can be lost by a waiter without cancelling the call it waits for."""
    shield: defer.Deferred[Any] = defer.Deferred()

    def forward(result: Any) -> Any:
        if not shield.called:
            shield.callback(result)
        return result

    deferred.addBoth(forward)
    return shield


class Forwarder:
    def __init__(self, pool: BackendPool, upstream: UpstreamClient, metrics: Metrics, clock: IReactorTime,
                 limits: Limits, access_log: AccessLog | None = None, cache: IResponseCache | None = None,
                 volatile_ttl: float = 1.0, limiter: IRateLimiter | None = None, worker: str | None = None):
        self._cache = cache
        #: X-Sentinel-Worker (with --workers): which process answered.
        self._worker_header = [(b"x-sentinel-worker", worker.encode("ascii"))] if worker is not None else []
        self._limiter = limiter
        self._volatile_ttl = volatile_ttl
        self._flights = SingleFlight()
        #: x-aztec-* headers of the latest answer from a node: a full cache hit still carries them,
        #: since clients check the chain and versions in them.
        self._aztec_headers: list[tuple[bytes, bytes]] = []
        self._pool = pool
        self._upstream = upstream
        self._metrics = metrics
        self._clock = clock
        self._limits = limits
        self._access_log = access_log
        self.totals = RequestTotals()
        self.in_flight = 0
        self._idle_waiters: list[defer.Deferred[None]] = []

    def configure(self, limits: Limits, access_log: AccessLog | None) -> None:
        """New limits (SIGHUP); requests in flight finish under the old ones."""
        self._limits = limits
        self._access_log = access_log

    def drained(self) -> defer.Deferred[None]:
        """Fires once no request is in flight: graceful shutdown waits on it."""
        if self.in_flight == 0:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    async def handle(self, route: str, body: bytes, headers: Headers, body_too_large: bool = False,
                     caller: Caller = Caller("-")) -> Reply:
        started = self._clock.seconds()
        if self.in_flight >= self._limits.max_in_flight:
            reply = error_reply(503, jsonrpc.OVERLOADED,
                                f"Gateway overloaded: {self.in_flight} requests in flight; retry shortly")
            reply.headers.append((b"retry-after", b"1"))
        else:
            reply = await self._counted(route, body, headers, body_too_large, caller)
        elapsed = self._clock.seconds() - started
        backend = reply.backend
        self.totals.record(reply.status)
        if backend is not None:
            self._pool.record_request(backend, ok=reply.status < 500)
        self._metrics.observe_request(route, reply.status, reply.outcome, backend.label if backend else NO_BACKEND,
                                      elapsed, reply.methods, reply.batch)
        reply.headers.append((b"x-request-id", caller.request_id.encode("ascii")))
        reply.headers += self._worker_header
        if backend is not None:
            reply.headers += [(b"x-sentinel-backend", backend.name.encode("ascii", "replace")),
                              (b"x-sentinel-node-type", (backend.node_type or "unknown").encode("ascii")),
                              (b"x-sentinel-attempts", str(reply.attempts).encode("ascii"))]
        if self._access_log is not None:
            self._access_log.write(self._clock.seconds(), caller.request_id, caller.address, route,
                                   methods_summary(reply.methods), len(reply.methods),
                                   backend.name if backend else "-", reply.status, reply.outcome, elapsed * 1000.0,
                                   reply.attempts)
        return reply

    async def _counted(self, route: str, body: bytes, headers: Headers, body_too_large: bool,
                       caller: Caller) -> Reply:
        self.in_flight += 1
        self._metrics.in_flight.inc()
        try:
            return await self._handle(route, body, headers, body_too_large, caller)
        except defer.CancelledError:
            raise  # the caller went away (Klein cancels the handler): its upstream call is cancelled too
        except Exception:  # the prototype's panic recovery: one broken request, not a broken daemon
            log.failure("request {request_id} on {route} failed inside the gateway",
                        request_id=caller.request_id, route=route)
            return error_reply(500, jsonrpc.INTERNAL_ERROR, "Internal gateway error", outcome="upstream_error")
        finally:
            self.in_flight -= 1
            self._metrics.in_flight.dec()
            if self.in_flight == 0:
                waiters, self._idle_waiters = self._idle_waiters, []
                for waiter in waiters:
                    waiter.callback(None)

    async def _handle(self, route: str, body: bytes, headers: Headers, body_too_large: bool,
                      caller: Caller) -> Reply:
        limits = self._limits
        request_id = caller.request_id
        bucket = self._bucket(caller)
        if bucket is None:
            return error_reply(401, jsonrpc.UNKNOWN_API_KEY, "Unknown API key")
        if _media_type(headers.getRawHeaders(b"content-type", [None])[0]) != b"application/json":
            return error_reply(400, jsonrpc.INVALID_REQUEST, "Content-Type must be application/json")
        if body_too_large:
            return error_reply(413, jsonrpc.INVALID_REQUEST, f"Request body exceeds {limits.max_body} bytes")
        content_encoding = headers.getRawHeaders(b"content-encoding", [None])[0]
        try:
            parsed = jsonrpc.parse_request(decode_body(body, content_encoding, limits.max_body), limits.max_batch,
                                           limits.policies.get(route, jsonrpc.DEFAULT_POLICY))
            parsed = self._refuse_unavailable(route, parsed)
        except jsonrpc.RequestError as refusal:
            return Reply(refusal.http_status, refusal.body())
        if not parsed.calls:
            return Reply(200, jsonrpc.encode(jsonrpc.merge_batch(parsed, [])), batch=parsed.size)
        if self._limiter is not None:
            limited = await self._rate_limit(bucket, parsed)
            if limited is not None:
                return limited

        upstream_headers = Headers()
        for name in _FORWARD_REQUEST_HEADERS:
            values = headers.getRawHeaders(name)
            if values:
                upstream_headers.setRawHeaders(name, values)
        upstream_headers.setRawHeaders(b"x-request-id", [request_id.encode("ascii")])
        if parsed.refused:
            # Only the allowed items go upstream, re-encoded, and the answer must be parsed to merge it.
            body = jsonrpc.encode([call.request for call in parsed.calls])
            upstream_headers.removeHeader(b"content-encoding")
            upstream_headers.setRawHeaders(b"accept-encoding", [b"identity"])
        deadline = self._clock.seconds() + limits.timeout
        reply = None
        if self._cache is not None:
            reply = await self._serve_cached(route, parsed, upstream_headers, request_id, deadline)
        if reply is None:
            plan = Plan(route, parsed, body, upstream_headers, request_id, routing.oldest_needed(parsed.calls),
                        jsonrpc.safe_to_repeat(parsed.calls), deadline)
            reply = await self._forward(plan)
        reply.methods, reply.batch = parsed.methods, parsed.size if parsed.is_batch else None
        return reply

    def _bucket(self, caller: Caller) -> str | None:
        """The rate-limit bucket: the API key's (hashed), else the client address's; None for a
        key that is not valid."""
        if caller.api_key is None:
            return f"ip:{caller.address}"
        digest = hashlib.sha256(caller.api_key.encode("utf-8", "replace")).hexdigest()
        return f"key:{digest[:32]}" if digest in self._limits.key_digests else None

    async def _rate_limit(self, bucket: str, parsed: jsonrpc.ParsedRequest) -> Reply | None:
        """Before the cache: a cached answer costs the same, so a client cannot flood through it."""
        limits = self._limits
        keyed = bucket.startswith("key:")
        decision = await self._limiter.take(bucket, max(1.0, request_cost(parsed.methods)),
                                            limits.key_rate if keyed else limits.rate,
                                            limits.key_burst if keyed else limits.burst)
        if decision.allowed:
            return None
        wait = max(1, math.ceil(decision.retry_after))
        reply = error_reply(429, jsonrpc.RATE_LIMITED, f"Rate limit exceeded; retry in {wait} s")
        reply.headers.append((b"retry-after", str(wait).encode("ascii")))
        return reply

    async def _serve_cached(self, route: str, parsed: jsonrpc.ParsedRequest, headers: Headers, request_id: str,
                            deadline: float) -> Reply | None:
        """Answer what the cache has, wait for identical calls already in flight, send the rest
        upstream as one sub-batch, and reassemble in the caller's order with the caller's ids.

        None when no call of the request is cacheable: it then passes through untouched (gzip and
        all), which costs less than taking it apart.
        """
        cache = self._cache
        assert cache is not None
        finalized = self._pool.finalized
        decisions = [decide(c.method, c.request.get("params", []), finalized, self._volatile_ttl)
                     for c in parsed.calls]
        if all(d.kind == NEVER for d in decisions):
            return None
        parts: dict[int, bytes] = {position: jsonrpc.encode(item) for position, item in parsed.refused.items()}
        kinds: dict[int, str] = {}
        outgoing: list[tuple[jsonrpc.Call, Decision, Flight | None]] = []
        waiting: list[tuple[jsonrpc.Call, defer.Deferred[Entry]]] = []
        leading: dict[bytes, Flight] = {}
        counts = {"hit": 0, "miss": 0, "coalesced": 0}
        try:
            for call, decision in zip(parsed.calls, decisions):
                if decision.kind == NEVER:
                    outgoing.append((call, decision, None))
                    continue
                stored = await cache.get(decision.key)
                entry = entry_from_store(stored) if stored is not None else None
                if entry is not None:
                    parts[call.position], kinds[call.position] = item_bytes(call.request.get("id"), entry), entry.kind
                    counts["hit"] += 1
                    continue
                flight = leading.get(decision.key)
                waiter = flight.wait() if flight is not None else self._flights.join(decision.key)
                if waiter is not None:
                    waiting.append((call, waiter))
                    counts["coalesced"] += 1
                    continue
                leading[decision.key] = flight = self._flights.lead(decision.key)
                outgoing.append((call, decision, flight))
                counts["miss"] += 1
            self._metrics.observe_cache(counts)

            upstream_reply = None
            if outgoing:
                upstream_reply = await self._forward_part(route, parsed, outgoing, headers, request_id, deadline,
                                                          parts, kinds)
                if upstream_reply.outcome not in ("ok", "rpc_error"):
                    return upstream_reply
            for call, waiter in waiting:
                try:
                    entry = await waiter
                except Exception:  # the leading call failed at every node it tried
                    return error_reply(502, jsonrpc.UPSTREAM_FAILED, "Upstream node failed for a shared call",
                                       "upstream_error")
                parts[call.position], kinds[call.position] = item_bytes(call.request.get("id"), entry), entry.kind
        finally:
            for flight in leading.values():  # never leave followers waiting (failure, cancellation)
                flight.fail(UpstreamError("transport", "the leading call did not complete"))

        body = answers.assemble((parts[i] for i in range(parsed.size)), parsed.is_batch)
        errors = any(kind == "error" for kind in kinds.values()) or bool(parsed.refused)
        status = 400 if not parsed.is_batch and kinds.get(0) == "error" else 200
        reply_headers = list(JSON_HEADERS) + self._aztec_headers
        if not parsed.is_batch:
            reply_headers.append((b"x-cache", b"HIT" if counts["hit"] else b"COALESCED" if counts["coalesced"]
                                  else b"MISS"))
        if upstream_reply is None:
            return Reply(status, body, reply_headers, outcome="rpc_error" if errors else "ok")
        reply_headers += [(name, value) for name, value in upstream_reply.headers if name == b"x-sentinel-fallback"]
        return Reply(status, body, reply_headers, upstream_reply.backend, "rpc_error" if errors else "ok",
                     upstream_reply.attempts)

    async def _forward_part(self, route: str, parsed: jsonrpc.ParsedRequest,
                            outgoing: list[tuple[jsonrpc.Call, Decision, Flight | None]], headers: Headers,
                            request_id: str, deadline: float, parts: dict[int, bytes], kinds: dict[int, str]) -> Reply:
        """Send the calls the cache could not answer; store and share what comes back."""
        calls = tuple(jsonrpc.Call(i, call.method, call.request) for i, (call, _, _) in enumerate(outgoing))
        batch = parsed.is_batch or len(calls) > 1
        sub = jsonrpc.ParsedRequest(batch, calls, {})
        body = jsonrpc.encode([c.request for c in calls]) if batch else jsonrpc.encode(calls[0].request)
        headers = headers.copy()  # the answer is taken apart here: no compression, and a new body
        headers.removeHeader(b"content-encoding")
        headers.setRawHeaders(b"accept-encoding", [b"identity"])
        reply = await self._forward(Plan(route, sub, body, headers, request_id, routing.oldest_needed(calls),
                                         jsonrpc.safe_to_repeat(calls), deadline))
        if reply.outcome not in ("ok", "rpc_error"):
            return reply
        items = _items(reply.body, batch, len(calls))
        if items is None:
            return error_reply(502, jsonrpc.UPSTREAM_FAILED, "Upstream node answered a batch with the wrong shape",
                               "upstream_error", reply.backend)
        aztec = [(name, value) for name, value in reply.headers if name.lower().startswith(b"x-aztec-")]
        if aztec:
            self._aztec_headers = aztec
        finalized = self._pool.finalized
        for (call, decision, flight), item in zip(outgoing, items):
            entry = answers.entry_of(item)
            parts[call.position], kinds[call.position] = item_bytes(call.request.get("id"), entry), entry.kind
            if flight is None:
                continue
            flight.resolve(entry)
            result = item.get("result") if isinstance(item, dict) else None
            ttl = storable(decision, call.method, call.request.get("params", []), entry.kind == "result", result,
                           finalized, error=entry.kind == "error")
            if ttl is not None:
                self._cache.set(decision.key, store_value(entry), None if ttl == FOREVER else ttl)
        return reply

    async def _forward(self, plan: Plan) -> Reply:
        """Failover: the next-best node after a transport error, timeout, 5xx or garbage, never the
        same node twice, within MAX_ATTEMPTS and the overall deadline; a call that is not safe to
        repeat goes to a second node only when the first provably never received it."""
        limits = self._limits
        tried: list[Backend] = []
        failure: Attempt | None = None
        while len(tried) < limits.max_attempts:
            now = self._clock.seconds()
            remaining = plan.deadline - now
            if remaining <= 0:
                break
            pick = self._pool.pick(plan.route, plan.block, tried, now)
            if pick.backend is None:
                break
            if failure is not None:
                self._metrics.failovers.labels(plan.route).inc()
                log.info("request {request_id}: failing over from {failed} ({reason}) to {backend}",
                         request_id=plan.request_id, failed=failure.backend.name, reason=failure.message,
                         backend=pick.backend.name)
            tried.append(pick.backend)
            if limits.hedge and plan.safe and len(tried) < limits.max_attempts:
                result = await self._hedged(plan, pick.backend, tried)
            else:
                result = await self._attempt(plan, pick.backend, min(limits.attempt_timeout, remaining))
            if result.ok:
                return self._answer(plan, result, pick.fallback, len(tried))
            failure = result
            if result.kind not in _RETRYABLE or not (plan.safe or result.kind == "connect"):
                break
        if failure is None:
            return error_reply(503, jsonrpc.NO_BACKEND, f"No healthy node available for {plan.route}")
        timeout = failure.kind == "timeout"
        reply = error_reply(502, jsonrpc.UPSTREAM_TIMEOUT if timeout else jsonrpc.UPSTREAM_FAILED,
                            f"Upstream node failed: {failure.message}", "timeout" if timeout else "upstream_error",
                            failure.backend)
        reply.attempts = len(tried)
        return reply

    async def _hedged(self, plan: Plan, first_backend: Backend, tried: list[Backend]) -> Attempt:
        """Ask a second node when the first is slower than usual; the first good answer wins."""
        limits = self._limits
        now = self._clock.seconds()
        first = defer.Deferred.fromCoroutine(
            self._attempt(plan, first_backend, min(limits.attempt_timeout, plan.deadline - now)))
        delay = limits.hedge_delay or (self._pool.hedge_delay(plan.route) or DEFAULT_HEDGE_DELAY * 1000.0) / 1000.0
        index, result = await defer.race([_shield(first), task.deferLater(self._clock, delay, lambda: None)])
        if index == 0:
            return result
        now = self._clock.seconds()
        second_backend = self._pool.pick(plan.route, plan.block, tried, now).backend
        if second_backend is None:
            return await first
        tried.append(second_backend)
        self._metrics.hedges.labels(plan.route).inc()
        second = defer.Deferred.fromCoroutine(
            self._attempt(plan, second_backend, min(limits.attempt_timeout, plan.deadline - now)))
        return await self._first_good([first, second])

    @staticmethod
    async def _first_good(attempts: list[defer.Deferred[Attempt]]) -> Attempt:
        pending = list(attempts)
        last: Attempt | None = None
        while pending:
            index, result = await defer.race([_shield(d) for d in pending])
            pending.pop(index)
            if result.ok:
                for loser in pending:  # cancelling closes its connection; its outcome no longer matters
                    loser.addErrback(lambda f: f.trap(defer.CancelledError))
                    loser.cancel()
                return result
            last = result
        assert last is not None
        return last

    async def _attempt(self, plan: Plan, backend: Backend, timeout: float) -> Attempt:
        breaker = backend.breaker
        breaker.begin()
        started = self._clock.seconds()
        try:
            answer = await self._upstream.post(backend, plan.body, plan.headers.copy(), timeout)
        except UpstreamError as failure:
            result = Attempt(backend, failure.kind, str(failure))
            log.warn("request {request_id} to {backend} failed: {reason}", request_id=plan.request_id,
                     backend=backend.name, reason=str(failure))
        except defer.CancelledError:
            breaker.abandon()
            raise
        else:
            result = self._judge(plan, backend, answer)
        now = self._clock.seconds()
        self._metrics.observe_attempt(backend.label, result.kind)
        if result.ok:
            backend.answer_latency.append((now - started) * 1000.0)
        if result.kind == "too_large":
            breaker.abandon()  # the caller asked for too much: no sign of a failing node
        else:
            breaker.record(result.ok, now)
        return result

    def _judge(self, plan: Plan, backend: Backend, answer: UpstreamResponse) -> Attempt:
        """A 5xx or garbage is the node failing; anything else, JSON-RPC errors included, is an answer."""
        encoding = answer.headers.getRawHeaders(b"content-encoding", [None])[0]
        parsed = plan.parsed
        usable = answer.code < 500 and _looks_like_json(answer.body, encoding, parsed.is_batch)
        body = self._merge(parsed, answer.body) if usable and parsed.refused else answer.body
        if not usable or body is None:
            log.warn("request {request_id}: {backend} answered HTTP {code} with an unusable body",
                     request_id=plan.request_id, backend=backend.name, code=answer.code)
            return Attempt(backend, "bad_answer", f"HTTP {answer.code} with an unusable body")
        return Attempt(backend, "ok", answer=answer, body=body, encoding=encoding)

    @staticmethod
    def _answer(plan: Plan, result: Attempt, fallback: str | None, attempts: int) -> Reply:
        answer = result.answer
        assert answer is not None
        headers = [(name, value) for name, values in answer.headers.getAllRawHeaders()
                   if name.lower() not in _DROP_RESPONSE_HEADERS for value in values]
        if fallback is not None:
            headers.append((b"x-sentinel-fallback", fallback.encode()))
        return Reply(answer.code, result.body, headers, result.backend,
                     _answer_outcome(answer.code, result.body, result.encoding), attempts)

    def _refuse_unavailable(self, route: str, parsed: jsonrpc.ParsedRequest) -> jsonrpc.ParsedRequest:
        """Answer calls about blocks no eligible node keeps with a clear error, not a node's failure."""
        floor = self._pool.history_floor(route)
        if not floor:
            return parsed
        late: dict[int, dict] = {}
        for call in parsed.calls:
            block = routing.block_needed(call)
            if block is not None and block < floor:
                late[call.position] = routing.unavailable_error(call, block, floor)
        if not late:
            return parsed
        if not parsed.is_batch:
            error = late[0]
            raise jsonrpc.RequestError(jsonrpc.BLOCK_UNAVAILABLE, error["error"]["message"], error["id"])
        return jsonrpc.ParsedRequest(True, tuple(c for c in parsed.calls if c.position not in late),
                                     {**parsed.refused, **late})

    @staticmethod
    def _merge(parsed: jsonrpc.ParsedRequest, upstream_body: bytes) -> bytes | None:
        items = _items(upstream_body, True, len(parsed.calls))
        return None if items is None else jsonrpc.encode(jsonrpc.merge_batch(parsed, items))
