"""The HTTP/1.1 server side of the RPC routes, with the least machinery: one protocol, llhttp.

Why not twisted.web for ``POST /``, ``/archiver`` and ``/pruned``: forwarding cost ~420 µs CPU
per request (the Go prototype: 111), and twisted.web's ``Request`` alone ~130 µs: line-by-line
parsing in Python, a ``Headers`` object each way, a Deferred chain per stage, ``Request.finish``
bookkeeping. A bare pass-through on raw Twisted protocols parsed by httptools measured 38 µs in
total. This server is that shape: llhttp (httptools) parses in C and its callbacks only collect
slices, the request path gets plain values (a lower-cased headers dict, the body bytes), and the
answer goes out as one ``transport.write`` of one bytes join, its status line precomputed. Per
request it makes the headers dict, the ``Caller``, one small exchange record and the one
Deferred that drives the request path's coroutine: nothing else. Measured with a trivial request
path (bench/server_cpu.py, 64 keep-alive connections): ~27 µs of server-process CPU per request,
reactor and syscalls included, against ~95 µs for twisted.web's Site + RpcResource; the Python
here, parse to answer bytes, is ~9 µs of it.

Everything else (``/health``, ``/metrics``, the dashboard, ``/admin``, preflights, any other
method or path) is handed, on the same connection, to the twisted.web ``Site``
(:mod:`sentinel_proxy.web.handoff`), which keeps it for the rest of the connection's life.

Order and bounds: pipelined requests are served concurrently and answered in arrival order;
bodies are bounded by MAX_BODY_BYTES while they arrive (a declared length over it gets the 413
without its body being read), heads by ``MAX_HEAD_BYTES`` and ``MAX_HEADERS`` (431, web/reading.py);
llhttp's strict defaults refuse request smuggling (Content-Length with Transfer-Encoding,
duplicate lengths, bad chunks: 400 and close). Reading stops while a caller does not read its
answers (the protocol is its transport's producer) or has :data:`MAX_PIPELINE` requests waiting.

Slow callers: a request's line and headers must arrive within CLIENT_HEADER_TIMEOUT_MS of its first
byte, its body within CLIENT_BODY_TIMEOUT_MS of the end of its headers (else 408 and a close),
whatever the pace of its bytes; connections are capped in total and per client address
(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CLIENT): past a cap a new connection is closed at once. All
of it rides on the one timer each connection already has, re-armed lazily in ``_tick``.

The drain (``Connections.drain``, web/handoff.py): from its start every answer says
``Connection: close`` (the last one owed, so pipelined requests already read are answered first),
and a connection with nothing owed and nothing arriving is closed after :data:`DRAIN_WINDOW`.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping

from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IPushProducer, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sentinel_proxy.twisted_private import write_now
from sentinel_proxy.ops.logs import observer
from sentinel_proxy.proxy.values import Caller, Reply
from sentinel_proxy.web.auth import Access, peer_address
from sentinel_proxy.web.handoff import DRAIN_WINDOW, Connections, Handoff
from sentinel_proxy.web.reading import DISCARD, MAX_HEAD_BYTES, RAW, REBUILD, RequestReader
from sentinel_proxy.web.wire import CLOSE, CONTINUE, LINGER_CLOSE, Dates, encode, plain

log = Logger(observer=observer)

#: Answers a connection may owe before it stops reading (pipelining is served concurrently).
MAX_PIPELINE = 32
#: How long a connection closed after an error still reads (and drops) what the caller sends,
#: so that its unread data does not make the kernel reset the connection over the answer.
LINGER = 2.0

#: What the request path offers the web layer (``RequestPath.handle``).
Handle = Callable[[str, bytes, Mapping[bytes, bytes], bool, Caller], Awaitable[Reply]]

# Why reading is paused (bits).
_WRITES, _QUEUE, _BUFFER = 1, 2, 4

#: How often refused connections are logged at most, in seconds (a flood must not flood the log).
REFUSAL_LOG_INTERVAL = 1.0


@dataclass(frozen=True)
class ClientLimits:
    """What a caller's connection may take: the deadlines of a request's head and body, in seconds,
    and the connections held at once, in total and per client address (all reloadable)."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 4096
    max_per_client: int = 256


class _Exchange:
    """One request's place in the answer order."""

    __slots__ = ("answer", "close", "deferred", "reply")

    #: KEEP (or KEEP_SAID: an HTTP/1.0 keep-alive, which the answer must confirm), CLOSE after the
    #: answer, or LINGER_CLOSE (an error: see ``LeanHTTP._end``).
    close: int

    def __init__(self, close: int, answer: bytes | None = None):
        self.answer = answer
        self.close = close
        self.deferred: defer.Deferred[None] | None = None
        #: While draining, the reply is kept and encoded when it goes out: only then is it known
        #: whether it is the last one owed (which says ``Connection: close``).
        self.reply: Reply | None = None


