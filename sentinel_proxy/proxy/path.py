"""The request path: admission -> guard -> rate limit -> cache or failover -> telemetry.

Each stage is its own module, joined to the next by the values of :mod:`.values`; this one only
puts them in order, so the order is what there is to read here.
"""
from __future__ import annotations

from typing import Callable, Mapping

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sentinel_proxy.core import jsonrpc
from sentinel_proxy.interfaces import IForwardingClient, IRateLimiter, IResponseCache
from sentinel_proxy.ops.logs import AccessLog, observer
from sentinel_proxy.ops.metrics import Metrics
from sentinel_proxy.ops.tracing import NO_TRACER, Tracer
from sentinel_proxy.proxy import guard
from sentinel_proxy.proxy.admission import InFlight, RateLimit, bucket_of
from sentinel_proxy.proxy.caching import Caching
from sentinel_proxy.proxy.failover import Failover
from sentinel_proxy.proxy.telemetry import Telemetry
from sentinel_proxy.proxy.values import Caller, Inbound, Limits, Reply, error_reply
from sentinel_proxy.state.backends import BackendPool
from sentinel_proxy.state.status import RequestTotals

log = Logger(observer=observer)


class RequestPath:
    """What the web layer hands each RPC request to; owns no logic beyond the order of the stages."""

    def __init__(self, pool: BackendPool, upstream: IForwardingClient, metrics: Metrics, clock: IReactorTime,
                 limits: Limits, access_log: AccessLog | None = None, cache: IResponseCache | None = None,
                 volatile_ttl: float = 1.0, limiter: IRateLimiter | None = None, worker: str | None = None,
                 answer_bytes: Callable[[], int] | None = None, tracer: Tracer = NO_TRACER):
        self._answer_bytes = answer_bytes  # node answers' bytes over MAX_BUFFERED_ANSWERS_MB (upstream/memory.py)
        self._pool = pool
        self._clock = clock
        self._limits = limits
        self._in_flight = InFlight(metrics.in_flight)
        self._rate_limit = RateLimit(limiter)
        self._tracer = tracer
        self._failover = Failover(pool, upstream, metrics, clock, tracer)
        self._caching = None if cache is None else Caching(cache, metrics, volatile_ttl, lambda: pool.finalized,
                                                           self._failover.forward, chain=pool.chain_identity)
        self._telemetry = Telemetry(metrics, clock, access_log, worker)

    @property
    def in_flight(self) -> int:
        return self._in_flight.count

    @property
    def totals(self) -> RequestTotals:
        return self._telemetry.totals

    def configure(self, limits: Limits, access_log: AccessLog | None) -> None:
        """New limits (SIGHUP); requests in flight finish under the old ones."""
        self._limits = limits
        self._telemetry.access_log = access_log

    def drained(self) -> defer.Deferred[None]:
        """Fires once no request is in flight: graceful shutdown waits on it."""
        return self._in_flight.drained()

    async def handle(self, route: str, body: bytes, headers: Mapping[bytes, bytes], body_too_large: bool = False,
                     caller: Caller = Caller("-")) -> Reply:
        """``headers``: the request's headers, names lower-cased, repeated headers joined with ", "."""
        started = self._clock.seconds()
        inbound = Inbound(route, body, headers, body_too_large, caller)
        limits = self._limits
        span = self._tracer.request(route, caller)
        reply = self._in_flight.enter(limits.max_in_flight, self._answer_bytes)
        if reply is None:
            try:
                reply = await self._admitted(inbound, limits)
            except defer.CancelledError:
                span.end(None)
                raise  # the caller went away (Klein cancels the handler): its upstream call is cancelled too
            except Exception:  # the prototype's panic recovery: one broken request, not a broken daemon
                log.failure("request {request_id} on {route} failed inside the gateway",
                            request_id=caller.request_id, route=route)
                reply = error_reply(500, jsonrpc.INTERNAL_ERROR, "Internal gateway error", outcome="upstream_error")
            finally:
                self._in_flight.leave()
        if reply.refusal is not None:  # refused before the body was parsed: the ids read from it
            reply = guard.addressed_unparsed(reply, inbound, limits.max_body)
        if reply.backend is not None:
            self._pool.record_outcome(reply.backend, self._clock.seconds(), reply_status=reply.status)
        reply = self._telemetry.finish(inbound, reply, started)
        span.end(reply)
        return reply

    async def _admitted(self, inbound: Inbound, limits: Limits) -> Reply:
        bucket = bucket_of(inbound.caller, limits.key_digests)
        if bucket is None:
            return await self._rate_limit.refuse_unknown_key(inbound.caller, limits)
        parsed = guard.check(inbound, limits, self._pool.history_floor(inbound.route))
        if isinstance(parsed, Reply):
            return parsed
        limited = await self._rate_limit.take(bucket, parsed.methods, limits)
        if limited is not None:
            return guard.addressed(limited, parsed)
        plan = guard.plan(inbound, parsed, limits, self._clock.seconds() + limits.timeout)
        reply = None
        if self._caching is not None:
            reply = await self._caching.serve(plan)
        if reply is None:
            reply = await self._failover.forward(plan)
        return guard.addressed(reply, parsed).described(parsed.methods, parsed.size if parsed.is_batch else None,
                                                        parsed.refused_methods)
