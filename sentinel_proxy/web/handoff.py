"""Handing a connection to the twisted.web ``Site``, and tracking the lean server's connections.

Every route but ``POST`` on the RPC routes (``/health``, ``/metrics``, the dashboard, ``/admin``,
preflights, anything else) is served by the Site, on the connection it came on. Its channel is
built with the Site's public ``buildProtocol``, connected to the same transport with
``makeConnection`` and fed with ``dataReceived``: rebuilt messages until the lean parser is at a
message boundary, then the bytes as they come (web/server.py). It starts once every earlier lean
answer is written, so answers keep their order; from then on it owns the connection.
"""
from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime, ITransport
from twisted.python.failure import Failure

#: While draining, how long a connection with nothing owed and nothing arriving is kept before it
#: is closed: a request the caller sent before it could see the drain (at most a round trip, well
#: under a second even across continents) is still read and served. Any longer only delays the exit.
DRAIN_WINDOW = 1.0


class Handoff:
    """The Site's channel for one connection, and the bytes waiting for it to start."""

    __slots__ = ("_site", "channel", "_pending", "waiting")

    def __init__(self, site: Any):
        self._site = site
        self.channel: Any = None
        self._pending: list[bytes] = []
        #: Bytes held until the channel starts (the lean server stops reading past a bound).
        self.waiting = 0

    def feed(self, data: bytes) -> None:
        if self.channel is not None:
            self.channel.dataReceived(data)
        elif data:
            self._pending.append(data)
            self.waiting += len(data)

    def start(self, transport: ITransport) -> None:
        channel = self._site.buildProtocol(transport.getPeer())
        self.channel = channel
        channel.makeConnection(transport)
        data = b"".join(self._pending)
        self._pending = []
        self.waiting = 0
        if data:
            channel.dataReceived(data)

    def lost(self, reason: Failure) -> None:
        if self.channel is not None:
            self.channel.connectionLost(reason)


class Connections:
    """The callers' connections for the drain (as ``ClientConnections`` in web/site.py): the lean
    server's, handed off or not, and the Site's own."""

    def __init__(self, site_connections: Any = None):
        #: ``LeanHTTP`` protocols; a handed-off one stays here until its connection ends.
        self.protocols: set[Any] = set()
        self._site = site_connections
        #: From the drain's start every answer says ``Connection: close``.
        self.draining = False

    def drain(self, clock: IReactorTime) -> None:
        """The drain begins: answers say close from now on, and each connection closes once it has
        nothing owed and has heard nothing for :data:`DRAIN_WINDOW` (the connections close
        themselves; :meth:`settle` waits for that)."""
        self.draining = True
        for protocol in list(self.protocols):
            protocol.drain()
        if self._site is not None:
            self._site.drain(clock)

    async def settle(self, clock: IReactorTime, timeout: float) -> None:
        """Wait, up to ``timeout`` seconds, for the connections to close themselves."""
        site = self._site.protocols if self._site is not None else set()
        deadline = clock.seconds() + timeout
        while (self.protocols or site) and clock.seconds() < deadline:
            await task.deferLater(clock, 0.01, lambda: None)

    async def close_all(self, clock: IReactorTime, timeout: float) -> None:
        """Close every connection after what was written to it (``loseConnection`` sends what is
        buffered: the drain has let the requests in flight finish first, up to its grace); after
        ``timeout`` seconds, whatever is still open (a caller not reading) is aborted."""
        for protocol in list(self.protocols):
            protocol.close()
        if self._site is not None:
            self._site.close()
        await self.settle(clock, timeout)
        site = self._site.protocols if self._site is not None else set()
        for protocol in list(self.protocols) + list(site):
            protocol.transport.abortConnection()