@implementer(IPushProducer)
class LeanHTTP(RequestReader):
    """One caller's connection: the order of its answers, their writing, the handoff, its timers.
    What llhttp says about each request is collected by :class:`RequestReader`."""

    __slots__ = ("_factory", "_handle", "_caller", "_peer", "_queue", "_handoff", "_timer", "_paused", "_lost",
                 "_ended", "_producing")

    def __init__(self, factory: LeanServerFactory, peer: str):
        super().__init__(factory.max_body, factory.clock)
        self._factory = factory
        self._peer = peer
        self._handle = factory.handle
        self._caller = factory.caller
        self._queue: deque[_Exchange] = deque()
        self._handoff: Handoff | None = None
        self._timer: Any = None
        self._paused = 0
        self._lost = self._ended = self._producing = False

    # ------------------------------------------------------------------------- the connection

    def connectionMade(self) -> None:
        """Nagle off (an answer is one small write), tracked for the drain, the idle clock started."""
        transport = self.transport
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
        transport.registerProducer(self, True)  # told when the caller stops reading its answers
        self._producing = True
        factory = self._factory
        factory.connections.protocols.add(self)
        self._idle_since = self._clock.seconds()
        wait = DRAIN_WINDOW if factory.connections.draining else factory.tick
        self._timer = self._clock.callLater(wait, self._tick)

    def dataReceived(self, data: bytes) -> None:
        mode = self._mode
        if mode == RAW:
            self._handoff.feed(data)
            if self._handoff.waiting > MAX_HEAD_BYTES:
                self._pause(_BUFFER)
            return
        if mode == DISCARD:
            return
        self._read(data)
        if len(self._queue) >= MAX_PIPELINE:
            self._pause(_QUEUE)
        handoff = self._handoff
        if handoff is not None and not self._queue and handoff.channel is None:
            self._hand_off()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Cancel what is still in flight (its upstream calls too); relay to a handed-off channel."""
        self._lost = True
        self._factory.release(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for exchange in self._queue:
            if exchange.deferred is not None and exchange.answer is None:
                exchange.deferred.cancel()
        self._queue.clear()
        if self._handoff is not None:
            self._handoff.lost(reason)

    # IPushProducer: the transport pauses us while its write buffer is full.
    def pauseProducing(self) -> None:
        self._pause(_WRITES)

    def resumeProducing(self) -> None:
        self._resume(_WRITES)

    def stopProducing(self) -> None:
        """The connection is going: connectionLost does the rest."""

    def _pause(self, reason: int) -> None:
        if not self._paused and not self._lost:
            self.transport.pauseProducing()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and not self._lost:
                self.transport.resumeProducing()

    # ----------------------------------------------------------------------- serving a request

    def _dispatch(self, route: str, body: bytes, headers: dict[bytes, bytes], query: bytes, too_large: bool,
                  close: int) -> None:
        exchange = _Exchange(close)
        self._queue.append(exchange)
        caller = self._caller(self._peer, headers, query)
        exchange.deferred = defer.Deferred.fromCoroutine(
            self._serve(exchange, route, body, headers, too_large, caller))

    async def _serve(self, exchange: _Exchange, route: str, body: bytes, headers: dict[bytes, bytes],
                     too_large: bool, caller: Caller) -> None:
        """The request path, then the answer in its place; never fails (nothing unhandled to log)."""
        try:
            reply = await self._handle(route, body, headers, too_large, caller)
            now = self._clock.seconds()
            if self._factory.connections.draining:
                exchange.reply = reply
                answer = b""  # encoded in _flush
            else:
                answer = encode(reply, exchange.close, self._factory.dates.line(now))
        except defer.CancelledError:
            if self._lost:  # the caller left: its upstream call was cancelled with it
                return
            log.failure("request on {route} was cancelled under the web layer", route=route)
            now = self._clock.seconds()
            answer = plain(500, b"internal error\n", self._factory.dates.line(now), exchange.close)
        except Exception:
            log.failure("request on {route} failed in the web layer", route=route)
            now = self._clock.seconds()
            answer = plain(500, b"internal error\n", self._factory.dates.line(now), exchange.close)
        if self._lost:
            return
        exchange.answer = answer
        if self._queue and self._queue[0] is exchange:
            self._flush(now)

    def _flush(self, now: float) -> None:
        """Write the answers that are ready, in order, each as one write."""
        queue = self._queue
        transport = self.transport
        draining = self._factory.connections.draining
        while queue:
            exchange = queue[0]
            answer = exchange.answer
            if answer is None:
                return
            queue.popleft()
            if exchange.reply is not None:
                answer = self._last_says_close(exchange, now)
            write_now(transport, answer)
            if exchange.close > 0:
                # While draining, what the caller sent after the last answer is read and dropped
                # for a while (no reset over that answer), as after an error.
                self._end(exchange.close == LINGER_CLOSE or draining)
                return
        self._idle_since = now
        if self._paused or self._expect or self._handoff is not None:
            self._idle()

    def _last_says_close(self, exchange: _Exchange, now: float) -> bytes:
        """A reply kept while draining, as it goes out: ``Connection: close`` on the last one owed,
        unless a next request is already arriving (it is served, and its answer closes)."""
        if exchange.close <= 0 and not self._queue and not self._in_message:
            exchange.close = CLOSE
        return encode(exchange.reply, exchange.close, self._factory.dates.line(now))

    def _idle(self) -> None:
        """Nothing owed any more: what waited for that."""
        self._resume(_QUEUE)
        if self._expect and self._handoff is None:
            self._expect = False
            self.transport.write(CONTINUE)
        if self._handoff is not None and self._handoff.channel is None:
            self._hand_off()

    def _expect_continue(self, expect: bytes) -> None:
        """``Expect: 100-continue`` (HTTP/1.1): the 100 goes out once every earlier answer has, and
        never before a handed-off answer (the caller then sends its body after its own timeout)."""
        if expect.strip().lower() != b"100-continue" or self._parser.get_http_version() != "1.1":
            return
        if self._queue or self._handoff is not None:
            self._expect = self._handoff is None
        else:
            self.transport.write(CONTINUE)

    def _refuse(self, status: int, text: bytes) -> None:
        """An error that ends the connection, answered in its turn. Once a handoff has begun the
        Site answers in order instead: it is given a request line it refuses (400) and closes."""
        if self._mode == DISCARD:  # already refused or closing
            return
        if self._handoff is not None:
            self._handoff.feed(b"INVALID\r\n\r\n")
        else:
            now = self._clock.seconds()
            self._queue.append(_Exchange(LINGER_CLOSE, plain(status, text, self._factory.dates.line(now))))
            if len(self._queue) == 1:
                self._flush(now)
        self._mode = DISCARD

    def _end(self, linger: bool) -> None:
        """Close after what was written. With ``linger`` only our side closes at first: what the
        caller still sends is read and dropped for up to LINGER seconds, so its unread data cannot
        make the kernel reset the connection before the answer is read."""
        if self._ended or self._lost:
            return
        self._ended = True
        self._mode = DISCARD
        transport = self.transport
        if self._producing:
            self._producing = False
            transport.unregisterProducer()  # a paused producer would hold loseConnection back
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        half_close = getattr(transport, "loseWriteConnection", None) if linger else None
        if half_close is not None:  # TCP (and TLS over it)
            self._paused = 0
            transport.resumeProducing()
            half_close()
            self._timer = self._clock.callLater(LINGER, self._tick)
        else:
            transport.loseConnection()
            # A caller that reads nothing would hold the flush (and the socket) forever.
            self._timer = self._clock.callLater(self._factory.idle_timeout, self._tick)

    def _tick(self) -> None:
        """The connection's one timer, re-armed lazily (no reset per request): it wakes at least
        every ``factory.tick`` seconds (the shortest of the idle timeout and the deadlines), so a
        request begun since the last wake-up is held to its deadline to the moment from the next."""
        self._timer = None
        if self._lost or self._handoff is not None and self._handoff.channel is not None:
            return  # the Site's channel rules a handed-off connection (web/site.py)
        if self._ended:  # the linger is over, or the caller never read the last answer
            self.transport.abortConnection()
            return
        factory = self._factory
        now = self._clock.seconds()
        wait = DRAIN_WINDOW if factory.connections.draining else factory.tick
        if self._in_message and self._mode <= REBUILD:
            limits = factory.limits
            if self._in_head:
                left = self._idle_since + limits.header_timeout - now
            else:
                left = self._body_since + limits.body_timeout - now
            if left <= 0:
                self._timed_out("header" if self._in_head else "body")
                return
            wait = min(wait, left)
        elif not self._queue:
            timeout = DRAIN_WINDOW if factory.connections.draining else factory.idle_timeout
            left = self._idle_since + timeout - now
            if left <= 0:
                self._end(factory.connections.draining)
                return
            wait = min(wait, left)
        self._timer = self._clock.callLater(wait, self._tick)

    def _timed_out(self, phase: str) -> None:
        """A request's head or body is late: 408 in its turn, and the connection ends."""
        self._factory.timed_out(phase)
        self._refuse(408, b"request timed out\n")
        if not self._ended:  # the 408 waits behind answers still owed: keep a clock on them
            self._timer = self._clock.callLater(self._factory.idle_timeout, self._tick)

    def drain(self) -> None:
        """The drain began: whatever this connection was waiting for, look again within
        :data:`DRAIN_WINDOW` (an idle connection closes then, unless a request came meanwhile)."""
        if self._lost or self._ended or self._handoff is not None and self._handoff.channel is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._clock.callLater(DRAIN_WINDOW, self._tick)

    def close(self) -> None:
        """The drain's last step (it has waited for the requests in flight, up to its grace): close
        after what was written. A request still in flight now is given up (cancelled)."""
        if self._lost:
            return
        if self._handoff is not None and self._handoff.channel is not None:
            self._handoff.channel.loseConnection()
        else:
            self._end(False)

    # ------------------------------------------------------------------------------- handoff

    def _to_site(self, message: bytes) -> None:
        if self._handoff is None:
            self._handoff = Handoff(self._factory.site)
        self._handoff.feed(message)

    def _hand_off(self) -> None:
        """Every lean answer is written: the Site's channel takes the connection from here."""
        if self._lost or self._ended:
            return
        transport = self.transport
        if self._producing:
            self._producing = False
            transport.unregisterProducer()  # the channel registers itself
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._paused:
            self._paused = 0
            transport.resumeProducing()
        self._handoff.start(transport)


