"""The values that travel along the request path, from the stage that makes them to the next.

Each stage takes values and returns values: nothing is filled in by a callee or patched on the
way back up, so a stage can be read, and tested, without the ones around it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple

from sentinel_proxy.core import jsonrpc
from sentinel_proxy.ops.tracing import TraceContext, trace_context
from sentinel_proxy.state.backends import Backend
from sentinel_proxy.upstream.response import UpstreamResponse

#: Headers in the order they are written: (name, value), a name repeated for each value. Names
#: are lower-case (the caller's, the node's and the gateway's own).
HeaderPairs = tuple[tuple[bytes, bytes], ...]

#: Headers of answers the gateway writes itself; CORS as the nodes send it, so browsers see errors.
JSON_HEADERS: HeaderPairs = ((b"content-type", b"application/json"), (b"access-control-allow-origin", b"*"))


@dataclass(frozen=True, slots=True)
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
    #: The largest node answer (MAX_RESPONSE_BYTES): a compressed answer is inflated up to this
    #: bound to be checked.
    max_response: int = 1 << 25


class Caller(NamedTuple):
    """Who asked: for the access log, the rate limit, and the request id echoed to the node and back.
    A named tuple, not a frozen dataclass: one is made per request, at half the cost."""

    request_id: str
    address: str = "-"
    #: The API key the caller presented (header or ?key=); never logged.
    api_key: str | None = None
    #: The caller's valid W3C traceparent (and tracestate): the request span's parent when tracing is on.
    trace: TraceContext | None = None


class Inbound:
    """A request as the web layer received it, before anything was checked.

    ``headers``: the request's headers, names lower-cased, repeated headers joined with ", ".
    """

    __slots__ = ("route", "body", "headers", "body_too_large", "caller")

    def __init__(self, route: str, body: bytes, headers: Mapping[bytes, bytes], body_too_large: bool,
                 caller: Caller):
        self.route = route
        self.body = body
        self.headers = headers
        #: The web layer stopped reading at MAX_BODY_BYTES: the body is cut short.
        self.body_too_large = body_too_large
        self.caller = caller


#: How the cache took part in a reply: every call answered by it (or by an identical call in
#: flight), some, none of the cacheable calls, or no cacheable call at all (or no cache).
CACHE_STATUSES = ("hit", "partial", "miss", "none")


# Plain classes with __slots__ rather than frozen dataclasses: a frozen dataclass sets each field
# through object.__setattr__ (Reply: 1.2 µs a construction, against 0.4 µs), and these are built
# several times a request. They are still never changed once built.
class Reply:
    """What the caller gets, with what the metrics and the access log say about it.

    ``items``: for the cache stage, the node's answer item of each call in request order (None
    when the answer is not one item per call: a failure, or a refusal of the whole request).
    ``refusal``: (code, message) of the gateway's own error, written under the null id until the
    request path puts each call's id in (:func:`.guard.addressed`). ``refused``: the methods of
    the batch items the gateway refused itself (for the access log). ``cache``: how the cache
    took part (:data:`CACHE_STATUSES`); ``upstream_ms``: how long the answering node took (None
    when no node answered).
    """

    __slots__ = ("status", "body", "headers", "backend", "outcome", "attempts", "methods", "batch", "items",
                 "refusal", "refused", "cache", "upstream_ms")

    def __init__(self, status: int, body: bytes, headers: HeaderPairs = JSON_HEADERS, backend: Backend | None = None,
                 outcome: str = "rejected", attempts: int = 0, methods: tuple[str, ...] = (),
                 batch: int | None = None, items: list[Any] | None = None,
                 refusal: tuple[int, str] | None = None, refused: tuple[str, ...] = (), cache: str = "none",
                 upstream_ms: float | None = None):
        self.status = status
        self.body = body
        self.headers = headers
        self.backend = backend
        #: ok, rpc_error, upstream_error, timeout or rejected (docs/metrics.md).
        self.outcome = outcome
        self.attempts = attempts
        self.methods = methods
        self.batch = batch
        self.items = items
        self.refusal = refusal
        self.refused = refused
        self.cache = cache
        self.upstream_ms = upstream_ms

    def described(self, methods: tuple[str, ...], batch: int | None, refused: tuple[str, ...] = ()) -> Reply:
        """The same reply, for a request of these calls (metrics and the access log count them)."""
        return Reply(self.status, self.body, self.headers, self.backend, self.outcome, self.attempts, methods, batch,
                     refusal=self.refusal, refused=refused, cache=self.cache, upstream_ms=self.upstream_ms)

    def readdressed(self, body: bytes) -> Reply:
        """The same refusal, its body written under the callers' ids."""
        return Reply(self.status, body, self.headers, self.backend, self.outcome, self.attempts, self.methods,
                     self.batch, refused=self.refused, cache=self.cache, upstream_ms=self.upstream_ms)

    def missed(self) -> Reply:
        """The same reply, for a request the cache could not answer (``cache`` "miss"): a failure
        of the upstream call a cache miss made, or of an identical call it waited for."""
        return Reply(self.status, self.body, self.headers, self.backend, self.outcome, self.attempts, self.methods,
                     self.batch, self.items, self.refusal, self.refused, "miss", self.upstream_ms)

    def with_headers(self, extra: HeaderPairs) -> Reply:
        return Reply(self.status, self.body, self.headers + extra, self.backend, self.outcome, self.attempts,
                     self.methods, self.batch, refusal=self.refusal, refused=self.refused, cache=self.cache,
                     upstream_ms=self.upstream_ms)

    def __repr__(self) -> str:
        return (f"Reply({self.status}, {self.body[:200]!r}, outcome={self.outcome!r}, attempts={self.attempts}, "
                f"backend={None if self.backend is None else self.backend.name!r})")


