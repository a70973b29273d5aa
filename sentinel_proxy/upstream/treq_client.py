"""``UPSTREAM_CLIENT=treq``: forwarding through treq's ``HTTPClient``, to measure treq on the hot path.

The design card asks that the gateway proxy via treq; this client does, selectable by a setting so
one benchmark run can put it next to the default client (:mod:`.http11`). It is for measurement,
not for production, because treq cannot pass answers through byte for byte: its ``request``
always wraps the agent in a ``ContentDecoderAgent`` (which adds ``Accept-Encoding: gzip`` to every
call, gunzips every gzip answer and drops its ``Content-Encoding``) and a ``CookieAgent`` (which
keeps the nodes' cookies and sends them back). A caller that asked for gzip gets the answer
uncompressed, and every answer pays for decoding and cookie handling on the reactor thread. It
also parses the node's URL on every call (hyperlink) and goes through twisted's ``Agent``, whose
per-request cost the default client was built to avoid (docs/performance.md).

It keeps the request path's contract: header pairs in, an :class:`UpstreamResponse` with
lower-cased header pairs out, the same errors, deadline, answer bound and memory count.
"""
from __future__ import annotations

from typing import Any, Sequence

from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers
from zope.interface import implementer

from sentinel_proxy.interfaces import IForwardingClient
from sentinel_proxy.state.backends import Backend
from sentinel_proxy.upstream.client import BytesProducer, PooledAgent, bounded, read_body
from sentinel_proxy.upstream.memory import AnswerMemory
from sentinel_proxy.upstream.pool import HOP_BY_HOP
from sentinel_proxy.upstream.response import UpstreamResponse


class _Tally:
    """One answer's bytes in the shared count, given back once it has been handed over."""

    __slots__ = ("_memory", "count")

    def __init__(self, memory: AnswerMemory):
        self._memory = memory
        self.count = 0

    def take(self, count: int) -> None:
        self.count += count
        self._memory.take(count)

    def give_back(self) -> None:
        if self.count:
            self._memory.give_back(self.count)
            self.count = 0


@implementer(IForwardingClient)
class TreqForwardingClient:
    """``post`` and ``close`` over treq's ``HTTPClient`` on a pooled ``Agent`` of its own."""

    def __init__(self, reactor: IReactorTime, max_connections: int = 128, idle_timeout: float = 4.0,
                 connect_timeout: float = 2.0, max_response_bytes: int = 1 << 25, *,
                 memory: AnswerMemory | None = None):
        self._reactor = reactor
        self._pool = PooledAgent(reactor, max_connections, idle_timeout, connect_timeout)
        self._http = HTTPClient(self._pool.agent, data_to_body_producer=BytesProducer)
        self._max_response = max_response_bytes
        self.memory = memory if memory is not None else AnswerMemory(1 << 62)

    async def _exchange(self, backend: Backend, body: bytes, headers: Sequence[tuple[bytes, bytes]], limit: int,
                        tally: _Tally) -> UpstreamResponse:
        sent = Headers()
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP:
                sent.addRawHeader(name, value)
        if backend.authorization is not None:
            sent.setRawHeaders(b"authorization", [backend.authorization])
        # No redirects (a node answering 3xx is misconfigured; following it would send its
        # credentials elsewhere); unbuffered: the body is read once, bounded, by read_body.
        response = await self._http.post(backend.target, data=body, headers=sent, allow_redirects=False,
                                         unbuffered=True)
        content = await read_body(response, limit, tally.take)
        # twisted's parser has already left out the connection's own headers.
        pairs = tuple((name.lower(), value) for name, values in response.headers.getAllRawHeaders()
                      for value in values)
        return UpstreamResponse(response.code, pairs, content)

    def post(self, backend: Backend, body: bytes, headers: Sequence[tuple[bytes, bytes]], timeout: float,
             limit: int | None = None) -> defer.Deferred[UpstreamResponse]:
        """As :meth:`FastForwardingClient.post <sentinel_proxy.upstream.http11.FastForwardingClient.post>`."""
        tally = _Tally(self.memory)
        exchange = defer.Deferred.fromCoroutine(bounded(defer.Deferred.fromCoroutine(
            self._exchange(backend, body, headers, self._max_response if limit is None else limit, tally)),
            timeout, self._reactor))
        handed: defer.Deferred[UpstreamResponse] = defer.Deferred(lambda _: exchange.cancel())

        def hand_over(outcome: Any) -> None:
            if not handed.called:  # (cancelled already, if the cancellation took a turn to arrive)
                handed.callback(outcome)  # a Failure goes down the errback chain
            tally.give_back()  # after the request path has written the reply

        exchange.addBoth(hand_over)
        return handed

    def close(self) -> defer.Deferred[None]:
        return self._pool.close()
