"""The HTTP server side: the ``Site``, its requests, and the callers' connections.

The ``Site`` here turns off what costs time on every request without serving the gateway:
form parsing of POST bodies and twisted.web's access log (design.md). Request bodies are bounded
while they arrive, so an oversized body is never held in memory (the one non-public hook, kept in
:mod:`sentinel_proxy.twisted_private`). The rest is public: ``Site.log``, and the
site's ``protocol``: an ``HTTPChannel`` that reports its connection opening and closing, holds
each request to a deadline, and closes after every answer once the gateway drains.
"""
from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from sentinel_proxy.twisted_private import BoundedRequest
from sentinel_proxy.web.handoff import DRAIN_WINDOW
from sentinel_proxy.web.wire import CLOSE, Dates, plain


class ClientConnections:
    """The callers' open connections, so a shutdown can let the last answers go out before
    closing them."""

    def __init__(self) -> None:
        self.protocols: set[ClientChannel] = set()
        #: From the drain's start every answer says ``Connection: close`` (``checkPersistence``).
        self.draining = False
        self._sweep: IDelayedCall | None = None

    def drain(self, clock: IReactorTime) -> None:
        """The drain begins: each :data:`DRAIN_WINDOW`, a channel with no request and nothing heard
        since the last look is closed (one with a request closes itself after its answer)."""
        self.draining = True
        self._sweep = clock.callLater(DRAIN_WINDOW, self._close_idle, clock)

    def _close_idle(self, clock: IReactorTime) -> None:
        self._sweep = None
        for channel in list(self.protocols):
            if channel.requests or channel.heard:
                channel.heard = False
            else:
                channel.loseConnection()
        if self.protocols:
            self._sweep = clock.callLater(DRAIN_WINDOW, self._close_idle, clock)

    def close(self) -> None:
        """Close every client connection after what was written to it, and stop the drain's sweep.

        A channel is closed with ``HTTPChannel.loseConnection``, not its transport's: the channel
        is its transport's producer, and a producer paused by a full write buffer would keep
        ``transport.loseConnection`` from ever closing (ITransport says so)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for connection in list(self.protocols):
            connection.loseConnection()

    async def close_all(self, clock: IReactorTime, timeout: float) -> None:
        """Close every client connection once what was written to it has been sent.

        The reactor's own shutdown drops connections with their buffers unsent, so an answer
        finished a moment before the end of a drain would never reach its caller.
        """
        self.close()
        deadline = clock.seconds() + timeout
        while self.protocols and clock.seconds() < deadline:
            await task.deferLater(clock, 0.01, lambda: None)


class ClientChannel(HTTPChannel):
    """One caller's connection: tracked, and with Nagle's algorithm off, so an answer's last
    small write never waits for the caller's delayed ACK.

    A subclass of the public ``HTTPChannel`` set as the site's ``protocol`` costs nothing per
    request; wrapping every connection in a ``ProtocolWrapper`` measured ~30 µs per request (one
    more Python layer on every read and write). ``HTTPChannel`` turns Nagle off itself since
    Twisted 24.10 (twisted#12311); setup.py still allows 24.7. (HTTP/2 needs TLS with ALPN, which
    the gateway's listeners do not offer, so the HTTP/1.1-or-2 wrapper is not needed.)
    """

    site: "GatewaySite"
    #: Heard from while draining, since the drain's last look (``ClientConnections``).
    heard = False
    #: The deadline of the request being read; twisted.web's own timeout restarts on every byte.
    _deadline: IDelayedCall | None = None

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        self.site.connections.protocols.add(self)
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        """A request's first byte starts its deadline (none is being read or answered: twisted.web
        holds a pipelined request's bytes until the answer before it is done, then replays them
        here). On a handed-off connection the first request comes whole, already held to the
        lean server's deadlines: its deadline is set and cancelled at once."""
        site = self.site
        if site.connections.draining:
            self.heard = True
        if self._deadline is None and not self.requests:
            self._deadline = self.callLater(site.request_deadline, self._too_slow)
        super().dataReceived(data)

    def request_read(self) -> None:
        """The request being read is in whole: no deadline until the next one begins."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        """Nothing is being answered (no deadline runs then): a plain 408, and the connection ends."""
        self._deadline = None
        request = self.requests[-1] if self.requests else None
        self.site.timed_out("body" if request is not None and request.head_in else "header")
        now = self.site.reactor.seconds()
        self.transport.write(plain(408, b"request timed out\n", Dates().line(now), CLOSE))
        self.loseConnection()

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        """While draining, the answer says ``Connection: close`` and the channel closes after it."""
        if self.site.connections.draining:
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return super().checkPersistence(request, version)

    def connectionLost(self, reason: Failure) -> None:
        self.site.connections.protocols.discard(self)
        self.request_read()
        super().connectionLost(reason)


class GatewayRequest(BoundedRequest):
    """Tells its channel when it is read in whole (``process`` is where twisted.web starts serving it)."""

    channel: ClientChannel

    def process(self) -> None:
        self.channel.request_read()
        super().process()


class GatewaySite(Site):
    noisy = False
    protocol = ClientChannel

    #: How long a request may take to arrive, head and body, from its first byte, in seconds.
    request_deadline = 40.0
    #: Counts a request cut off by its deadline (``phase``: header or body), when metrics are kept.
    metrics: Any = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.connections = ClientConnections()

    def configure(self, request_deadline: float) -> None:
        self.request_deadline = request_deadline

    def timed_out(self, phase: str) -> None:
        if self.metrics is not None:
            self.metrics.client_timeouts.labels(phase).inc()

    def log(self, request: Request) -> None:
        """No twisted.web access log: it costs ~90 µs per request; requests are counted in metrics."""


def make_site(resource: IResource, max_body_bytes: int, idle_timeout: float = 60.0, metrics: Any = None,
              reactor: IReactorTime | None = None) -> GatewaySite:
    """``idle_timeout`` closes client connections that send nothing, so idle or stalled clients
    cannot hold sockets and memory forever; the request deadline comes from the lean server's
    limits (``LeanServerFactory.configure``)."""
    request_factory = type("GatewayRequest", (GatewayRequest,), {"max_body": max_body_bytes})
    site = GatewaySite(resource, requestFactory=request_factory, parsePOSTFormSubmission=False,
                       timeout=idle_timeout, reactor=reactor)
    site.metrics = metrics
    return site
