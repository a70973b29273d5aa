"""The forwarding client's seams: its interface, the endpoints it connects through, its deadline.

In memory (``MemoryReactorClock``, ``StringTransport``) except for one loopback test that reads
the socket option from a real socket.
"""
from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from sentinel_proxy.interfaces import IForwardingClient
from sentinel_proxy.state.backends import Backend
from sentinel_proxy.upstream.client import DirectEndpointFactory, UpstreamClient, UpstreamError


class TCPStringTransport(StringTransport):
    """A StringTransport that remembers TCP_NODELAY, like a TCP transport would apply it."""

    no_delay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled


def endpoint_for(url: bytes, memory: MemoryReactorClock | None = None) -> Any:
    return DirectEndpointFactory(memory or MemoryReactorClock(), 2.0).endpointForURI(URI.fromBytes(url))


def test_the_forwarding_client_provides_its_interface():
    verifyObject(IForwardingClient, UpstreamClient(MemoryReactorClock()))


@pytest.mark.parametrize("url, kind", [
    # IP literals skip HostnameEndpoint, which notices a refused connection only at its next 0.3 s tick.
    (b"http://10.0.0.1:8080/", TCP4ClientEndpoint),
    (b"http://[::1]:8080/", TCP6ClientEndpoint),
    (b"http://node.example:8080/", HostnameEndpoint),
])
def test_endpoints_by_kind_of_host(url, kind):
    assert isinstance(endpoint_for(url).endpoint, kind)


def test_other_schemes_are_refused():
    with pytest.raises(SchemeNotSupported):
        endpoint_for(b"ftp://10.0.0.1/")


def connected(url: bytes) -> tuple[Any, TCPStringTransport, Factory]:
    """Connect to ``url`` over a memory reactor; (the connected protocol, its transport, its factory)."""
    memory = MemoryReactorClock()
    factory = Factory.forProtocol(Protocol)
    connecting = endpoint_for(url, memory).connect(factory)
    host, port, connector_factory, _, _ = memory.tcpClients[0]
    transport = TCPStringTransport()
    connector_factory.buildProtocol(None).makeConnection(transport)
    protocols: list[Any] = []
    connecting.addCallback(protocols.append)
    assert protocols, "the connection did not complete"
    return protocols[0], transport, factory


@pytest.mark.parametrize("url", [b"http://10.0.0.1:8080/", b"https://10.0.0.1/"])
def test_upstream_connections_get_tcp_nodelay_and_a_quiet_factory(url):
    protocol, transport, factory = connected(url)
    assert transport.no_delay, "TCP_NODELAY is off: +23 ms p50 against a 20 ms node"
    assert factory.noisy is False
    assert isinstance(protocol, Protocol)


def test_https_speaks_tls_first():
    _, transport, _ = connected(b"https://10.0.0.1/")
    assert transport.value()[:2] == b"\x16\x03", "no TLS handshake record"


@pytest_twisted.ensureDeferred
async def test_tcp_nodelay_on_a_real_socket_and_no_factory_chatter():
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        endpoint = endpoint_for(f"http://127.0.0.1:{port.getHost().port}/".encode(), reactor)
        factory = Factory.forProtocol(Protocol)
        protocol = await endpoint.connect(factory)
        handle = protocol.transport.getHandle()
        assert handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        protocol.transport.loseConnection()
    finally:
        await port.stopListening()
        globalLogPublisher.removeObserver(events.append)
    assert events and not [e for e in events if e.get("factory") is factory], "one log line per pooled connection"


def pending_post(memory: MemoryReactorClock) -> defer.Deferred[Any]:
    """A POST to a node whose connection never completes."""
    client = UpstreamClient(memory)
    post = defer.ensureDeferred(client.post(Backend("http://10.0.0.1:8080"), b"{}", Headers(), timeout=5.0))
    assert memory.tcpClients and not post.called
    return post


def failure_of(deferred: defer.Deferred[Any]) -> BaseException:
    failures: list[Any] = []
    deferred.addErrback(failures.append)
    assert failures, "no failure (yet)"
    return failures[0].value


def test_the_deadline_covers_connecting():
    memory = MemoryReactorClock()
    post = pending_post(memory)
    memory.advance(5.0)
    error = failure_of(post)
    assert isinstance(error, UpstreamError) and error.kind == "timeout"


def test_a_caller_s_cancel_while_connecting_stays_a_cancellation():
    post = pending_post(MemoryReactorClock())
    post.cancel()
    assert isinstance(failure_of(post), defer.CancelledError)
