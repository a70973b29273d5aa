"""FastForwardingClient (issue "A data plane faster than the Go prototype", item 1) against real,
misbehaving HTTP servers on 127.0.0.1.

Each server is a raw Twisted protocol whose answer to every request is a test's own function, so a
test can send exactly the bytes (or the silence, the reset, the drip) it is about. Every wait is on
a Deferred with a bound; nothing sleeps.
"""
from __future__ import annotations

import base64
import datetime
import gzip
import json
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import pytest_twisted
from httptools import HttpParserError, HttpRequestParser
from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectingCancelledError, ConnectionLost, DNSLookupError, NoRouteError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from sentinel_proxy.interfaces import IForwardingClient
from sentinel_proxy.state.backends import Backend
from sentinel_proxy.upstream.client import BytesProducer, PooledAgent, UpstreamError, read_body
from sentinel_proxy.upstream.http11 import FastForwardingClient
from sentinel_proxy.upstream.memory import PREALLOCATE_FROM, AnswerMemory
from sentinel_simnode.node import SCENARIOS, ChainParams, SimulatedNode, simulated_site

ensure = pytest_twisted.ensureDeferred

JSON = ((b"content-type", b"application/json"),)
BODY = b'{"jsonrpc":"2.0","id":1,"method":"node_getBlockNumber","params":[]}'
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# ------------------------------------------------------------------------------- raw servers


@dataclass
class Seen:
    """One request as the server parsed it."""

    connection: int
    path: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


class Observed:
    """Deferreds fired when a condition holds: each ``wait`` gets its own, bounded."""

    def __init__(self) -> None:
        self._waiters: list[tuple[Callable[[], bool], defer.Deferred[None]]] = []

    def check(self) -> None:
        for predicate, waiter in list(self._waiters):
            if predicate():
                self._waiters.remove((predicate, waiter))
                waiter.callback(None)

    async def wait(self, predicate: Callable[[], bool], seconds: float = 5.0, what: str = "condition") -> None:
        if predicate():
            return
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiters.append((predicate, waiter))
        waiter.addTimeout(seconds, reactor)
        try:
            await waiter
        except defer.TimeoutError:
            raise AssertionError(f"no {what} within {seconds} s") from None


class ServerConnection(Protocol):
    """Parses requests (httptools, test side) and hands each complete one to the server's handler."""

    def __init__(self, server: RawServer, index: int):
        self.server = server
        self.index = index
        self.parser = HttpRequestParser(self)
        self.first_data: bytes | None = None
        self.closed = False
        self.current: Seen | None = None

    def connectionMade(self) -> None:
        self.server.events.check()

    def dataReceived(self, data: bytes) -> None:
        if self.first_data is None:
            self.first_data = data
        try:
            self.parser.feed_data(data)
        except HttpParserError:
            self.transport.abortConnection()

    def on_message_begin(self) -> None:
        self.current = Seen(self.index)

    def on_url(self, url: bytes) -> None:
        self.current.path += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        seen, self.current = self.current, None
        self.server.requests.append(seen)
        self.server.handler(self, seen)
        self.server.events.check()

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        self.server.events.check()

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0), as a crashing node does."""
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abortConnection()


class RawServer(Factory):
    noisy = False

    def __init__(self, handler: Callable[[ServerConnection, Seen], None],
                 listen: Callable[[Factory], Any] = lambda f: reactor.listenTCP(0, f, interface="127.0.0.1")):
        self.handler = handler
        self.connections: list[ServerConnection] = []
        self.requests: list[Seen] = []
        self.events = Observed()
        self.port = listen(self)

    def buildProtocol(self, addr: Any) -> ServerConnection:
        conn = ServerConnection(self, len(self.connections))
        self.connections.append(conn)
        return conn

    def backend(self, path: str = "/", credentials: str = "") -> Backend:
        return Backend(f"http://{credentials}127.0.0.1:{self.port.getHost().port}{path}")

    async def requested(self, count: int = 1) -> None:
        await self.events.wait(lambda: len(self.requests) >= count, what=f"{count} request(s) at the server")

    async def closed(self, index: int = 0) -> None:
        """The server's end of its ``index``-th connection is closed (by either side)."""
        await self.events.wait(lambda: len(self.connections) > index and self.connections[index].closed,
                               what=f"close of server connection {index}")

    async def stop(self) -> None:
        await self.port.stopListening()
        for conn in self.connections:
            if not conn.closed:
                conn.transport.abortConnection()
        await self.events.wait(lambda: all(conn.closed for conn in self.connections), what="server connections closed")


