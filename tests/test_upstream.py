"""The twisted.web side of upstream traffic: the pooled Agent's endpoints and deadline, and the
treq forwarding client (UPSTREAM_CLIENT=treq).

In memory (``MemoryReactorClock``, ``StringTransport``) except for the loopback tests that read
the socket option from a real socket and drive the treq client against a simulated node.
"""
from __future__ import annotations

import gzip
import json
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
from sentinel_proxy.upstream.client import DirectEndpointFactory, PooledAgent, UpstreamError, bounded
from sentinel_proxy.upstream.http11 import FastForwardingClient
from sentinel_proxy.upstream.memory import AnswerMemory
from sentinel_proxy.upstream.response import UpstreamResponse
from sentinel_proxy.upstream.treq_client import TreqForwardingClient
from sentinel_simnode.node import SCENARIOS, ChainParams, SimulatedNode, simulated_site


class TCPStringTransport(StringTransport):
    """A StringTransport that remembers TCP_NODELAY, like a TCP transport would apply it."""

    no_delay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled


def endpoint_for(url: bytes, memory: MemoryReactorClock | None = None) -> Any:
    return DirectEndpointFactory(memory or MemoryReactorClock(), 2.0).endpointForURI(URI.fromBytes(url))


@pytest.mark.parametrize("kind", [FastForwardingClient, TreqForwardingClient])
def test_the_forwarding_clients_provide_their_interface(kind):
    verifyObject(IForwardingClient, kind(MemoryReactorClock()))


def test_the_response_types_are_importable_from_the_client_module():
    from sentinel_proxy.upstream import client

    assert client.UpstreamResponse is UpstreamResponse and client.UpstreamError is UpstreamError


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
    """A POST through the pooled agent (as the checks send theirs) to a node whose connection never
    completes, under a 5 s deadline."""
    agent = PooledAgent(memory).agent
    post = defer.ensureDeferred(bounded(agent.request(b"POST", b"http://10.0.0.1:8080/", Headers()), 5.0, memory))
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


def test_the_pooled_agent_is_small_and_closes():
    memory = MemoryReactorClock()
    pooled = PooledAgent(memory, idle_timeout=3.0)
    assert (pooled._pool.maxPersistentPerHost, pooled._pool.cachedConnectionTimeout) == (2, 3.0)
    assert pooled._pool.retryAutomatically is False
    assert pooled.close().called


# --- the treq forwarding client, against a simulated node on 127.0.0.1

@pytest_twisted.async_yield_fixture
async def simnode():
    sim = SimulatedNode(SCENARIOS["pruned"], ChainParams(slots_per_epoch=8, committee_size=4, slot_seconds=600.0,
                                                         block_seconds=600.0), clock=reactor)
    port = reactor.listenTCP(0, simulated_site(sim), interface="127.0.0.1")
    yield sim, Backend(f"http://127.0.0.1:{port.getHost().port}")
    await port.stopListening()


BATCH = json.dumps([{"jsonrpc": "2.0", "id": i, "method": "node_getBlock", "params": [950 + i]}
                    for i in range(12)]).encode()


@pytest_twisted.ensureDeferred
async def test_the_treq_client_forwards_and_decodes_gzip(simnode):
    """treq always asks for gzip and gunzips: the answer is the same JSON, no longer byte-exact."""
    _, backend = simnode
    memory = AnswerMemory(1 << 30)
    treq_client = TreqForwardingClient(reactor, memory=memory)
    fast = FastForwardingClient(reactor)
    pairs = [(b"content-type", b"application/json"), (b"Accept-Encoding", b"gzip")]
    held: list[int] = []
    try:
        via_treq = await treq_client.post(backend, BATCH, pairs, 5.0).addCallback(
            lambda answer: held.append(memory.held) or answer)
        via_fast = await fast.post(backend, BATCH, pairs, 5.0)
    finally:
        await treq_client.close()
        await fast.close()
    assert via_treq.code == via_fast.code == 200
    assert (b"content-encoding", b"gzip") in via_fast.headers
    assert via_treq.body == gzip.decompress(via_fast.body), "decoded, not passed through"
    assert not [name for name, _ in via_treq.headers if name == b"content-encoding"]
    assert all(name == name.lower() for name, _ in via_treq.headers)
    assert (b"content-type", b"application/json") in via_treq.headers
    assert held and held[0] > 0 and memory.held == 0, "counted until handed over, then given back"


@pytest_twisted.ensureDeferred
async def test_the_treq_client_keeps_the_bound_and_the_errors(simnode):
    _, backend = simnode
    treq_client = TreqForwardingClient(reactor, max_response_bytes=100)
    try:
        with pytest.raises(UpstreamError) as too_large:
            await treq_client.post(backend, BATCH, [(b"content-type", b"application/json")], 5.0)
        with pytest.raises(UpstreamError) as refused:
            await treq_client.post(Backend("http://127.0.0.1:1"), BATCH, [], 5.0)
    finally:
        await treq_client.close()
    assert too_large.value.kind == "too_large" and treq_client.memory.held == 0
    assert refused.value.kind == "connect"


def test_the_treq_client_s_deadline_and_cancel():
    memory = MemoryReactorClock()
    timed = TreqForwardingClient(memory).post(Backend("http://10.0.0.1:8080"), b"{}", [], 5.0)
    memory.advance(5.0)
    assert failure_of(timed).kind == "timeout"
    cancelled = TreqForwardingClient(memory).post(Backend("http://10.0.0.1:8080"), b"{}", [], 5.0)
    cancelled.cancel()
    assert isinstance(failure_of(cancelled), defer.CancelledError)