def error_reply(status: int, code: int, message: str, outcome: str = "rejected",
                backend: Backend | None = None, attempts: int | None = None,
                retry_after: int | None = None) -> Reply:
    """The gateway's own JSON-RPC error; ``retry_after`` (seconds) tells a refused caller when to come back.
    Written under the null id: the request path puts the callers' ids in once it knows them."""
    headers = JSON_HEADERS if retry_after is None else JSON_HEADERS + ((b"retry-after", str(retry_after).encode()),)
    if attempts is None:
        attempts = 0 if backend is None else 1
    return Reply(status, jsonrpc.error_bytes(jsonrpc.NULL_ID, code, message), headers, backend, outcome, attempts,
                 refusal=(code, message))


#: The request headers worth passing on to a node, in the order they are sent; the rest
#: (hop-by-hop, cookies, host, credentials) stay with us. Not Content-Encoding: the body goes as
#: the guard decoded and validated it. The W3C trace context only when valid (ops/tracing.py).
FORWARDED_HEADERS = (b"content-type", b"accept-encoding", b"user-agent", b"traceparent", b"tracestate")
_IDENTITY = (b"accept-encoding", b"identity")


def forwarded_headers(headers: Mapping[bytes, bytes], request_id: bytes, plain: bool) -> HeaderPairs:
    """What a node gets of the caller's headers, with the request id. ``plain``: the gateway
    wrote the body itself, so it goes uncompressed, and the answer must come back uncompressed
    to be taken apart. A caller's traceparent (and tracestate) goes on as sent when valid; with
    tracing on, each attempt replaces it with its own span (:meth:`.tracing.AttemptSpan.headers`)."""
    get = headers.get
    content_type = get(b"content-type")
    pairs: list[tuple[bytes, bytes]] = [] if content_type is None else [(b"content-type", content_type)]
    if plain:
        pairs.append(_IDENTITY)
    else:
        accept = get(b"accept-encoding")
        if accept is not None:
            pairs.append((b"accept-encoding", accept))
    agent = get(b"user-agent")
    if agent is not None:
        pairs.append((b"user-agent", agent))
    traceparent = get(b"traceparent")
    if traceparent is not None:
        trace = trace_context(traceparent, get(b"tracestate"))
        if trace is not None:
            pairs.extend(trace.pairs())
    pairs.append((b"x-request-id", request_id))
    return tuple(pairs)


class Plan:
    """What one request sends, wherever it goes (one per request; the cache stage narrows it to
    the calls it could not answer)."""

    __slots__ = ("route", "parsed", "body", "caller_headers", "plain", "request_id", "deadline", "limits", "block",
                 "safe", "_headers")

    def __init__(self, route: str, parsed: jsonrpc.ParsedRequest, body: bytes, caller_headers: Mapping[bytes, bytes],
                 plain: bool, request_id: str, deadline: float, limits: Limits, block: int | None, safe: bool):
        self.route = route
        self.parsed = parsed
        self.body = body
        #: The caller's headers (names lower-cased): :attr:`headers` takes what a node gets of them.
        self.caller_headers = caller_headers
        #: The gateway wrote the body itself, so it goes uncompressed and the answer must come
        #: back uncompressed to be taken apart.
        self.plain = plain
        self.request_id = request_id
        self.deadline = deadline
        #: The limits in force when the request arrived: a reload does not change a request in flight.
        self.limits = limits
        #: The oldest block a call reads at: the node must still keep it.
        self.block = block
        #: Whether a second node may get the calls after a failure that does not prove the first never did.
        self.safe = safe
        self._headers: HeaderPairs | None = None

    @property
    def headers(self) -> HeaderPairs:
        """The headers every attempt sends (the client adds the node's own credentials): the
        caller's headers worth passing on, with the request id. Worked out on first use: a
        request answered from the cache never needs them."""
        headers = self._headers
        if headers is None:
            headers = self._headers = forwarded_headers(self.caller_headers, self.request_id.encode("ascii"),
                                                        self.plain)
        return headers

    def narrowed(self, parsed: jsonrpc.ParsedRequest, body: bytes) -> Plan:
        """The same request for other calls, in a body the gateway wrote (so it goes plain)."""
        return Plan(self.route, parsed, body, self.caller_headers, True, self.request_id, self.deadline, self.limits,
                    jsonrpc.oldest_block(parsed.calls), jsonrpc.safe_to_repeat(parsed.calls))


class Attempt:
    """One call of one node: a usable answer (``kind`` "ok"), or why not.

    ``body`` is what the caller gets: the node's own bytes (``encoding`` their Content-Encoding)
    or, when the answer had to be put in request order or merged, the gateway's (``encoding``
    None, ``rewritten`` True). ``items``: each call's answer item, in request order.
    """

    __slots__ = ("backend", "kind", "message", "answer", "body", "encoding", "items", "errors", "rewritten")

    def __init__(self, backend: Backend, kind: str, message: str = "", answer: UpstreamResponse | None = None,
                 body: bytes = b"", encoding: bytes | None = None, items: list[Any] | None = None,
                 errors: bool = False, rewritten: bool = False):
        self.backend = backend
        self.kind = kind
        self.message = message
        self.answer = answer
        self.body = body
        self.encoding = encoding
        self.items = items
        self.errors = errors
        self.rewritten = rewritten

    @property
    def ok(self) -> bool:
        return self.kind == "ok"
