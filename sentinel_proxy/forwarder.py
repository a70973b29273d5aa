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


def error_reply(status: int, code: int, message: str, backend: Backend | None = None) -> Reply:
    return Reply(status, jsonrpc.error_body(None, code, message), backend=backend)


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
                 max_batch_size: int, max_body_bytes: int, timeout: float):
        self._pool = pool
        self._upstream = upstream
        self._metrics = metrics
        self._clock = clock
        self._max_batch = max_batch_size
        self._max_body = max_body_bytes
        self._timeout = timeout
        self.totals = RequestTotals()

    async def handle(self, route: str, body: bytes, headers: Headers, body_too_large: bool = False) -> Reply:
        started = self._clock.seconds()
        reply = await self._handle(route, body, headers, body_too_large)
        elapsed = self._clock.seconds() - started
        self.totals.record(reply.status)
        if reply.backend is not None:
            self._pool.record_request(reply.backend, ok=reply.status < 500)
        self._metrics.observe_request(reply.status, reply.backend.name if reply.backend else NO_BACKEND, elapsed)
        return reply

    async def _handle(self, route: str, body: bytes, headers: Headers, body_too_large: bool) -> Reply:
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
            return Reply(200, jsonrpc.encode(jsonrpc.merge_batch(parsed, [])))

        pick = self._pool.pick(route, routing.oldest_needed(parsed.calls))
        backend = pick.backend
        if backend is None:
            return error_reply(503, jsonrpc.NO_BACKEND, f"No healthy node available for {route}")

        upstream_headers = Headers()
        for name in _FORWARD_REQUEST_HEADERS:
            values = headers.getRawHeaders(name)
            if values:
                upstream_headers.setRawHeaders(name, values)
        if parsed.refused:
            # Only the allowed items go upstream, re-encoded, and the answer must be parsed to merge it.
            body = jsonrpc.encode([call.request for call in parsed.calls])
            upstream_headers.removeHeader(b"content-encoding")
            upstream_headers.setRawHeaders(b"accept-encoding", [b"identity"])

        try:
            answer = await self._upstream.post(backend, body, upstream_headers, self._timeout)
        except UpstreamError as failure:
            log.warn("request to {backend} failed: {reason}", backend=backend.name, reason=str(failure))
            code = jsonrpc.UPSTREAM_TIMEOUT if failure.kind == "timeout" else jsonrpc.UPSTREAM_FAILED
            return error_reply(502, code, f"Upstream node failed: {failure}", backend)

        encoding = answer.headers.getRawHeaders(b"content-encoding", [None])[0]
        if answer.code >= 500 or not _looks_like_json(answer.body, encoding, parsed.is_batch):
            log.warn("{backend} answered HTTP {code} with an unusable body", backend=backend.name, code=answer.code)
            return error_reply(502, jsonrpc.UPSTREAM_FAILED,
                               f"Upstream node answered HTTP {answer.code} with an unusable body", backend)

        reply_body = answer.body
        if parsed.refused:
            reply_body = self._merge(parsed, answer.body)
            if reply_body is None:
                return error_reply(502, jsonrpc.UPSTREAM_FAILED,
                                   "Upstream node answered a batch with the wrong shape", backend)
        reply_headers = [(name, value) for name, values in answer.headers.getAllRawHeaders()
                         if name.lower() not in _DROP_RESPONSE_HEADERS for value in values]
        if pick.fallback is not None:
            reply_headers.append((b"x-sentinel-fallback", pick.fallback.encode()))
        return Reply(answer.code, reply_body, reply_headers, backend)

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

