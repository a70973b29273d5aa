"""The HTTP server side: the ``Site``, its requests, and the callers' connections.

The ``Site`` here turns off what costs time on every request without serving the gateway:
form parsing of POST bodies and twisted.web's access log (design.md). Request bodies are bounded
while they arrive, so an oversized body is never held in memory (the one non-public hook, kept in
:mod:`sentinel_proxy.twisted_private`). The rest is public: ``Site.log``, and the
site's ``protocol``: an ``HTTPChannel`` that reports its connection opening and closing.
"""
from __future__ import annotations

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from sentinel_proxy.twisted_private import BoundedRequest


class ClientConnections:
    """The callers' open connections, so a shutdown can let the last answers go out before
    closing them."""

    def __init__(self) -> None:
        self.protocols: set[HTTPChannel] = set()

    async def close_all(self, clock: IReactorTime, timeout: float) -> None:
        """Close every client connection once what was written to it has been sent.

        The reactor's own shutdown drops connections with their buffers unsent, so an answer
        finished a moment before the end of a drain would never reach its caller.
        """
        for connection in list(self.protocols):
            connection.loseConnection()
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

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        self.site.connections.protocols.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Failure) -> None:
        self.site.connections.protocols.discard(self)
        super().connectionLost(reason)


class GatewaySite(Site):
    noisy = False
    protocol = ClientChannel

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.connections = ClientConnections()

    def log(self, request: Request) -> None:
        """No twisted.web access log: it costs ~90 µs per request; requests are counted in metrics."""


def make_site(resource: IResource, max_body_bytes: int, idle_timeout: float = 60.0) -> GatewaySite:
    """``idle_timeout`` closes client connections that send nothing, so idle or stalled clients
    cannot hold sockets and memory forever."""
    request_factory = type("GatewayRequest", (BoundedRequest,), {"max_body": max_body_bytes})
    return GatewaySite(resource, requestFactory=request_factory, parsePOSTFormSubmission=False,
                       timeout=idle_timeout)
