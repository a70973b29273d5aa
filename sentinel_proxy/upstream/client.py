"""The one HTTP client every upstream call goes through: one ``Agent`` over one tuned pool.

Why not treq's ``HTTPClient``: its ``request`` always wraps the agent in a ``ContentDecoderAgent``
(which adds ``Accept-Encoding: gzip`` to every call and gunzips every answer) and a
``CookieAgent``. The gateway must pass answers through byte for byte, gzip included, and must not
pay for decoding and cookie handling on every request, so it drives the pooled ``Agent`` itself.
The pool is sized for the expected concurrency (the default of 2 per host costs up to 190 µs per
request, design.md), and bodies are written synchronously by :class:`BytesProducer` rather than a
``FileBodyProducer``, which waits for a later reactor turn.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from twisted.internet import defer
from twisted.internet import error as neterror
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
    _StandardEndpointFactory,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from sentinel_proxy.state.backends import Backend


@implementer(IBodyProducer)
class BytesProducer:
    """Writes an in-memory body at once: no cooperator round trip, no copy."""

    __slots__ = ("_body", "length")

    def __init__(self, body: bytes):
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self._body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _BodyCollector(Protocol):
    def __init__(self, finished: defer.Deferred[bytes], limit: int):
        self._finished = finished
        self._limit = limit
        self._size = 0
        self._chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        if self._finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._finished.errback(UpstreamError("too_large", f"answer exceeds {self._limit} bytes"))
            self.transport.stopProducing()
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        if self._finished.called:  # cancelled or cut off: the caller has moved on
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._finished.callback(b"".join(self._chunks))
        else:
            self._finished.errback(reason)


def read_body(response: IResponse, limit: int = 1 << 62) -> defer.Deferred[bytes]:
    """Collect a response body of at most ``limit`` bytes; cancelling closes the connection.

    ``twisted.web.client.readBody`` cannot close it here (the body's transport has no
    ``abortConnection``; it warns on every call instead), so a node stalling mid-body would keep
    its socket after the deadline. ``stopProducing`` reaches the real transport.
    """
    def cancel(_: defer.Deferred[bytes]) -> None:
        if collector.transport is not None:
            collector.transport.stopProducing()

    finished: defer.Deferred[bytes] = defer.Deferred(cancel)
    collector = _BodyCollector(finished, limit)
    response.deliverBody(collector)
    return finished


@implementer(IAgentEndpointFactory)
class DirectEndpointFactory:
    """Plain TCP endpoints for nodes given by IP address; Twisted's standard ones otherwise.

    ``HostnameEndpoint`` (what ``Agent`` uses) notices that its last address refused the
    connection only at its next 0.3 s attempt tick, so every attempt at a dead node cost 300 ms
    before failover. An IP literal needs no name resolution and no racing of addresses.
    """

    def __init__(self, reactor: Any, connect_timeout: float):
        self._reactor = reactor
        self._timeout = connect_timeout
        self._standard = _StandardEndpointFactory(reactor, BrowserLikePolicyForHTTPS(), connect_timeout, None)

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        if uri.scheme == b"http":
            if isIPAddress(host):
                return TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
            if isIPv6Address(host):
                return TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        return self._standard.endpointForURI(uri)


def no_delay(protocol: Any) -> Any:
    """Turn Nagle's algorithm off on the protocol's TCP connection as soon as it has one.

    The agent writes a request's headers and its body in two writes; with Nagle on, the body waits
    for the node's delayed ACK of the headers: measured +23 ms p50 against a 20 ms node.
    """
    make_connection = protocol.makeConnection

    def make(transport: Any) -> None:
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        make_connection(transport)

    protocol.makeConnection = make
    return protocol


class _QuietClientFactory(_HTTP11ClientFactory):
    """One factory per pooled connection: without ``noisy = False``, each logs "Starting/Stopping
    factory"; and every connection gets TCP_NODELAY."""

    noisy = False

    def buildProtocol(self, addr: Any) -> Any:
        return no_delay(super().buildProtocol(addr))


