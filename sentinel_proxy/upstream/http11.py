"""A forwarding HTTP/1.1 client built for one job: POST a body to a node, bring its answer back untouched.

Why not twisted.web's ``Agent`` (which the gateway used before; the checks still do): profiled
at ~400 µs CPU per gateway request, ``Agent.request`` took ~26 % and parsing the node's answer
(``HTTPClientParser``, line by line in Python, one Deferred chain per stage) ~20 %. A bare
pass-through built from raw Twisted protocols with an httptools parser measured 38 µs per request
in total. This client is that pass-through: the request is one prepared bytes object and one
``transport.write``; the answer is parsed by llhttp (httptools) in C, whose callbacks only collect
slices; the caller's Deferred is fired directly from ``dataReceived``. Per request it creates the
Deferred, the timeout's DelayedCall, the request bytes and the answer (its header pairs and body):
nothing else. All per-request state lives on the connection's protocol (one request at a time).

Memory: every answer's bytes are counted in an :class:`~sentinel_proxy.upstream.memory.AnswerMemory`
from the moment they are known until the answer has been handed over (admission reads the count),
and a body whose length the node announces is received into one buffer of that size, never joined
from pieces (sentinel_proxy/upstream/memory.py says why).
"""
from __future__ import annotations

from typing import Any, Sequence

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from sentinel_proxy.twisted_private import write_now
from sentinel_proxy.interfaces import IForwardingClient
from sentinel_proxy.state.backends import Backend
from sentinel_proxy.upstream.memory import PREALLOCATE_FROM, AnswerMemory, fill, finished, new_body
from sentinel_proxy.upstream.pool import NodePool
from sentinel_proxy.upstream.response import LocalError, UpstreamError, UpstreamResponse, local_error

#: Bound on an answer's status line and headers (llhttp itself sets none): a node streaming
#: headers forever must not grow memory until the deadline.
MAX_HEAD_BYTES = 1 << 20

#: Kept out of the answer's headers, as twisted's ``HTTPClientParser`` does: they describe the
#: connection to the node, not the answer (and the request path drops them anyway).
CONNECTION_CONTROL_HEADERS = frozenset({b"content-length", b"connection", b"keep-alive", b"te", b"trailers",
                                        b"transfer-encoding", b"upgrade", b"proxy-connection"})


class _Stop(Exception):
    """Raised in a parser callback to make llhttp stop at once (the rest of the data is moot)."""