def answer(raw: bytes) -> Callable[[ServerConnection, Seen], None]:
    return lambda conn, seen: conn.transport.write(raw)


def in_pieces(*pieces: bytes) -> Callable[[ServerConnection, Seen], None]:
    """Write ``pieces`` on successive reactor turns, so the client parses across reads."""
    def handler(conn: ServerConnection, seen: Seen) -> None:
        def write(i: int) -> None:
            if i < len(pieces) and not conn.closed:
                conn.transport.write(pieces[i])
                reactor.callLater(0, write, i + 1)
        write(0)
    return handler


@pytest_twisted.async_yield_fixture
async def serve():
    """``serve(handler)`` starts a raw server; all of them, and their connections, stop at teardown."""
    started: list[RawServer] = []

    def start(handler: Callable[[ServerConnection, Seen], None]) -> RawServer:
        server = RawServer(handler)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest_twisted.async_yield_fixture
async def client():
    """``client(**options)``: FastForwardingClients closed at teardown."""
    made: list[FastForwardingClient] = []

    def make(**options: Any) -> FastForwardingClient:
        made.append(FastForwardingClient(reactor, **options))
        return made[-1]

    yield make
    for each in made:
        await each.close()


async def kind_of(attempt: defer.Deferred[Any]) -> tuple[str, str]:
    with pytest.raises(UpstreamError) as info:
        await attempt
    return info.value.kind, str(info.value)


# ------------------------------------------------------------------------------- answers


@ensure
async def test_content_length_answer_and_the_request_as_the_node_sees_it(serve, client):
    server = serve(answer(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Aztec-Thing: a\r\n"
                          b"x-aztec-thing: b\r\netag: \"v1\"\r\nKeep-Alive: timeout=5\r\n"
                          b"Content-Length: 5\r\n\r\nhello"))
    headers = [(b"Content-Type", b"application/json"), (b"x-request-id", b"r-1"), (b"X-Multi", b"1"),
               (b"x-multi", b"2"), (b"HOST", b"evil"), (b"content-length", b"999"), (b"Connection", b"close")]
    response = await client().post(server.backend("/rpc"), BODY, headers, 5.0)
    assert (response.code, response.body) == (200, b"hello")
    # (name, value) pairs in the order sent, names lower-cased; connection control headers left
    # out, as twisted's Agent does
    assert response.headers == ((b"content-type", b"application/json"), (b"x-aztec-thing", b"a"),
                                (b"x-aztec-thing", b"b"), (b"etag", b'"v1"'))
    seen = server.requests[0]
    assert seen.path == b"/rpc" and seen.body == BODY
    assert seen.header(b"host") == [f"127.0.0.1:{server.port.getHost().port}".encode()]
    assert seen.header(b"content-length") == [str(len(BODY)).encode()]
    assert seen.header(b"x-request-id") == [b"r-1"] and seen.header(b"connection") == []
    assert seen.header(b"x-multi") == [b"1", b"2"], "every pair, in order"
    assert [name for name, _ in seen.headers][1:4] == [b"Content-Type", b"x-request-id", b"X-Multi"], \
        "names as the caller spelled them"
    assert seen.header(b"authorization") == []


@ensure
async def test_chunked_answer_is_dechunked_across_reads(serve, client):
    server = serve(in_pieces(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", b"lo\r\n",
                             b"6\r\n world\r\n0\r\n\r\n"))
    backend = server.backend()
    ffc = client()
    for _ in range(2):  # and the connection is reusable after a chunked answer
        response = await ffc.post(backend, BODY, JSON, 5.0)
        assert (response.code, response.body) == (200, b"hello world")
    assert len(server.connections) == 1