class LeanServerFactory(Factory):
    """What the listener serves: :class:`LeanHTTP` connections, the ``site`` behind them; the
    connection caps, kept as counts per client address."""

    noisy = False

    def __init__(self, handler: Any, access: Access, site: Any, clock: IReactorTime, max_body: int,
                 idle_timeout: float = 60.0, limits: ClientLimits = ClientLimits(), metrics: Any = None):
        self.handle: Handle = handler.handle
        self.caller = access.caller_from
        self.site = site
        self.clock = clock
        self.max_body = max_body
        self.idle_timeout = idle_timeout
        self.metrics = metrics
        self.dates = Dates()
        self.connections = Connections(getattr(site, "connections", None))
        #: Connections held per client address (``peer_address``).
        self.clients: dict[str, int] = {}
        self._refused = 0
        self._refusal_logged = float("-inf")
        self.configure(limits)

    def configure(self, limits: ClientLimits) -> None:
        """New limits (a reload): deadlines apply to the next tick of every connection, caps to
        the next connection; the Site's handed-off requests get the same deadlines."""
        self.limits = limits
        #: The longest a connection's timer sleeps (see ``LeanHTTP._tick``).
        self.tick = min(self.idle_timeout, limits.header_timeout, limits.body_timeout)
        self.site.configure(limits.header_timeout + limits.body_timeout)

    def buildProtocol(self, addr: IAddress) -> LeanHTTP | None:
        """A new connection, or None past a cap: the port then closes the socket at once."""
        peer = peer_address(getattr(addr, "host", None))
        held = self.clients.get(peer, 0)
        if len(self.connections.protocols) >= self.limits.max_connections:
            self._refuse("total", peer)
            return None
        if held >= self.limits.max_per_client:
            self._refuse("per_client", peer)
            return None
        self.clients[peer] = held + 1
        return LeanHTTP(self, peer)

    def release(self, protocol: LeanHTTP) -> None:
        """A connection ended: its place under the caps is free."""
        self.connections.protocols.discard(protocol)
        peer = protocol._peer
        held = self.clients.get(peer, 0) - 1
        if held > 0:
            self.clients[peer] = held
        else:
            self.clients.pop(peer, None)

    def _refuse(self, reason: str, peer: str) -> None:
        if self.metrics is not None:
            self.metrics.connections_refused.labels(reason).inc()
        self._refused += 1
        now = self.clock.seconds()
        if now - self._refusal_logged >= REFUSAL_LOG_INTERVAL:
            log.warn("refused {count} caller connections since the last such line (last: {peer}, over "
                     "{cap}); {held} connections held", count=self._refused, peer=peer,
                     cap="MAX_CONNECTIONS" if reason == "total" else "MAX_CONNECTIONS_PER_CLIENT",
                     held=len(self.connections.protocols))
            self._refused = 0
            self._refusal_logged = now

    def timed_out(self, phase: str) -> None:
        """A request cut off by its deadline (``phase``: header or body), counted."""
        if self.metrics is not None:
            self.metrics.client_timeouts.labels(phase).inc()

    def startFactory(self) -> None:
        """The Site serves handed-off connections as if it listened itself."""
        self.site.doStart()

    def stopFactory(self) -> None:
        self.site.doStop()