@implementer(IHandshakeListener)
class _Connection(Protocol):
    """One TCP (or TLS) connection to a node and the state of the one request it carries.

    ``pooled``, ``idle_since`` and ``when_lost`` are the pool's; the rest is private.
    """

    __slots__ = ("_node", "_memory", "_clock", "_parser", "_deferred", "_request", "_limit", "_timer", "_timeout", "_connecting",
                 "_reused", "_ready", "_answered", "_head", "_head_done", "_framed", "_length", "_headers",
                 "_chunks", "_body", "_address", "_size", "_counted", "_response", "_keep", "_gone", "pooled",
                 "idle_since")

    def __init__(self, node: NodePool, memory: AnswerMemory, clock: IReactorTime):
        self._node = node
        self._memory = memory
        self._clock = clock
        self._counted = 0  # bytes of the current answer counted in ``memory``
        self._body: Any = None
        self._parser = HttpResponseParser(self)
        self._deferred: defer.Deferred[UpstreamResponse] | None = None
        self._request: bytes | None = None
        self._connecting: defer.Deferred[Any] | None = None
        #: The deadline of the request in flight: one DelayedCall per connection, moved (``reset``)
        #: for each request rather than made and cancelled, and left to fire idle (it does nothing
        #: then). Made and cancelled per request it cost ~4 µs live (docs/performance.md).
        self._timer: Any = None
        self._timeout = 0.0
        self._ready = False  # TCP connected (and TLS handshake done): the request can reach the node
        self._gone: defer.Deferred[None] | None = None
        self._response: UpstreamResponse | None = None
        self.pooled = False
        self.idle_since = 0.0

    # ------------------------------------------------------------------------------ the request

    def _begin(self, deferred: defer.Deferred[UpstreamResponse], limit: int, timeout: float, reused: bool) -> None:
        self._deferred = deferred
        self._limit = limit
        self._timeout = timeout
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(timeout)  # usually later than before: then no heap work until the old time comes
        else:
            self._timer = self._clock.callLater(timeout, self._expire_if_due)
        self._reused = reused
        self._answered = False
        self._head = 0
        self._head_done = False
        self._framed = False
        self._length = -1
        self._body = None
        self._counted = 0
        self._response = None
        self._keep = False

    def send(self, deferred: defer.Deferred[UpstreamResponse], request: bytes, limit: int, timeout: float) -> None:
        """Write ``request`` on this (checked out, live) connection; its answer is due in ``timeout`` s."""
        self._begin(deferred, limit, timeout, True)
        write_now(self.transport, request)

    def dial(self, deferred: defer.Deferred[UpstreamResponse], request: bytes, limit: int, timeout: float) -> None:
        """Connect, then write ``request`` from ``connectionMade``; the answer is due in ``timeout`` s."""
        self._begin(deferred, limit, timeout, False)
        self._request = request
        connecting = self._node.endpoint.connect(_Dial(self))
        if self.transport is None:  # not connected synchronously (a test double may)
            self._connecting = connecting
        connecting.addCallbacks(_ignore, self._connect_failed)

    def cancel(self, deferred: defer.Deferred[UpstreamResponse]) -> None:
        """A lost hedge race: close the socket; the caller sees CancelledError, not a node failure."""
        if deferred is self._deferred:
            self._fail(defer.CancelledError())

    def _expire_if_due(self) -> None:
        """The deadline of the request in flight passed; idle, nothing was due (the connection's
        next request makes a new timer)."""
        if self._deferred is not None:
            self._fail(UpstreamError("timeout", f"no answer within {self._timeout:g} s"))

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _fail(self, error: Exception) -> None:
        """Give up on the request: fire ``error`` and abort the connection (or the connect attempt)."""
        deferred = self._deferred
        if deferred is None:
            return
        self._deferred = None
        self._request = None
        self._stop_timer()  # the connection goes with the request
        connecting = self._connecting
        if connecting is not None:
            self._connecting = None
            connecting.cancel()
        elif self.transport is not None:
            self.transport.abortConnection()
        counted, self._counted = self._counted, 0
        self._body = self._chunks = None
        deferred.errback(error)
        if counted:
            self._memory.give_back(counted)

    def _end(self, outcome: UpstreamResponse | UpstreamError | LocalError) -> None:
        """Fire the caller's Deferred with the outcome; the connection is already dealt with.

        The answer's bytes stay counted until the hand-over returns: the request path writes the
        reply to the caller within it. (The connection may carry a new request by then: its
        count was taken first.)
        """
        deferred = self._deferred
        self._deferred = None  # the timer stays, for the connection's next request
        counted, self._counted = self._counted, 0
        self._body = self._chunks = None
        if type(outcome) is UpstreamResponse:
            deferred.callback(outcome)
        else:
            deferred.errback(outcome)
        if counted:
            self._memory.give_back(counted)

    def _connect_failed(self, reason: Failure) -> None:
        self._connecting = None
        self._stop_timer()  # no connection, so no connectionLost to stop it
        if self._deferred is not None:  # else we cancelled it ourselves: the caller has its answer
            self._request = None
            self._end(local_error(reason.value) or UpstreamError("connect", f"cannot connect: {reason.type.__name__}"))

    # ---------------------------------------------------------------------------- the transport

    def connectionMade(self) -> None:
        """TCP_NODELAY first (the request is one write; Nagle would only hold back its tail)."""
        self._connecting = None
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        if not self._node.tls:
            self._ready = True
        request, self._request = self._request, None
        if self._deferred is None or request is None:
            self.transport.loseConnection()
        else:
            self.transport.write(request)  # before a TLS handshake: held by TLS until it completes

    def handshakeCompleted(self) -> None:
        self._ready = True

    def dataReceived(self, data: bytes) -> None:
        if self._deferred is None:  # bytes nobody asked for (idle), or after we gave up: never reuse
            self.transport.abortConnection()
            return
        self._answered = True
        if not self._head_done:
            self._head += len(data)
            if self._head > MAX_HEAD_BYTES:
                self._fail(UpstreamError("transport", f"answer headers exceed {MAX_HEAD_BYTES} bytes"))
                return
        try:
            self._parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as exc:
            if self._response is None:
                if self._deferred is not None:  # else a callback gave up already (too large)
                    self._fail(UpstreamError("transport", f"unreadable answer: {exc}"))
                return
            self._keep = False  # a complete answer followed by junk: deliver it, drop the connection
        if self._response is not None:
            response, self._response = self._response, None
            if self._keep:
                self._node.checkin(self)  # first, so the caller's next request can take it
            else:
                self.transport.loseConnection()
            self._end(response)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        if self.pooled:
            self._node.lost(self)
        if self._gone is not None:
            self._gone.callback(None)
            self._gone = None
        if self._deferred is None:
            return
        if self._head_done and not self._framed and reason.check(ConnectionDone):
            # No Content-Length, not chunked: the answer is whatever came before the close.
            self._end(UpstreamResponse(self._parser.get_status_code(), tuple(self._headers), b"".join(self._chunks)))
        elif not self._ready:
            self._end(UpstreamError("connect", f"cannot connect: TLS handshake failed ({reason.type.__name__})"))
        elif self._answered:
            self._end(UpstreamError("transport", f"connection lost mid-answer: {reason.type.__name__}"))
        elif self._reused:
            self._end(UpstreamError("transport", "the node closed a reused connection after the request was "
                                                 f"written, without answering ({reason.type.__name__}); not "
                                                 "re-sent: the node may have received it"))
        else:
            self._end(UpstreamError("transport", f"connection closed without an answer: {reason.type.__name__}"))

    def when_lost(self) -> defer.Deferred[None]:
        self._gone = defer.Deferred()
        return self._gone

    # ------------------------------------------------------------------ httptools parser callbacks

    def on_message_begin(self) -> None:
        if self._response is not None:  # a second answer to one request: stop, never reuse
            self._keep = False
            raise _Stop()
        self._headers: list[tuple[bytes, bytes]] = []
        self._chunks: list[bytes] | None = []
        self._size = 0
        self._framed = False
        self._length = -1

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered not in CONNECTION_CONTROL_HEADERS:
            self._headers.append((lowered, value))
        elif lowered == b"content-length":
            self._framed = True
            self._length = int(value)  # llhttp has checked the digits (and refuses a second one)
        elif lowered == b"transfer-encoding" and b"chunked" in value.lower():
            self._framed = True

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            return
        self._head_done = True
        length = self._length
        if length > self._limit:  # refused before a byte of it is read
            self._fail(UpstreamError("too_large", f"answer exceeds {self._limit} bytes"))
            raise _Stop()
        if length > PREALLOCATE_FROM and status != 204 and status != 304:
            self._body, self._address = new_body(length)
            self._limit = length  # llhttp delivers no more than that; the bound makes sure
            self._memory.take(length)
            self._counted += length

    def on_body(self, body: bytes) -> None:
        offset = self._size
        size = self._size = offset + len(body)
        if size > self._limit:
            self._fail(UpstreamError("too_large", f"answer exceeds {self._limit} bytes"))
            raise _Stop()
        if self._body is not None:
            fill(self._body, self._address, offset, body)
        else:
            self._chunks.append(body)
            self._memory.take(len(body))
            self._counted += len(body)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # 100 Continue, 103 Early Hints: the real answer follows
            return
        if self._body is not None:
            body, self._body = finished(self._body, self._size), None
        else:
            body = b"".join(self._chunks)
        self._chunks = None
        self._response = UpstreamResponse(status, tuple(self._headers), body)
        self._keep = self._parser.should_keep_alive()