@pytest.mark.parametrize("head", [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"HTTP/1.0 200 OK\r\n\r\n"])
@ensure
async def test_close_delimited_answer(serve, client, head):
    def handler(conn: ServerConnection, seen: Seen) -> None:
        conn.transport.write(head + b"until ")
        reactor.callLater(0, lambda: (conn.transport.write(b"the end"), conn.transport.loseConnection()))

    server = serve(handler)
    ffc = client()
    for _ in range(2):  # the connection is not reused
        response = await ffc.post(server.backend(), BODY, JSON, 5.0)
        assert (response.code, response.body) == (200, b"until the end")
    assert len(server.connections) == 2


@ensure
async def test_interim_answers_are_skipped(serve, client):
    server = serve(in_pieces(b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
                             b"HTTP/1.1 201 Created\r\nX-Final: yes\r\nContent-Length: 4\r\n\r\ndone"))
    response = await client().post(server.backend(), BODY, JSON, 5.0)
    assert (response.code, response.body) == (201, b"done")
    assert response.headers == ((b"x-final", b"yes"),), "the interim answers' headers are not kept"


@ensure
async def test_basic_auth_is_sent_and_replaces_a_callers_authorization(serve, client):
    server = serve(answer(OK))
    headers = [(b"content-type", b"application/json"), (b"Authorization", b"Bearer caller")]
    await client().post(server.backend("/node/", "alice:s%40cret@"), BODY, headers, 5.0)
    seen = server.requests[0]
    assert seen.header(b"authorization") == [b"Basic " + base64.b64encode(b"alice:s@cret")]
    assert seen.path == b"/node/"


# ------------------------------------------------------------------------------- the pool


@ensure
async def test_keep_alive_reuses_one_connection(serve, client):
    server = serve(answer(OK))
    ffc, backend = client(), server.backend()
    for _ in range(5):
        assert (await ffc.post(backend, BODY, JSON, 5.0)).body == b"ok"
    assert len(server.connections) == 1 and len(server.requests) == 5


