"""The request path: guard -> pick a node -> forward -> pass the answer through.

Bodies pass through as bytes: the request is parsed once to validate it and apply the method
policy, but what goes upstream is the caller's own body (and what comes back is the node's own
answer), except when some batch items were refused locally, in which case only the allowed items
go upstream and the answers are merged back in the caller's order.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from . import jsonrpc, routing
from .backends import Backend, BackendPool
from .logs import observer
from .metrics import NO_BACKEND, Metrics
from .status import RequestTotals
from .upstream import UpstreamClient, UpstreamError

log = Logger(observer=observer)
#: One line per proxied request, in its own namespace so shippers and LOG_LEVEL can single it out.
access_log = Logger(namespace="sentinel_proxy.access", observer=observer)

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
    """Who asked: for the access log and the request id echoed to the node and back."""

    request_id: str
    address: str = "-"


def _answer_outcome(status: int, body: bytes, encoding: bytes | None) -> str:
    """rpc_error when the node answered with a JSON-RPC error (HTTP 4xx, or an error item in an
    uncompressed answer: a substring search, no parse), else ok."""
    if status >= 400 or (encoding is None and b'"error":' in body):
        return "rpc_error"
    return "ok"


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


class Forwarder:
    def __init__(self, pool: BackendPool, upstream: UpstreamClient, metrics: Metrics, clock: IReactorTime,
                 max_batch_size: int, max_body_bytes: int, timeout: float, access_log: bool = True):
        self._pool = pool
        self._upstream = upstream
        self._metrics = metrics
        self._clock = clock
        self._max_batch = max_batch_size
        self._max_body = max_body_bytes
        self._timeout = timeout
        self._access_log = access_log
        self.totals = RequestTotals()

    async def handle(self, route: str, body: bytes, headers: Headers, body_too_large: bool = False,
                     caller: Caller = Caller("-")) -> Reply:
        started = self._clock.seconds()
        self._metrics.in_flight.inc()
        try:
            reply = await self._handle(route, body, headers, body_too_large, caller.request_id)
        except Exception:  # the prototype's panic recovery: one broken request, not a broken daemon
            log.failure("request {request_id} on {route} failed inside the gateway",
                        request_id=caller.request_id, route=route)
            reply = error_reply(500, jsonrpc.INTERNAL_ERROR, "Internal gateway error", outcome="upstream_error")
        finally:
            self._metrics.in_flight.dec()
        elapsed = self._clock.seconds() - started
        backend = reply.backend
        self.totals.record(reply.status)
        if backend is not None:
            self._pool.record_request(backend, ok=reply.status < 500)
        self._metrics.observe_request(route, reply.status, reply.outcome, backend.label if backend else NO_BACKEND,
                                      elapsed, reply.methods, reply.batch)
        reply.headers.append((b"x-request-id", caller.request_id.encode("ascii")))
        if backend is not None:
            reply.headers += [(b"x-sentinel-backend", backend.name.encode("ascii", "replace")),
                              (b"x-sentinel-node-type", (backend.node_type or "unknown").encode("ascii")),
                              (b"x-sentinel-attempts", str(reply.attempts).encode("ascii"))]
        if self._access_log:
            access_log.info(
                "{request_id} {client} POST {route} {methods} -> {backend} {status} {outcome} "
                "{duration_ms:.1f}ms attempts={attempts}",
                request_id=caller.request_id, client=caller.address, route=route,
                methods=methods_summary(reply.methods), calls=len(reply.methods), backend=backend.name if backend else "-",
                status=reply.status, outcome=reply.outcome, duration_ms=elapsed * 1000.0, attempts=reply.attempts)
        return reply

    async def _handle(self, route: str, body: bytes, headers: Headers, body_too_large: bool,
                      request_id: str) -> Reply:
        if _media_type(headers.getRawHeaders(b"content-type", [None])[0]) != b"application/json":
            return error_reply(400, jsonrpc.INVALID_REQUEST, "Content-Type must be application/json")
        if body_too_large:
            return error_reply(413, jsonrpc.INVALID_REQUEST, f"Request body exceeds {self._max_body} bytes")
        content_encoding = headers.getRawHeaders(b"content-encoding", [None])[0]
        try:
            parsed = jsonrpc.parse_request(decode_body(body, content_encoding, self._max_body), self._max_batch)
            parsed = self._refuse_unavailable(route, parsed)
        except jsonrpc.RequestError as refusal:
            return Reply(refusal.http_status, refusal.body())
        if not parsed.calls:
            return Reply(200, jsonrpc.encode(jsonrpc.merge_batch(parsed, [])), batch=parsed.size)

        methods, batch = parsed.methods, parsed.size if parsed.is_batch else None
        pick = self._pool.pick(route, routing.oldest_needed(parsed.calls))
        backend = pick.backend
        if backend is None:
            reply = error_reply(503, jsonrpc.NO_BACKEND, f"No healthy node available for {route}")
            reply.methods, reply.batch = methods, batch
            return reply

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

        try:
            answer = await self._upstream.post(backend, body, upstream_headers, self._timeout)
        except UpstreamError as failure:
            log.warn("request {request_id} to {backend} failed: {reason}", request_id=request_id,
                     backend=backend.name, reason=str(failure))
            self._metrics.observe_attempt(backend.label, failure.kind)
            timeout = failure.kind == "timeout"
            reply = error_reply(502, jsonrpc.UPSTREAM_TIMEOUT if timeout else jsonrpc.UPSTREAM_FAILED,
                                f"Upstream node failed: {failure}", "timeout" if timeout else "upstream_error", backend)
            reply.methods, reply.batch = methods, batch
            return reply

        encoding = answer.headers.getRawHeaders(b"content-encoding", [None])[0]
        usable = answer.code < 500 and _looks_like_json(answer.body, encoding, parsed.is_batch)
        reply_body = self._merge(parsed, answer.body) if usable and parsed.refused else answer.body
        if not usable or reply_body is None:
            log.warn("request {request_id}: {backend} answered HTTP {code} with an unusable body",
                     request_id=request_id, backend=backend.name, code=answer.code)
            self._metrics.observe_attempt(backend.label, "bad_answer")
            reply = error_reply(502, jsonrpc.UPSTREAM_FAILED,
                                f"Upstream node answered HTTP {answer.code} with an unusable body",
                                "upstream_error", backend)
            reply.methods, reply.batch = methods, batch
            return reply
        self._metrics.observe_attempt(backend.label, "ok")

        reply_headers = [(name, value) for name, values in answer.headers.getAllRawHeaders()
                         if name.lower() not in _DROP_RESPONSE_HEADERS for value in values]
        if pick.fallback is not None:
            reply_headers.append((b"x-sentinel-fallback", pick.fallback.encode()))
        return Reply(answer.code, reply_body, reply_headers, backend, _answer_outcome(answer.code, reply_body, encoding),
                     1, methods, batch)

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
        try:
            items = json.loads(upstream_body)
        except (ValueError, RecursionError):
            return None
        if not isinstance(items, list) or len(items) != len(parsed.calls):
            return None
        return jsonrpc.encode(jsonrpc.merge_batch(parsed, items))

