"""The HTTP server side: the ``Site``, its requests, and the callers' connections.

The ``Site`` here turns off what costs time on every request without serving the gateway:
form parsing of POST bodies and twisted.web's access log (design.md). Request bodies are bounded
while they arrive, so an oversized body is never held in memory (the one non-public hook, kept in
:mod:`sentinel_proxy.web.twisted_private`). The rest is public: ``Site.log``, and a
``WrappingFactory`` around the site to know its connections.
"""
from __future__ import annotations

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime, ITCPTransport, ITransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from sentinel_proxy.web.twisted_private import BoundedRequest


class GatewaySite(Site):
    noisy = False

    def log(self, request: Request) -> None:
        """No twisted.web access log: it costs ~90 µs per request; requests are counted in metrics."""


def make_site(resource: IResource, max_body_bytes: int, idle_timeout: float = 60.0) -> GatewaySite:
    """``idle_timeout`` closes client connections that send nothing, so idle or stalled clients
    cannot hold sockets and memory forever."""
    request_factory = type("GatewayRequest", (BoundedRequest,), {"max_body": max_body_bytes})
    return GatewaySite(resource, requestFactory=request_factory, parsePOSTFormSubmission=False,
                       timeout=idle_timeout)


class ClientConnection(ProtocolWrapper):
    """One caller's connection, with Nagle's algorithm off, so an answer's last small write never
    waits for the caller's delayed ACK.

    ``HTTPChannel`` does this itself since Twisted 24.10 (twisted#12311); setup.py still allows
    24.7. On later releases this is one redundant ``setsockopt`` per connection, not per request.
    """

    def makeConnection(self, transport: ITransport) -> None:
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
        super().makeConnection(transport)


class ClientConnections(WrappingFactory):
    """The site's client connections (``protocols``), so a shutdown can let the last answers go
    out before closing them.

    The site's own protocol is twisted.web's private HTTP/1.1-or-2 wrapper: a ``WrappingFactory``
    sees every connection open and close without patching it or reaching inside. Its
    ``ProtocolWrapper`` relays the transport (and every interface the transport provides) to the
    channel, which is what ``tests/test_web_hooks.py`` checks against each Twisted release.
    """

    protocol = ClientConnection
    noisy = False

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