class UpstreamError(Exception):
    """The node gave no usable answer: ``kind`` is "timeout", "connect", "transport" or "too_large".

    Only "connect" proves the request never reached the node (what makes a write safe to retry).
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class RpcCallError(Exception):
    """A check call got an answer that is not a usable JSON-RPC result."""


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    code: int
    headers: Headers
    body: bytes


def _timed_out(result: Any, timeout: float) -> Failure:
    return Failure(UpstreamError("timeout", f"no answer within {timeout:g} s"))


_CONNECT_ERRORS = (neterror.ConnectError, neterror.DNSLookupError)
_TRANSPORT_ERRORS = (ResponseFailed, ResponseNeverReceived, neterror.ConnectionLost,
                     neterror.ConnectionDone, neterror.ConnectionClosed)


def request_body(method: str, params: list[Any], request_id: int = 1) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}).encode()


def parse_json(what: str, body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise RpcCallError(f"{what}: answer is not JSON") from None


def result_of(method: str, document: Any) -> Any:
    """The ``result`` of one JSON-RPC answer, or the reason there is none."""
    if not isinstance(document, dict):
        raise RpcCallError(f"{method}: no JSON-RPC answer")
    if "error" in document:
        raise RpcCallError(f"{method}: error {document['error']!r:.200}")
    if "result" not in document:
        raise RpcCallError(f"{method}: no result")
    return document["result"]


#: The checks' own bound: MAX_RESPONSE_BYTES limits what callers may pull through the gateway,
#: and must not make a node's validator stats (~2 MB on 4.x, more with a long history) unreadable.
CHECK_MAX_RESPONSE = 256 * 1024 * 1024


class UpstreamClient:
    def __init__(self, reactor: IReactorTime, max_connections: int = 128, idle_timeout: float = 4.0,
                 agent: IAgent | None = None, connect_timeout: float = 2.0, max_response_bytes: int = 1 << 25):
        self._reactor = reactor
        self._pool: HTTPConnectionPool | None = None
        self._max_response = max_response_bytes
        if agent is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = max_connections
            self._pool.cachedConnectionTimeout = idle_timeout
            self._pool.retryAutomatically = False
            self._pool._factory = _QuietClientFactory
            agent = Agent.usingEndpointFactory(reactor, DirectEndpointFactory(reactor, connect_timeout),
                                               pool=self._pool)
        self._agent = agent

    async def _post(self, backend: Backend, body: bytes, headers: Headers, limit: int) -> UpstreamResponse:
        if backend.authorization is not None:
            headers.setRawHeaders(b"authorization", [backend.authorization])
        response = await self._agent.request(b"POST", backend.target, headers, BytesProducer(body))
        content = await read_body(response, limit)
        return UpstreamResponse(response.code, response.headers, content)

    async def post(self, backend: Backend, body: bytes, headers: Headers, timeout: float,
                   limit: int | None = None) -> UpstreamResponse:
        """POST ``body`` to the node; the whole exchange, body included, is bounded by ``timeout``,
        and the answer by ``limit`` bytes (default MAX_RESPONSE_BYTES)."""
        attempt = defer.Deferred.fromCoroutine(
            self._post(backend, body, headers, self._max_response if limit is None else limit))
        # Cancelling surfaces as whatever the agent wraps it in (ResponseNeverReceived, ...), so the
        # timeout's own hook, not the exception type, says that the deadline passed.
        attempt.addTimeout(timeout, self._reactor, onTimeoutCancel=_timed_out)
        try:
            return await attempt
        except _CONNECT_ERRORS as exc:
            raise UpstreamError("connect", f"cannot connect: {exc.__class__.__name__}") from None
        except _TRANSPORT_ERRORS as exc:
            # A deadline becomes "timeout" in _timed_out; a cancellation still inside the error here
            # came from the caller (a hedge race lost): not the node's failure.
            if any(isinstance(getattr(reason, "value", None), defer.CancelledError)
                   for reason in getattr(exc, "reasons", ())):
                raise defer.CancelledError() from None
            raise UpstreamError("transport", f"connection failed: {exc.__class__.__name__}") from None

    async def fetch(self, backend: Backend, body: bytes, timeout: float) -> UpstreamResponse:
        """A check's own request: uncompressed, and anything but HTTP 200 is a failed check."""
        headers = Headers({b"content-type": [b"application/json"], b"accept-encoding": [b"identity"]})
        response = await self.post(backend, body, headers, timeout, CHECK_MAX_RESPONSE)
        if response.code != 200:
            raise RpcCallError(f"HTTP {response.code}")
        return response

    async def batch(self, backend: Backend, calls: Sequence[tuple[str, list[Any]]],
                    timeout: float) -> tuple[list[Any], Headers]:
        """Several check calls in one round trip; each item is a result or an :class:`RpcCallError`.

        Answers are matched by id, not position, so a node that reorders them is still read right.
        """
        body = b"[" + b",".join(request_body(method, params, i) for i, (method, params) in enumerate(calls)) + b"]"
        response = await self.fetch(backend, body, timeout)
        items = parse_json("batch", response.body)
        if not isinstance(items, list):
            raise RpcCallError("batch: answer is not a JSON array")
        by_id = {item.get("id"): item for item in items if isinstance(item, dict)}
        results: list[Any] = []
        for i, (method, _) in enumerate(calls):
            try:
                results.append(result_of(method, by_id.get(i)))
            except RpcCallError as exc:
                results.append(exc)
        return results, response.headers

    def close(self) -> defer.Deferred[None]:
        """Drop pooled connections, so shutdown leaves no sockets behind."""
        if self._pool is None:
            return defer.succeed(None)
        return self._pool.closeCachedConnections()

