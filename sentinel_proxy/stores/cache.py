"""Response cache stores behind one interface: a bounded in-memory LRU and Redis (txredisapi).

The stores keep opaque bytes under opaque keys; what to cache, under which key and for how long is
:mod:`sentinel_proxy.core.cache_policy`'s business. A cache is an optimisation, never a dependency:
neither store ever fails a call. Redis trouble (down, slow, refusing) is a miss for ``get`` and a
silently dropped ``set``, counted in ``errors`` and logged at most once per ``log_interval``.

Importing this module imports txredisapi, which installs the default reactor: only the service
imports it, never the twistd plugin file.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sentinel_proxy.interfaces import IResponseCache

from sentinel_proxy.stores.redis_link import RedisLink
from sentinel_proxy.ops.logs import observer

log = Logger(observer=observer)

#: Prefix of every Redis key: several gateways can share one Redis, and bumping the version tag
#: when the stored format changes makes new gateways ignore entries written by old ones.
KEY_PREFIX = b"sentinel:v1:"



def _expires(now: float, ttl: float | None) -> float:
    return math.inf if ttl is None else now + ttl


@implementer(IResponseCache)
class MemoryCache:
    """An LRU bounded by the bytes of its keys and values, with per-entry expiry.

    The bound counts key and value bytes only; Python adds roughly 150 bytes per entry on top
    (the tuple, the dict slot and the bytes headers). Expiry is lazy: an expired entry is dropped
    when it is read, or evicted like any other entry as the least recently used.
    """

    def __init__(self, max_bytes: int, clock: IReactorTime):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        self.max_bytes = max_bytes
        self._clock = clock
        # key -> (value, expiry time); least recently used first.
        self._entries: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.stores = 0
        self.evictions = 0
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Deferred:
        entry = self._entries.get(key)
        if entry is not None:
            if entry[1] > self._clock.seconds():
                self._entries.move_to_end(key)
                self.hits += 1
                return succeed(entry[0])
            del self._entries[key]
            self.bytes -= len(key) + len(entry[0])
        self.misses += 1
        return succeed(None)

    def set(self, key: bytes, value: bytes, ttl: float | None) -> Deferred:
        size = len(key) + len(value)
        if size > self.max_bytes or (ttl is not None and ttl <= 0):
            return succeed(None)
        entries = self._entries
        old = entries.pop(key, None)
        if old is not None:
            self.bytes -= len(key) + len(old[0])
        entries[key] = (value, _expires(self._clock.seconds(), ttl))
        self.bytes += size
        self.stores += 1
        while self.bytes > self.max_bytes:
            evicted, (evicted_value, _) = entries.popitem(last=False)
            self.bytes -= len(evicted) + len(evicted_value)
            self.evictions += 1
        return succeed(None)

    def close(self) -> Deferred:
        self._entries.clear()
        self.bytes = 0
        return succeed(None)




@implementer(IResponseCache)
class RedisCache:
    """A Redis store shared by several gateways, that can never slow down or fail a call.

    Every command is cut off after ``timeout`` seconds. After a failure, calls are answered as
    misses without touching Redis for ``retry_interval`` seconds, then one call probes it again:
    during an outage the request path pays nothing (without this, every lookup would wait the
    full ``timeout``, and txredisapi would queue a waiter per call until it reconnects, which it
    does with a 1 s to 10 s backoff).

    ``evictions`` and ``bytes`` stay 0: Redis evicts and sizes entries itself (``maxmemory``,
    ``INFO memory``), out of the client's sight. They exist so both stores expose the same
    counters.
    """

    evictions = 0
    bytes = 0

    def __init__(self, url: str, reactor: IReactorTime, timeout: float = 0.05, *,
                 prefix: bytes = KEY_PREFIX, poolsize: int = 2, retry_interval: float = 1.0,
                 log_interval: float = 60.0):
        self._link = RedisLink(url, reactor, timeout, role="Redis cache", outage="serving cache misses",
                               poolsize=poolsize, retry_interval=retry_interval, log_interval=log_interval)
        self.address = self._link.address
        self._prefix = prefix
        self.hits = 0
        self.misses = 0
        self.stores = 0

    @property
    def errors(self) -> int:
        return self._link.errors

    def get(self, key: bytes) -> Deferred:
        if not self._link.usable:
            self.misses += 1
            return succeed(None)
        return self._link.command("get", self._prefix + key).addCallbacks(self._got, self._get_failed)

    def set(self, key: bytes, value: bytes, ttl: float | None) -> Deferred:
        if (ttl is not None and ttl <= 0) or not self._link.usable:
            return succeed(None)
        if ttl is None or ttl == math.inf:
            sent = self._link.command("set", self._prefix + key, value)
        else:
            sent = self._link.command("set", self._prefix + key, value, pexpire=max(1, round(ttl * 1000)))
        return sent.addCallbacks(self._stored, self._link.failed)

    def close(self) -> Deferred:
        """Disconnect (within a second at most); later calls are misses. Closing twice is a no-op."""
        return self._link.close()

    def _got(self, value: Any) -> bytes | None:
        self._link.reachable()
        if isinstance(value, bytes):
            self.hits += 1
            return value
        self.misses += 1
        return None

    def _get_failed(self, failure: Failure) -> None:
        self.misses += 1
        self._link.failed(failure)

    def _stored(self, _: Any) -> None:
        self._link.reachable()
        self.stores += 1