class _Dial(Factory):
    """Hands the endpoint the protocol built before dialling (it already holds the request)."""

    noisy = False  # else every connection logs "Starting factory"

    def __init__(self, conn: _Connection):
        self._conn = conn

    def buildProtocol(self, addr: Any) -> _Connection:
        return self._conn


def _ignore(_: object) -> None:
    return None


@implementer(IForwardingClient)
class FastForwardingClient:
    """The gateway's forwarding client (``UPSTREAM_CLIENT=fast``, the default).

    ``post`` returns a plain Deferred, not a coroutine: awaiting it costs the caller the same, and
    no coroutine driver runs in between. Cancelling it aborts the socket and fails it with
    ``CancelledError``. ``memory`` counts the answers' bytes (the request path's admission reads
    it; default: a count of its own, without a cap). ``trust_root`` is for https nodes with a
    private CA (default: the platform's); ``probe_idle_after`` see :meth:`NodePool.checkout`.
    """

    __slots__ = ("_reactor", "_nodes", "_max_idle", "_idle_timeout", "_connect_timeout", "_max_response",
                 "_probe_after", "_trust_root", "memory")

    def __init__(self, reactor: IReactorTime, max_connections: int = 128, idle_timeout: float = 4.0,
                 connect_timeout: float = 2.0, max_response_bytes: int = 1 << 25, *, trust_root: Any = None,
                 probe_idle_after: float = 0.5, memory: AnswerMemory | None = None):
        self._reactor = reactor
        self.memory = memory if memory is not None else AnswerMemory(1 << 62)
        self._nodes: dict[bytes, NodePool] = {}
        self._max_idle = max_connections
        self._idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._max_response = max_response_bytes
        self._probe_after = probe_idle_after
        self._trust_root = trust_root

    def _node(self, target: bytes) -> NodePool:
        node = self._nodes[target] = NodePool(self._reactor, target, self._max_idle, self._idle_timeout,
                                              self._connect_timeout, self._probe_after, self._trust_root)
        return node

    def post(self, backend: Backend, body: bytes, headers: Sequence[tuple[bytes, bytes]], timeout: float,
             limit: int | None = None) -> defer.Deferred[UpstreamResponse]:
        """POST ``body`` with ``headers`` ((name, value) pairs) to the node; the whole exchange is
        bounded by ``timeout``, the answer's body by ``limit`` bytes (default ``max_response_bytes``)."""
        node = self._nodes.get(backend.target) or self._node(backend.target)
        request = node.request(body, headers, backend.authorization)
        if limit is None:
            limit = self._max_response
        conn = node.checkout()
        if conn is None:
            conn = _Connection(node, self.memory, self._reactor)
            deferred: defer.Deferred[UpstreamResponse] = defer.Deferred(conn.cancel)
            conn.dial(deferred, request, limit, timeout)
        else:
            deferred = defer.Deferred(conn.cancel)
            conn.send(deferred, request, limit, timeout)
        return deferred

    def close(self) -> defer.Deferred[None]:
        """Close idle connections; fires once they are all gone. Later answers close theirs."""
        gone: list[defer.Deferred[None]] = []
        for node in self._nodes.values():
            gone += node.close()
        return defer.gatherResults(gone).addCallback(_ignore)
