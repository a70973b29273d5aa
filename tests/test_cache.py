"""The cache stores: MemoryCache against a model, RedisCache against a real redis-server.

The Redis tests start their own ``redis-server`` on a free loopback port. Without the binary they
skip, except under ``CI=true``, where a missing server is a broken setup and fails.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from zope.interface.verify import verifyObject

from sentinel_proxy.stores.cache import KEY_PREFIX, IResponseCache, MemoryCache, RedisCache
from sentinel_proxy.stores.cache_address import parse_redis_url
from tests.deferreds import bounded, fired, pause
from tests.processes import free_port, resp



# -- MemoryCache


def test_memory_cache_provides_the_interface():
    assert verifyObject(IResponseCache, MemoryCache(100, Clock()))


def test_memory_get_set_and_counters():
    cache = MemoryCache(1000, Clock())
    assert fired(cache.get(b"k")) is None
    assert fired(cache.set(b"k", b"value", None)) is None
    assert fired(cache.get(b"k")) == b"value"
    assert (cache.hits, cache.misses, cache.stores, cache.evictions, cache.bytes) == (1, 1, 1, 0, 6)
    fired(cache.set(b"k", b"longer value", 5.0))  # replacing an entry accounts for the old one
    assert cache.bytes == 1 + 12 and len(cache) == 1 and cache.stores == 2


def test_memory_ttl_expiry():
    clock = Clock()
    cache = MemoryCache(1000, clock)
    fired(cache.set(b"short", b"v", 1.0))
    fired(cache.set(b"forever", b"v", None))
    fired(cache.set(b"also-forever", b"v", math.inf))
    clock.advance(0.999)
    assert fired(cache.get(b"short")) == b"v"
    clock.advance(0.001)
    assert fired(cache.get(b"short")) is None
    assert cache.bytes == len(b"forever") + len(b"also-forever") + 2  # the expired entry is gone
    clock.advance(10**9)
    assert fired(cache.get(b"forever")) == b"v" and fired(cache.get(b"also-forever")) == b"v"


def test_memory_refuses_what_it_cannot_keep():
    cache = MemoryCache(10, Clock())
    fired(cache.set(b"k", b"old", None))
    fired(cache.set(b"k", b"x" * 10, None))  # larger than the whole bound: not stored
    fired(cache.set(b"z", b"v", 0.0))
    fired(cache.set(b"y", b"v", -1.0))
    assert fired(cache.get(b"k")) == b"old"
    assert fired(cache.get(b"z")) is None and fired(cache.get(b"y")) is None
    assert cache.stores == 1 and cache.bytes == 4


def test_memory_lru_eviction_order():
    cache = MemoryCache(30, Clock())
    for key in (b"k1", b"k2", b"k3"):
        fired(cache.set(key, b"12345678", None))  # 10 bytes each
    assert cache.bytes == 30 and cache.evictions == 0
    fired(cache.get(b"k1"))  # k1 is now the most recently used; k2 the least
    fired(cache.set(b"k4", b"12345678", None))
    assert fired(cache.get(b"k2")) is None
    assert [fired(cache.get(k)) is not None for k in (b"k1", b"k3", b"k4")] == [True, True, True]
    fired(cache.set(b"k5", b"123456789012345678", None))  # 20 bytes: evicts k1 and k3, the two oldest
    assert fired(cache.get(b"k1")) is None and fired(cache.get(b"k3")) is None
    assert fired(cache.get(b"k4")) is not None and fired(cache.get(b"k5")) is not None
    assert cache.evictions == 3 and cache.bytes == 30


def test_memory_close_empties_it():
    cache = MemoryCache(100, Clock())
    fired(cache.set(b"k", b"v", None))
    assert fired(cache.close()) is None
    assert len(cache) == 0 and cache.bytes == 0 and fired(cache.get(b"k")) is None


def test_memory_rejects_a_negative_bound():
    with pytest.raises(ValueError):
        MemoryCache(-1, Clock())


@dataclass
class ModelCache:
    """An obviously correct (and slow) LRU with expiry: the specification MemoryCache must meet."""

    max_bytes: int
    entries: list = field(default_factory=list)  # [key, value, expires], least recently used first
    evictions: int = 0

    @property
    def bytes(self) -> int:
        return sum(len(k) + len(v) for k, v, _ in self.entries)

    def get(self, key, now):
        for entry in self.entries:
            if entry[0] == key:
                self.entries.remove(entry)
                if entry[2] > now:
                    self.entries.append(entry)
                    return entry[1]
                return None
        return None

    def set(self, key, value, ttl, now):
        if len(key) + len(value) > self.max_bytes or (ttl is not None and ttl <= 0):
            return
        self.entries = [e for e in self.entries if e[0] != key]
        self.entries.append([key, value, math.inf if ttl is None else now + ttl])
        while self.bytes > self.max_bytes:
            self.entries.pop(0)
            self.evictions += 1


operations = st.lists(st.one_of(
    st.tuples(st.just("set"), st.sampled_from([b"a", b"bb", b"ccc", b"dddd", b"e" * 9]), st.integers(0, 40),
              st.sampled_from([None, math.inf, 0.0, -1.0, 0.5, 1.0, 3.0])),
    st.tuples(st.just("get"), st.sampled_from([b"a", b"bb", b"ccc", b"dddd", b"e" * 9, b"zz"])),
    st.tuples(st.just("tick"), st.sampled_from([0.25, 0.5, 1.0, 2.0])),
), max_size=80)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 80), operations)
def test_memory_matches_the_model_and_never_exceeds_its_bound(max_bytes, ops):
    clock = Clock()
    cache, model = MemoryCache(max_bytes, clock), ModelCache(max_bytes)
    for op in ops:
        if op[0] == "set":
            _, key, size, ttl = op
            value = bytes([size % 251]) * size
            fired(cache.set(key, value, ttl))
            model.set(key, value, ttl, clock.seconds())
        elif op[0] == "get":
            assert fired(cache.get(op[1])) == model.get(op[1], clock.seconds())
        else:
            clock.advance(op[1])
        assert cache.bytes <= max_bytes
        assert cache.bytes == model.bytes == sum(len(k) + len(v) for k, (v, _) in cache._entries.items())
        assert list(cache._entries) == [e[0] for e in model.entries]
        assert cache.evictions == model.evictions


# -- RedisCache


def parse_error(url):
    with pytest.raises(ValueError) as raised:
        parse_redis_url(url)
    return str(raised.value)


def test_redis_url():
    address = parse_redis_url("redis://cache.internal:6380/3")
    assert (address.host, address.port, address.db, address.password) == ("cache.internal", 6380, 3, None)
    address = parse_redis_url("redis://:s%40cret@10.0.0.1")
    assert (address.host, address.port, address.db, address.password) == ("10.0.0.1", 6379, 0, "s@cret")
    assert str(address) == "redis://10.0.0.1:6379/0"  # no credentials in logs
    assert parse_redis_url("redis://user:pw@h/1").username == "user"
    assert "redis://" in parse_error("http://host:6379")
    assert "database number" in parse_error("redis://host/abc")
    assert "port" in parse_error("redis://host:99999")
    assert "query" in parse_error("redis://host/0?x=1")


@pytest_twisted.async_yield_fixture
async def redis_caches():
    """Make RedisCaches; every one is closed at the end of the test."""
    made: list[RedisCache] = []

    def make(url: str, **options) -> RedisCache:
        made.append(RedisCache(url, reactor, **options))
        return made[-1]

    yield make
    for cache in made:
        await cache.close()


@pytest_twisted.ensureDeferred
async def test_redis_provides_the_interface(redis_server, redis_caches):
    assert verifyObject(IResponseCache, redis_caches(redis_server.url))


@pytest_twisted.ensureDeferred
async def test_redis_get_set_and_counters(redis_server, redis_caches):
    cache = redis_caches(redis_server.url)
    assert await bounded(cache.get(b"node_getBlockNumber:[]")) is None
    assert await bounded(cache.set(b"node_getBlockNumber:[]", b"1000", None)) is None
    # Bytes come back as bytes: no number conversion, no decoding, even for binary values.
    assert await bounded(cache.get(b"node_getBlockNumber:[]")) == b"1000"
    binary = bytes(range(256)) + b"\r\n$-1\r\n"
    await bounded(cache.set(b"bin", binary, None))
    assert await bounded(cache.get(b"bin")) == binary
    assert (cache.hits, cache.misses, cache.stores, cache.errors) == (2, 1, 2, 0)
    assert (cache.evictions, cache.bytes) == (0, 0)


@pytest_twisted.ensureDeferred
async def test_redis_expiry(redis_server, redis_caches):
    cache = redis_caches(redis_server.url)
    await bounded(cache.set(b"forever", b"v", None))
    await bounded(cache.set(b"also-forever", b"v", math.inf))
    await bounded(cache.set(b"volatile", b"v", 5.0))
    await bounded(cache.set(b"short", b"v", 0.05))
    await bounded(cache.set(b"nothing", b"v", 0.0))
    assert resp(redis_server.port, "PTTL", KEY_PREFIX + b"forever") == b":-1\r\n"
    assert resp(redis_server.port, "PTTL", KEY_PREFIX + b"also-forever") == b":-1\r\n"
    assert 4000 < int(resp(redis_server.port, "PTTL", KEY_PREFIX + b"volatile")[1:]) <= 5000
    assert resp(redis_server.port, "EXISTS", KEY_PREFIX + b"nothing") == b":0\r\n"
    deadline = reactor.seconds() + 2.0
    while await bounded(cache.get(b"short")) is not None:
        assert reactor.seconds() < deadline, "a 50 ms entry was still there after 2 s"
        await pause(0.01)
    assert await bounded(cache.get(b"forever")) == b"v"


@pytest_twisted.ensureDeferred
async def test_redis_prefix_isolation(redis_server, redis_caches):
    ours = redis_caches(redis_server.url)
    other_version = redis_caches(redis_server.url, prefix=b"sentinel:v0:")
    await bounded(ours.set(b"node_getBlock:[5]", b"{}", None))
    assert await bounded(other_version.get(b"node_getBlock:[5]")) is None
    assert resp(redis_server.port, "GET", b"sentinel:v1:node_getBlock:[5]") == b"$2\r\n{}\r\n"
    assert resp(redis_server.port, "EXISTS", b"node_getBlock:[5]") == b":0\r\n"
    # Another database of the same server is another namespace too.
    db1 = redis_caches(redis_server.url[:-1] + "1")
    assert await bounded(db1.get(b"node_getBlock:[5]")) is None


@pytest_twisted.ensureDeferred
async def test_redis_outage_is_a_miss_and_recovers(redis_server, redis_caches):
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        cache = redis_caches(redis_server.url, timeout=0.05, retry_interval=0.2)
        await bounded(cache.set(b"k", b"v", None))
        assert await bounded(cache.get(b"k")) == b"v"

        redis_server.kill()
        started = reactor.seconds()
        calls = [cache.get(b"k") for _ in range(20)] + [cache.set(b"k2", b"v2", 1.0) for _ in range(5)]
        results = await bounded(defer.gatherResults(calls))
        assert results == [None] * 25  # misses and dropped stores, no error reaches the caller
        assert reactor.seconds() - started < 0.5
        assert cache.errors >= 1

        # While Redis is down, lookups are answered at once, then probed again every retry interval:
        # a probe waits on a connection that never comes back and is cut off by the timeout.
        for _ in range(5):
            started = reactor.seconds()
            assert await bounded(cache.get(b"k"), 1.0) is None
            assert await bounded(cache.set(b"k", b"v", None), 1.0) is None
            assert reactor.seconds() - started < 0.5
            await pause(0.1)
        errors_while_down = cache.errors

        redis_server.start()  # same port, empty (no persistence)
        deadline = reactor.seconds() + 15.0
        while await bounded(cache.get(b"k3")) != b"v3":
            assert reactor.seconds() < deadline, "the Redis cache did not recover within 15 s"
            await bounded(cache.set(b"k3", b"v3", None))
            await pause(0.1)
        assert cache.errors >= errors_while_down >= 2
    finally:
        globalLogPublisher.removeObserver(events.append)
    ours = [e for e in events if e.get("log_namespace") == "sentinel_proxy.stores.redis_link" and e.get("role") == "Redis cache"]
    warnings = [e for e in ours if e["log_level"] is LogLevel.warn]
    assert len(warnings) == 1, "an outage must be reported once, not once per failed call"
    assert warnings[0]["address"] == redis_server.url and warnings[0]["failures"] >= 1
    assert [formatEvent(e) for e in ours if e["log_level"] is LogLevel.info] == [
        f"Redis cache {redis_server.url} reachable again"]


@pytest_twisted.ensureDeferred
async def test_redis_never_started_is_a_miss(redis_caches):
    cache = redis_caches(f"redis://127.0.0.1:{free_port()}/0", timeout=0.05)
    assert await bounded(cache.get(b"k")) is None
    assert await bounded(cache.set(b"k", b"v", None)) is None
    assert cache.errors >= 1 and cache.misses == 1 and cache.stores == 0


@pytest_twisted.ensureDeferred
async def test_redis_after_close_is_a_miss(redis_server, redis_caches):
    cache = redis_caches(redis_server.url)
    await bounded(cache.set(b"k", b"v", None))
    await bounded(cache.close())
    assert await bounded(cache.get(b"k")) is None
    assert await bounded(cache.set(b"k", b"v", None)) is None
