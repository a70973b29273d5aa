"""Who gets in: the in-flight bound and the memory bound on node answers (and the drain that
graceful shutdown waits on), API keys and the rate limit."""
from __future__ import annotations

import hashlib
import math
from typing import Callable, Iterable

from prometheus_client import Gauge
from twisted.internet import defer

from sentinel_proxy.core import jsonrpc
from sentinel_proxy.interfaces import IRateLimiter
from sentinel_proxy.proxy.values import Caller, Limits, Reply, error_reply
from sentinel_proxy.stores.ratelimit import request_cost


class InFlight:
    """Counts the requests being handled, refuses new ones past MAX_IN_FLIGHT or while node answers
    fill MAX_BUFFERED_ANSWERS_MB, and tells graceful shutdown when the last one is done."""

    def __init__(self, gauge: Gauge):
        self._gauge = gauge
        self.count = 0
        self._idle_waiters: list[defer.Deferred[None]] = []

    def enter(self, limit: int, answers_over_cap: Callable[[], int] | None = None) -> Reply | None:
        """Count the request in, or the 503 that asks the caller to come back shortly.

        ``answers_over_cap()``: the bytes of node answers held beyond MAX_BUFFERED_ANSWERS_MB
        (``AnswerMemory.over_cap``, sentinel_proxy/upstream/memory.py); more than 0 refuses
        the request before it takes any memory. Answers already coming in are never cut.
        """
        if self.count >= limit:
            return error_reply(503, jsonrpc.OVERLOADED,
                               f"Gateway overloaded: {self.count} requests in flight; retry shortly", retry_after=1)
        if answers_over_cap is not None and answers_over_cap() > 0:
            return error_reply(503, jsonrpc.OVERLOADED,
                               "Gateway overloaded: too many large answers in memory; retry shortly", retry_after=1)
        self.count += 1
        self._gauge.inc()
        return None

    def leave(self) -> None:
        self.count -= 1
        self._gauge.dec()
        if self.count == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def drained(self) -> defer.Deferred[None]:
        """Fires once no request is in flight: graceful shutdown waits on it."""
        if self.count == 0:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(waiter)
        return waiter


def bucket_of(caller: Caller, key_digests: frozenset[str]) -> str | None:
    """The rate-limit bucket: the API key's (hashed), else the client address's; None for a
    key that is not valid."""
    if caller.api_key is None:
        return f"ip:{caller.address}"
    digest = hashlib.sha256(caller.api_key.encode("utf-8", "replace")).hexdigest()
    return f"key:{digest[:32]}" if digest in key_digests else None


def unknown_key() -> Reply:
    return error_reply(401, jsonrpc.UNKNOWN_API_KEY, "Unknown API key")


class RateLimit:
    """Token buckets per client address or API key; no limiter configured lets everything through."""

    def __init__(self, limiter: IRateLimiter | None):
        self._limiter = limiter

    async def take(self, bucket: str, methods: Iterable[str], limits: Limits) -> Reply | None:
        """Before the cache: a cached answer costs the same, so a client cannot flood through it.

        None when the request may go on, else the 429 with the seconds to wait.
        """
        if self._limiter is None:
            return None
        keyed = bucket.startswith("key:")
        decision = await self._limiter.take(bucket, max(1.0, request_cost(methods)),
                                            limits.key_rate if keyed else limits.rate,
                                            limits.key_burst if keyed else limits.burst)
        if decision.allowed:
            return None
        wait = max(1, math.ceil(decision.retry_after))
        return error_reply(429, jsonrpc.RATE_LIMITED, f"Rate limit exceeded; retry in {wait} s", retry_after=wait)

    async def refuse_unknown_key(self, caller: Caller, limits: Limits) -> Reply:
        """The answer to a key that is not valid: 401, after it took one token from the caller's
        address bucket, so guessing keys is throttled like anonymous calls (429 once the bucket is
        empty). One token, whatever the body: it is refused before it is read."""
        return await self.take(f"ip:{caller.address}", (), limits) or unknown_key()
