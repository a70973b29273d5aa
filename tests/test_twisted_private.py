"""``write_now`` and ``dispatch_io_directly`` against the installed Twisted: if a release changes
the TCP transport's buffer attributes or the epoll reactor's, these fail instead of the gateway
reordering or losing bytes, or losing its I/O."""
from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, protocol, reactor, tcp
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.testing import StringTransport

from sentinel_proxy.twisted_private import write_now
from tests.support import wait_for

#: What write_now reads of a tcp.Connection (see its docstring).
ATTRIBUTES = ("TLS", "connected", "disconnecting", "_writeDisconnected", "_tempDataLen", "offset", "dataBuffer",
              "socket")


class Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.made: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.data += data


async def connected_pair() -> tuple[Collect, Collect, object]:
    accepted: list[Collect] = []

    class Factory(protocol.ServerFactory):
        def buildProtocol(self, addr: object) -> Collect:
            accepted.append(Collect())
            return accepted[-1]

    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Collect())
    await wait_for(lambda: bool(accepted), what="the server side of the connection")
    return client, accepted[0], port


@pytest_twisted.ensureDeferred
async def test_the_tcp_transport_still_has_what_write_now_reads():
    client, server, port = await connected_pair()
    try:
        transport = client.transport
        assert isinstance(transport, tcp.Connection)
        missing = [name for name in ATTRIBUTES if not hasattr(transport, name)]
        assert not missing, f"Twisted's tcp.Connection lost {missing}: re-check sentinel_proxy/twisted_private.py"
        # Empty buffers look like this, which is what write_now takes as "nothing unsent".
        assert transport._tempDataLen == 0 and transport.offset == len(transport.dataBuffer) == 0
        transport.write(b"x")
        assert transport._tempDataLen == 1, "Twisted no longer buffers in _tempDataBuffer: re-check write_now"
    finally:
        client.transport.loseConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_write_now_sends_at_once_without_watching_for_writability():
    client, server, port = await connected_pair()
    try:
        write_now(client.transport, b"hello")
        assert client.transport._tempDataLen == 0
        assert client.transport not in reactor.getWriters(), "write_now went through Twisted's buffer"
        await wait_for(lambda: server.data == b"hello", what="the bytes at the peer")
    finally:
        client.transport.loseConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_write_now_keeps_the_order_behind_bytes_twisted_still_holds():
    client, server, port = await connected_pair()
    try:
        client.transport.write(b"first,")  # buffered until the next reactor turn
        write_now(client.transport, b"second")
        await wait_for(lambda: server.data == b"first,second", what="both writes, in order")
    finally:
        client.transport.loseConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_write_now_on_a_closing_connection_leaves_it_to_twisted():
    client, server, port = await connected_pair()
    try:
        client.transport.loseConnection()
        write_now(client.transport, b"late")
        # Not sent directly: Twisted buffers it, and sends it before closing, as its write does.
        assert client.transport._tempDataLen == len(b"late")
        await wait_for(lambda: not client.transport.connected, what="the close")
    finally:
        await port.stopListening()


def test_write_now_on_other_transports_is_transport_write():
    transport = StringTransport()
    write_now(transport, b"abc")
    assert transport.value() == b"abc"


# ------------------------------------------------------------------ dispatch_io_directly


def spin(loop: object, done, rounds: int = 2000) -> None:
    """Turn a reactor that is not running (not the test's) until ``done()``, at most ``rounds`` times."""
    for _ in range(rounds):
        if done():
            return
        loop.iterate(0.01)  # type: ignore[attr-defined]
    raise AssertionError("the reactor did not get there")


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class FailsOnClose(Collect):
    def connectionLost(self, reason: object = None) -> None:
        raise RuntimeError("a protocol whose connectionLost fails")


def test_the_epoll_reactor_still_has_what_direct_dispatch_reads(epoll_reactor):
    from twisted.internet.epollreactor import EPollReactor

    loop = epoll_reactor
    missing = [name for name in ("_poller", "_selectables", "_doReadOrWrite") if not hasattr(loop, name)]
    assert not missing, f"Twisted's EPollReactor lost {missing}: re-check dispatch_io_directly"
    assert isinstance(loop._selectables, dict) and hasattr(loop._poller, "poll")
    assert EPollReactor.doIteration is EPollReactor.doPoll, "the main loop no longer polls through doPoll"


def test_direct_dispatch_serves_connections_and_survives_a_failing_one(logged, epoll_reactor):
    from sentinel_proxy.twisted_private import dispatch_io_directly

    loop = epoll_reactor
    assert dispatch_io_directly(loop) and loop.doIteration == loop.doPoll
    port = loop.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    try:
        failing, echoed = FailsOnClose(), Collect()
        for client in (failing, echoed):
            loop.connectTCP("127.0.0.1", port.getHost().port, protocol.ClientFactory.forProtocol(lambda c=client: c))
        spin(loop, lambda: failing.made.called and echoed.made.called)
        failing.transport.write(b"first")
        echoed.transport.write(b"second")
        spin(loop, lambda: failing.data == b"first" and echoed.data == b"second")
        failing.transport.loseConnection()  # its connectionLost raises inside the dispatch
        spin(loop, lambda: any("connectionLost fails" in str(event.get("log_failure", "")) for event in logged))
        echoed.transport.write(b" again")
        spin(loop, lambda: echoed.data == b"second again")
    finally:
        echoed.transport.loseConnection()
        port.stopListening()
        spin(loop, lambda: not (echoed.transport.connected or port.connected))


def test_direct_dispatch_leaves_other_reactors_alone():
    from twisted.internet.selectreactor import SelectReactor

    from sentinel_proxy.twisted_private import dispatch_io_directly

    other = SelectReactor()
    assert not dispatch_io_directly(other) and "doIteration" not in vars(other)
