"""The Twisted hooks the web layer is built on, checked against the installed Twisted.

If a release changes one, these fail, rather than the gateway quietly losing its body bound
(``BoundedRequest``, the one non-public hook: sentinel_proxy/twisted_private.py), its drain
(``ClientChannel`` must report every connection, with Nagle off, and closing one
must still send what was written to it), or its access-log switch-off (``GatewaySite.log``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.interfaces import ITCPTransport
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from sentinel_proxy.web.site import ClientConnections, GatewaySite, make_site
from sentinel_proxy.twisted_private import BoundedRequest
from tests.http_raw import connect
from tests.support import http as exchange
from tests.support import wait_for

ensure = pytest_twisted.ensureDeferred
MAX_BODY = 1000


class Probe(Resource):
    """POST answers "<bytes buffered> <body_too_large>"; GET is held until the test answers it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Request] = []

    def render_POST(self, request: BoundedRequest) -> bytes:
        return b"%d %d" % (len(request.content.read()), request.body_too_large)

    def render_GET(self, request: Request) -> Any:
        self.held.append(request)
        return NOT_DONE_YET


@dataclass
class Served:
    site: GatewaySite
    connections: ClientConnections
    probe: Probe
    port: Any
    logged: list[Request] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}/"


@pytest_twisted.async_yield_fixture
async def served():
    probe = Probe()
    site = make_site(probe, MAX_BODY)
    connections = site.connections
    running = Served(site, connections, probe, reactor.listenTCP(0, site, interface="127.0.0.1"))
    site.log = running.logged.append  # the hook twisted.web calls once per finished request
    yield running
    await connections.close_all(reactor, 2.0)
    await running.port.stopListening()


def chunked(body: bytes, size: int = 300) -> bytes:
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


def test_twisted_still_declares_the_hooks_bounded_request_overrides():
    declared = getattr(http, "_IDeprecatedHTTPChannelToRequestInterface", None)
    assert declared is not None and {"gotLength", "handleContentChunk"} <= set(declared.names()), \
        "Twisted changed how HTTPChannel hands a body to its Request: re-check sentinel_proxy/twisted_private.py"


@ensure
async def test_a_body_is_bounded_while_it_arrives(served):
    assert (await exchange("POST", served.url, b"x" * MAX_BODY)).body == b"%d 0" % MAX_BODY
    assert (await exchange("POST", served.url, b"x" * (MAX_BODY + 1))).body == b"0 1", "declared length over"
    for size, expected in ((MAX_BODY, b"%d 0" % MAX_BODY), (3 * MAX_BODY, b"0 1")):
        client = await connect(served.port.getHost().port)
        client.transport.write(b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
                               + chunked(b"y" * size))
        answer = await client.closed
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n" + expected), answer[-60:]


@ensure
async def test_every_connection_is_tracked_with_its_transport_interfaces(served):
    client = await connect(served.port.getHost().port)
    await wait_for(lambda: len(served.connections.protocols) == 1, what="the connection to be tracked")
    (connection,) = served.connections.protocols
    assert ITCPTransport.providedBy(connection.transport) and connection.transport.getTcpNoDelay()
    assert connection.transport.getPeer() == client.transport.getHost()
    client.transport.loseConnection()
    await wait_for(lambda: not served.connections.protocols, what="the closed connection to be forgotten")


@ensure
async def test_closing_the_connections_still_sends_what_was_written(served):
    body = b"z" * (8 << 20)  # more than the kernel takes at once: most of it is still in Twisted's buffer
    answering = defer.Deferred.fromCoroutine(exchange("GET", served.url, headers={}))
    await wait_for(lambda: served.probe.held, what="the request to arrive")
    request = served.probe.held[0]
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()
    await served.connections.close_all(reactor, 5.0)
    assert not served.connections.protocols
    answer = await answering
    assert answer.code == 200 and answer.body == body
    assert len(served.logged) == 1, "twisted.web calls Site.log for every finished request"
