"""The twisted.web side of upstream traffic: a pooled ``Agent`` and what it connects through.

The request path forwards with its own HTTP/1.1 client (:mod:`.http11`), whose connections speak
nothing else; the checks (sentinel_proxy/checks/) speak treq, which needs an ``IAgent``. They get
a :class:`PooledAgent` of their own, small, closed at shutdown (so does the treq forwarding
client, :mod:`.treq_client`, sized like the forwarding pool). Connections are tuned by wrapping
the endpoints the pool connects through (:class:`UpstreamEndpoint`: TCP_NODELAY, a quiet factory;
:class:`DirectEndpointFactory`: plain TCP endpoints for IP literals), using only public Twisted
APIs. Bodies are written synchronously by :class:`BytesProducer` rather than a
``FileBodyProducer``, which waits for a later reactor turn, and read by :func:`read_body`, which
bounds them and can close the connection; :func:`bounded` puts a deadline on a whole exchange.

:class:`UpstreamResponse` and :class:`UpstreamError` live in :mod:`.response` and are importable
from here too.
"""
from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet import error as neterror
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocolFactory, IReactorTime, IStreamClientEndpoint
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
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from sentinel_proxy.upstream.response import LocalError, UpstreamError, UpstreamResponse, local_error

__all__ = ["BytesProducer", "LocalError", "PooledAgent", "DirectEndpointFactory", "UpstreamEndpoint",
           "UpstreamError", "UpstreamResponse", "bounded", "read_body"]

T = TypeVar("T")


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
    def __init__(self, finished: defer.Deferred[bytes], limit: int, counted: Any):
        self._finished = finished
        self._limit = limit
        self._counted = counted
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
        if self._counted is not None:
            self._counted(len(data))

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        if self._finished.called:  # cancelled or cut off: the caller has moved on
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._finished.callback(b"".join(self._chunks))
        else:
            self._finished.errback(reason)


def read_body(response: IResponse, limit: int = 1 << 62, counted: Any = None) -> defer.Deferred[bytes]:
    """Collect a response body of at most ``limit`` bytes; cancelling closes the connection.
    ``counted(n)``, if given, is told of every ``n`` bytes kept.

    ``twisted.web.client.readBody`` cannot close it here (the body's transport has no
    ``abortConnection``; it warns on every call instead), nor can treq's ``collect``/``content``
    (their Deferreds have no canceller), so a node stalling mid-body would keep its socket after
    the deadline. ``stopProducing`` reaches the real transport.
    """
    def cancel(_: defer.Deferred[bytes]) -> None:
        if collector.transport is not None:
            collector.transport.stopProducing()

    finished: defer.Deferred[bytes] = defer.Deferred(cancel)
    collector = _BodyCollector(finished, limit, counted)
    response.deliverBody(collector)
    return finished


def _set_no_delay(transport: Any) -> None:
    """Turn Nagle's algorithm off, where the transport is TCP (directly or under TLS).

    The agent writes a request's headers and its body in two writes; with Nagle on, the body waits
    for the node's delayed ACK of the headers: measured +23 ms p50 against a 20 ms node.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)


@implementer(IStreamClientEndpoint)
class UpstreamEndpoint:
    """What every pooled upstream connection goes through: TCP_NODELAY, and a quiet factory.

    The pool builds one protocol factory per connection; each would log "Starting/Stopping
    factory" unless ``noisy`` is off. The connection's Deferred fires before the pool writes the
    request on it, so Nagle is off before the first byte. ``HTTP11ClientProtocol`` turns Nagle
    off itself since Twisted 24.10 (twisted#12311), but only on a bare TCP transport: not under
    TLS (https nodes), and not on 24.7, which setup.py still allows.
    """

    def __init__(self, endpoint: IStreamClientEndpoint):
        self.endpoint = endpoint

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[Any]:
        protocolFactory.noisy = False  # type: ignore[attr-defined]

        def tuned(protocol: Any) -> Any:
            _set_no_delay(protocol.transport)
            return protocol

        return self.endpoint.connect(protocolFactory).addCallback(tuned)


@implementer(IAgentEndpointFactory)
class DirectEndpointFactory:
    """Plain TCP endpoints for nodes given by IP address, ``HostnameEndpoint`` for names; TLS over
    either for https.

    ``HostnameEndpoint`` notices that its last address refused the connection only at its next
    0.3 s attempt tick, so every attempt at a dead node cost 300 ms before failover. An IP literal
    needs no name resolution and no racing of addresses.
    """

    def __init__(self, reactor: Any, connect_timeout: float):
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: URI) -> UpstreamEndpoint:
        if uri.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return UpstreamEndpoint(endpoint)


def _timed_out(result: Any, timeout: float) -> Failure:
    return Failure(UpstreamError("timeout", f"no answer within {timeout:g} s"))


_CONNECT_ERRORS = (neterror.ConnectError, neterror.DNSLookupError)
_TRANSPORT_ERRORS = (ResponseFailed, ResponseNeverReceived, neterror.ConnectionLost,
                     neterror.ConnectionDone, neterror.ConnectionClosed)


async def bounded(exchange: defer.Deferred[T], timeout: float, clock: IReactorTime) -> T:
    """The result of ``exchange`` (a whole request, body included) if it comes within ``timeout``
    seconds; the deadline cancels it, which closes its connection.

    Failures of the connection become :class:`UpstreamError`, or :class:`LocalError` when the gateway
    itself could not open one (:func:`local_error`); a cancellation by the caller stays a
    ``CancelledError`` (a hedge race lost, a check stopped at shutdown: not the node's failure).
    """
    # Cancelling surfaces as whatever the agent wraps it in (ResponseNeverReceived, ...), so the
    # timeout's own hook, not the exception type, says that the deadline passed.
    exchange.addTimeout(timeout, clock, onTimeoutCancel=_timed_out)
    try:
        return await exchange
    except neterror.ConnectingCancelledError:
        raise defer.CancelledError() from None
    except _CONNECT_ERRORS as exc:
        raise local_error(exc) or UpstreamError("connect", f"cannot connect: {exc.__class__.__name__}") from None
    except _TRANSPORT_ERRORS as exc:
        if any(isinstance(getattr(reason, "value", None), defer.CancelledError)
               for reason in getattr(exc, "reasons", ())):
            raise defer.CancelledError() from None
        raise UpstreamError("transport", f"connection failed: {exc.__class__.__name__}") from None


class PooledAgent:
    """An ``Agent`` over a keep-alive pool (treq's ``HTTPClient`` runs over :attr:`agent`),
    closed by :meth:`close` at shutdown.

    The checks' is small (the default): a health round is one batch per node and an integrity
    round one call per node, so two connections per node suffice. Idle connections close after
    ``idle_timeout``, before the node's own keep-alive timeout ends them under a request. No
    automatic retry: only the caller decides what is repeated.
    """

    def __init__(self, reactor: Any, max_connections: int = 2, idle_timeout: float = 4.0,
                 connect_timeout: float = 2.0):
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = max_connections
        self._pool.cachedConnectionTimeout = idle_timeout
        self._pool.retryAutomatically = False
        self.agent: IAgent = Agent.usingEndpointFactory(reactor, DirectEndpointFactory(reactor, connect_timeout),
                                                        pool=self._pool)

    def close(self) -> defer.Deferred[None]:
        """Drop pooled connections, so shutdown leaves no sockets behind."""
        return self._pool.closeCachedConnections()