@ensure
async def test_connection_close_in_the_answer_is_honoured(serve, client):
    server = serve(lambda conn, seen: conn.transport.write(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"))
    ffc, backend = client(), server.backend()
    for _ in range(3):
        assert (await ffc.post(backend, BODY, JSON, 5.0)).body == b"ok"
    assert len(server.connections) == 3
    await server.closed(2)


@pytest.mark.parametrize("noticed", ["at_checkout_by_probe", "by_the_reactor"])
@ensure
async def test_node_closing_an_idle_connection_costs_nothing(serve, client, noticed):
    """Closed between requests: the next request goes, once, on a fresh connection."""
    server = serve(answer(OK))
    # probe_idle_after=0: the request below is sent in the very callback in which the server's
    # close completes, before the client's reactor can have read the FIN: only the probe sees it.
    ffc = client(probe_idle_after=0.0) if noticed == "at_checkout_by_probe" else client()
    backend = server.backend()
    await ffc.post(backend, BODY, JSON, 5.0)
    server.connections[0].transport.loseConnection()
    await server.closed(0)
    if noticed == "by_the_reactor":
        for _ in range(3):  # zero-delay turns: the client's reactor reads the FIN in between
            await task.deferLater(reactor, 0, lambda: None)
    response = await ffc.post(backend, BODY, JSON, 5.0)
    assert response.body == b"ok"
    assert len(server.connections) == 2
    assert [seen.connection for seen in server.requests] == [0, 1]


@ensure
async def test_reused_connection_closed_after_the_write_is_not_resent(serve, client):
    def handler(conn: ServerConnection, seen: Seen) -> None:
        if len(server.requests) == 1:
            conn.transport.write(OK)
        else:
            conn.transport.loseConnection()  # took the request, then hung up without a byte

    server = serve(handler)
    ffc, backend = client(), server.backend()
    await ffc.post(backend, BODY, JSON, 5.0)
    kind, message = await kind_of(ffc.post(backend, BODY, JSON, 5.0))
    assert kind == "transport" and "not re-sent" in message
    assert len(server.requests) == 2 and len(server.connections) == 1


@ensure
async def test_idle_connections_close_after_idle_timeout(serve, client):
    server = serve(answer(OK))
    ffc = client(idle_timeout=0.2)
    started = time.monotonic()
    await ffc.post(server.backend(), BODY, JSON, 5.0)
    await server.closed(0)
    assert 0.15 < time.monotonic() - started < 2.0


@ensure
async def test_close_closes_idle_connections(serve, client):
    server = serve(answer(OK))
    ffc = client()
    await ffc.post(server.backend(), BODY, JSON, 5.0)
    await ffc.close()
    await server.closed(0)


@ensure
async def test_max_connections_bounds_the_idle_ones(serve, client):
    server = serve(answer(OK))
    ffc, backend = client(max_connections=2), server.backend()
    await defer.gatherResults([ffc.post(backend, BODY, JSON, 5.0) for _ in range(4)])
    assert len(server.connections) == 4
    await server.events.wait(lambda: sum(conn.closed for conn in server.connections) == 2, what="2 surplus closed")


# ------------------------------------------------------------------------------- failures


@ensure
async def test_reset_mid_body_is_a_transport_error(serve, client):
    def handler(conn: ServerConnection, seen: Seen) -> None:
        conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        reactor.callLater(0, reactor.callLater, 0, conn.reset)  # after a reactor turn has sent those

    server = serve(handler)
    kind, message = await kind_of(client().post(server.backend(), BODY, JSON, 5.0))
    assert kind == "transport" and "mid-answer" in message


@ensure
async def test_chunked_answer_cut_by_a_close_is_a_transport_error(serve, client):
    def handler(conn: ServerConnection, seen: Seen) -> None:
        conn.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        conn.transport.loseConnection()

    server = serve(handler)
    assert (await kind_of(client().post(server.backend(), BODY, JSON, 5.0)))[0] == "transport"


@pytest.mark.parametrize("raw", [
    b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
], ids=["garbage", "invalid_chunked", "two_lengths", "upgrade"])
@ensure
async def test_unparseable_answers_are_transport_errors_and_close_the_socket(serve, client, raw):
    server = serve(answer(raw))
    kind, message = await kind_of(client().post(server.backend(), BODY, JSON, 5.0))
    assert kind == "transport" and "unreadable answer" in message
    await server.closed(0)


@ensure
async def test_a_second_answer_to_one_request_is_not_kept(serve, client):
    server = serve(answer(OK + OK))
    ffc, backend = client(), server.backend()
    assert (await ffc.post(backend, BODY, JSON, 5.0)).body == b"ok"
    assert (await ffc.post(backend, BODY, JSON, 5.0)).body == b"ok"
    assert len(server.connections) == 2


@ensure
async def test_slow_drip_past_the_deadline_times_out_and_closes(serve, client):
    def handler(conn: ServerConnection, seen: Seen) -> None:
        conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        drip = task.LoopingCall(lambda: conn.closed or conn.transport.write(b"x"))
        drip.start(0.02).addErrback(lambda _: None)
        original = conn.connectionLost
        conn.connectionLost = lambda reason=None: (drip.stop(), original(reason))

    server = serve(handler)
    started = time.monotonic()
    kind, message = await kind_of(client().post(server.backend(), BODY, JSON, 0.3))
    assert (kind, message) == ("timeout", "no answer within 0.3 s")
    assert 0.25 < time.monotonic() - started < 1.5
    await server.closed(0)


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("where", ["limit", "max_response_bytes"])
@ensure
async def test_oversized_answer_is_too_large_and_closes(serve, client, framing, where):
    if framing == "length":
        raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000
    else:
        raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        raw += (b"200\r\n" + b"x" * 512 + b"\r\n") * 10 + b"0\r\n\r\n"
    server = serve(in_pieces(raw[:700], raw[700:]))
    if where == "limit":
        attempt = client().post(server.backend(), BODY, JSON, 5.0, limit=1000)
    else:
        attempt = client(max_response_bytes=1000).post(server.backend(), BODY, JSON, 5.0)
    kind, message = await kind_of(attempt)
    assert kind == "too_large" and "1000" in message
    await server.closed(0)


@ensure
async def test_exactly_the_limit_is_fine(serve, client):
    server = serve(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000))
    assert len((await client().post(server.backend(), BODY, JSON, 5.0, limit=1000)).body) == 1000


@ensure
async def test_connection_refused_is_connect_and_fast(client):
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    started = time.monotonic()
    kind, message = await kind_of(client().post(Backend(f"http://127.0.0.1:{number}"), BODY, JSON, 5.0))
    assert kind == "connect" and "ConnectionRefusedError" in message
    assert time.monotonic() - started < 0.1


@ensure
async def test_a_node_given_by_name(serve, client):
    """Names go through HostnameEndpoint (resolution failures: test_connect_failures_are_connect)."""
    server = serve(answer(OK))
    backend = Backend(f"http://localhost:{server.port.getHost().port}/")
    assert (await client().post(backend, BODY, JSON, 5.0)).body == b"ok"
    assert server.requests[0].header(b"host") == [f"localhost:{server.port.getHost().port}".encode()]


@ensure
async def test_cancellation_closes_the_socket_and_raises_cancelled(serve, client):
    server = serve(lambda conn, seen: None)  # takes the request, never answers
    attempt = client().post(server.backend(), BODY, JSON, 5.0)
    await server.requested(1)
    attempt.cancel()
    with pytest.raises(defer.CancelledError):
        await attempt
    await server.closed(0)


@ensure
async def test_cancelling_the_awaiting_coroutine_cancels_the_exchange(serve, client):
    """How the forwarder cancels a hedge's loser: through ``Deferred.fromCoroutine``."""
    server = serve(lambda conn, seen: None)
    ffc = client()

    async def attempt() -> Any:
        return await ffc.post(server.backend(), BODY, JSON, 5.0)

    outer = defer.Deferred.fromCoroutine(attempt())
    await server.requested(1)
    outer.cancel()
    with pytest.raises(defer.CancelledError):
        await outer
    await server.closed(0)


@ensure
async def test_cancellation_while_connecting(serve, client):
    server = serve(answer(OK))
    ffc, backend = client(), server.backend()
    attempt = ffc.post(backend, BODY, JSON, 5.0)
    attempt.cancel()  # the TCP connect is still under way
    with pytest.raises(defer.CancelledError):
        await attempt
    assert (await ffc.post(backend, BODY, JSON, 5.0)).body == b"ok"
    assert len(server.requests) == 1


# ------------------------------------------------------------------------------- with doubles


class RecordingTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.no_delay: bool | None = None
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class DoubleEndpoint:
    """Connects at once to a :class:`RecordingTransport`."""

    def __init__(self) -> None:
        self.connected: list[tuple[RecordingTransport, Any]] = []

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        protocol, transport = factory.buildProtocol(None), RecordingTransport()
        protocol.makeConnection(transport)
        self.connected.append((transport, protocol))
        return defer.succeed(protocol)


def doubled(ffc: FastForwardingClient, backend: Backend) -> DoubleEndpoint:
    endpoint = DoubleEndpoint()
    ffc._node(backend.target).endpoint = endpoint  # the node's pool, created ahead, dials the double
    return endpoint


def test_each_request_is_one_write_with_tcp_nodelay():
    clock = task.Clock()
    ffc = FastForwardingClient(clock)
    backend = Backend("http://bob:pw@10.0.0.1:8080/p")
    endpoint = doubled(ffc, backend)
    body = b'{"x":' + b"1" * 5000 + b"}"
    for i in range(2):
        results: list[Any] = []
        ffc.post(backend, body, [(b"content-type", b"application/json")], 5.0).addBoth(results.append)
        [(transport, protocol)] = endpoint.connected  # the second request reuses the connection
        assert transport.no_delay is True
        assert len(transport.writes) == i + 1
        assert transport.writes[i] == (
            b"POST /p HTTP/1.1\r\nHost: 10.0.0.1:8080\r\ncontent-type: application/json\r\n"
            b"Authorization: Basic " + base64.b64encode(b"bob:pw") + b"\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body)
        protocol.dataReceived(OK)
        assert results[0].body == b"ok"
    # answered: besides the pool's idle sweep, the connection's one deadline timer, kept for its next request
    assert sorted(call.func.__name__ for call in clock.getDelayedCalls()) == ["_expire_if_due", "_sweep"]


def kept_alive() -> tuple[task.Clock, FastForwardingClient, Backend, DoubleEndpoint]:
    """A client whose idle connections are neither probed nor closed while a test runs (the double
    has no socket to probe)."""
    clock = task.Clock()
    ffc = FastForwardingClient(clock, idle_timeout=60.0, probe_idle_after=60.0)
    backend = Backend("http://10.0.0.1:8080")
    return clock, ffc, backend, doubled(ffc, backend)


def test_a_connection_moves_one_deadline_timer_from_request_to_request():
    """Each request's deadline counts from its own start; the timer is moved, not made anew, and
    coming due with nothing in flight it does nothing."""
    clock, ffc, backend, endpoint = kept_alive()
    first: list[Any] = []
    ffc.post(backend, BODY, JSON, 5.0).addBoth(first.append)
    [(transport, protocol)] = endpoint.connected
    timers = [call for call in clock.getDelayedCalls() if call.func.__name__ == "_expire_if_due"]
    clock.advance(1.0)
    protocol.dataReceived(OK)
    assert first[0].body == b"ok"
    clock.advance(3.0)  # t=4: the next request is due at 9, not at the first one's 5
    second: list[Any] = []
    ffc.post(backend, BODY, JSON, 5.0).addBoth(second.append)
    assert [call for call in clock.getDelayedCalls() if call.func.__name__ == "_expire_if_due"] == timers
    clock.advance(4.9)
    assert second == [] and not transport.aborted
    clock.advance(0.2)
    assert second[0].check(UpstreamError) and second[0].value.kind == "timeout" and transport.aborted
    assert not [call for call in clock.getDelayedCalls() if call.func.__name__ == "_expire_if_due"]


def test_a_deadline_coming_due_between_requests_does_nothing():
    clock, ffc, backend, endpoint = kept_alive()
    results: list[Any] = []
    ffc.post(backend, BODY, JSON, 2.0).addBoth(results.append)
    [(transport, protocol)] = endpoint.connected
    protocol.dataReceived(OK)
    clock.advance(2.5)  # the answered request's deadline passes while the connection is idle
    assert results[0].body == b"ok" and not transport.aborted
    again: list[Any] = []
    ffc.post(backend, BODY, JSON, 2.0).addBoth(again.append)  # same connection, a new timer
    assert len(endpoint.connected) == 1
    protocol.dataReceived(OK)
    assert again[0].body == b"ok" and not transport.aborted


def test_deadline_aborts_the_connection():
    clock = task.Clock()
    ffc = FastForwardingClient(clock)
    backend = Backend("http://10.0.0.1:8080")
    endpoint = doubled(ffc, backend)
    results: list[Any] = []
    ffc.post(backend, BODY, JSON, 2.5).addBoth(results.append)
    endpoint.connected[0][1].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    clock.advance(2.4)
    assert results == []
    clock.advance(0.2)
    assert results[0].check(UpstreamError) and results[0].value.kind == "timeout"
    assert str(results[0].value) == "no answer within 2.5 s"
    assert endpoint.connected[0][0].aborted


class PendingEndpoint:
    """A connect attempt that never completes by itself (a black-holed SYN), or fails as told."""

    def __init__(self, failure: Exception | None = None) -> None:
        self.failure = failure
        self.cancelled = False

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        if self.failure is not None:
            return defer.fail(self.failure)

        def cancel(attempt: defer.Deferred[Any]) -> None:
            self.cancelled = True
            attempt.errback(ConnectingCancelledError(None))

        return defer.Deferred(cancel)


def test_deadline_during_connect_cancels_the_attempt():
    clock = task.Clock()
    ffc = FastForwardingClient(clock)
    backend = Backend("http://10.0.0.1:8080")
    endpoint = PendingEndpoint()
    ffc._node(backend.target).endpoint = endpoint
    results: list[Any] = []
    ffc.post(backend, BODY, JSON, 1.0).addBoth(results.append)
    clock.advance(1.0)
    assert endpoint.cancelled and results[0].value.kind == "timeout"


@pytest.mark.parametrize("error", [ConnectTimeout("timeout", "connect timeout"), DNSLookupError("no such name"),
                                   NoRouteError()], ids=["connect_timeout", "dns", "unreachable"])
def test_connect_failures_are_connect(error):
    ffc = FastForwardingClient(task.Clock())
    backend = Backend("http://10.0.0.1:8080")
    ffc._node(backend.target).endpoint = PendingEndpoint(error)
    results: list[Any] = []
    ffc.post(backend, BODY, JSON, 1.0).addBoth(results.append)
    assert results[0].value.kind == "connect" and type(error).__name__ in str(results[0].value)


# ------------------------------------------------------------------------------- memory


def answered_in(protocol: Any, raw: bytes, piece: int = 7000) -> None:
    """Feed ``raw`` to the client's connection in pieces of ``piece`` bytes, as reads would."""
    for at in range(0, len(raw), piece):
        protocol.dataReceived(raw[at:at + piece])


def counting_client() -> tuple[task.Clock, AnswerMemory, FastForwardingClient, Backend, DoubleEndpoint]:
    clock = task.Clock()
    memory = AnswerMemory(1 << 30)
    ffc = FastForwardingClient(clock, memory=memory)
    backend = Backend("http://10.0.0.1:8080")
    return clock, memory, ffc, backend, doubled(ffc, backend)


def test_an_announced_answer_is_counted_whole_at_once_and_given_back_after_the_hand_over():
    _, memory, ffc, backend, endpoint = counting_client()
    body = bytes(range(256)) * (3 * PREALLOCATE_FROM // 256) + b"tail"
    handed: list[tuple[Any, int]] = []
    ffc.post(backend, BODY, JSON, 5.0).addCallback(lambda response: handed.append((response, memory.held)))
    _, protocol = endpoint.connected[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:1000])
    assert memory.held == len(body), "the whole announced length, before most of it has arrived"
    answered_in(protocol, body[1000:])
    [(response, held_while_handed)] = handed
    assert response.body == body and type(response.body) is bytes
    assert held_while_handed == len(body), "still counted while the request path writes the reply"
    assert memory.held == 0
    # the connection is reused, and the next big answer is received as well
    ffc.post(backend, BODY, JSON, 5.0).addCallback(lambda response: handed.append((response, memory.held)))
    answered_in(protocol, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[::-1], 65536)
    assert handed[1][0].body == body[::-1] and len(endpoint.connected) == 1 and memory.held == 0


def test_an_answer_of_unknown_length_is_counted_as_it_arrives():
    _, memory, ffc, backend, endpoint = counting_client()
    results: list[Any] = []
    ffc.post(backend, BODY, JSON, 5.0).addBoth(results.append)
    _, protocol = endpoint.connected[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(3):
        protocol.dataReceived(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
    assert memory.held == 3 * 0x10000
    protocol.dataReceived(b"0\r\n\r\n")
    assert results[0].body == b"x" * 0x30000 and memory.held == 0
    ffc.post(backend, BODY, JSON, 5.0).addBoth(results.append)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert results[1].body == b"ok" and memory.held == 0, "small answers are counted too, for a moment"


@pytest.mark.parametrize("ending", ["deadline", "cancel", "reset"])
def test_an_answer_that_never_completes_gives_its_bytes_back(ending):
    clock, memory, ffc, backend, endpoint = counting_client()
    results: list[Any] = []
    attempt = ffc.post(backend, BODY, JSON, 5.0)
    attempt.addErrback(results.append)
    transport, protocol = endpoint.connected[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 5000)
    assert memory.held == 1000000
    if ending == "deadline":
        clock.advance(5.0)
    elif ending == "cancel":
        attempt.cancel()
    else:
        protocol.connectionLost(Failure(ConnectionLost()))
    assert results and memory.held == 0


def test_an_announced_length_over_the_limit_is_refused_before_its_body():
    _, memory, ffc, backend, endpoint = counting_client()
    results: list[Any] = []
    ffc.post(backend, BODY, JSON, 5.0, limit=100000).addErrback(results.append)
    transport, protocol = endpoint.connected[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100001\r\n\r\n")
    assert results[0].value.kind == "too_large" and transport.aborted and memory.held == 0


def test_it_is_a_forwarding_client():
    assert verifyObject(IForwardingClient, FastForwardingClient(reactor))


def test_a_url_that_is_not_http_is_refused_clearly():
    ffc = FastForwardingClient(task.Clock())
    with pytest.raises(ValueError, match="not an http"):
        ffc.post(Backend("ftp://10.0.0.1/"), BODY, JSON, 1.0)


# ------------------------------------------------------------------------------- the simulated node


@pytest_twisted.async_yield_fixture
async def simnode():
    sim = SimulatedNode(SCENARIOS["pruned"], ChainParams(slots_per_epoch=8, committee_size=4, slot_seconds=600.0,
                                                         block_seconds=600.0), clock=reactor)
    port = reactor.listenTCP(0, simulated_site(sim), interface="127.0.0.1")
    yield Backend(f"http://127.0.0.1:{port.getHost().port}")
    await port.stopListening()


async def agent_post(agent: Any, backend: Backend, body: bytes, headers: Headers) -> tuple[int, Headers, bytes]:
    """What twisted's ``Agent`` brings back, undecoded: the reference."""
    response = await agent.request(b"POST", backend.target, headers, BytesProducer(body))
    return response.code, response.headers, await read_body(response)


@ensure
async def test_simulated_node_batch_and_gzip_byte_for_byte(simnode, client):
    reference = PooledAgent(reactor)
    ffc = client()
    batch = json.dumps([{"jsonrpc": "2.0", "id": i, "method": "node_getBlock", "params": [950 + i % 10]}
                        for i in range(12)]).encode()
    try:
        for accept in (b"identity", b"gzip"):
            pairs = [(b"content-type", b"application/json"), (b"accept-encoding", accept)]
            fast = await ffc.post(simnode, batch, pairs, 5.0)
            code, headers, body = await agent_post(reference.agent, simnode, batch, Headers(
                {name: [value] for name, value in pairs}))
            assert fast.code == code == 200
            assert fast.body == body  # byte for byte what twisted's Agent brings back
            # the same headers as twisted's parser keeps, names lower-cased, values as sent
            assert sorted(pair for pair in fast.headers if pair[0] != b"date") == sorted(
                (name.lower(), value) for name, values in headers.getAllRawHeaders() if name != b"Date"
                for value in values)
            document = json.loads(gzip.decompress(fast.body) if accept == b"gzip" else fast.body)
            assert [item["id"] for item in document] == list(range(12))
            if accept == b"gzip":
                assert (b"content-encoding", b"gzip") in fast.headers
                assert fast.body[:2] == b"\x1f\x8b"
    finally:
        await reference.close()


# ------------------------------------------------------------------------------- https


def _self_signed() -> tuple[bytes, bytes]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


@pytest_twisted.async_yield_fixture
async def tls_server():
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from OpenSSL import SSL
    from twisted.internet import ssl
    from twisted.internet.interfaces import IOpenSSLContextFactory
    from zope.interface import implementer

    cert_pem, key_pem = _self_signed()

    @implementer(IOpenSSLContextFactory)
    class ServerContext:  # pyOpenSSL with cryptography objects: no deprecated X509/PKey wrappers
        def getContext(self) -> SSL.Context:
            context = SSL.Context(SSL.TLS_SERVER_METHOD)
            context.use_certificate(x509.load_pem_x509_certificate(cert_pem))
            context.use_privatekey(load_pem_private_key(key_pem, None))
            return context

    server = RawServer(answer(OK), lambda factory: reactor.listenSSL(0, factory, ServerContext(),
                                                                       interface="127.0.0.1"))
    yield server, ssl.Certificate.loadPEM(cert_pem)
    await server.stop()


@ensure
async def test_https_node(tls_server, client):
    server, authority = tls_server
    ffc = client(trust_root=authority)
    backend = Backend(f"https://127.0.0.1:{server.port.getHost().port}/")
    for _ in range(3):
        assert (await ffc.post(backend, BODY, JSON, 5.0)).body == b"ok"
    assert len(server.connections) == 1 and len(server.requests) == 3


@ensure
async def test_https_node_with_an_untrusted_certificate_is_connect(tls_server, client):
    server, _ = tls_server
    backend = Backend(f"https://127.0.0.1:{server.port.getHost().port}/")
    kind, message = await kind_of(client().post(backend, BODY, JSON, 5.0))
    assert kind == "connect" and "TLS" in message
    assert server.requests == []
