"""Rate limiting: costs, the client's address, the memory bucket on a Clock, and the Redis bucket
against a real redis-server (two limiters standing for two gateways), outage included."""
from __future__ import annotations

import ipaddress
import math
import os
import signal
import subprocess
import sys
from typing import Self

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from zope.interface.verify import verifyObject

from sentinel_proxy.stores.ratelimit import (DEFAULT_COSTS, EARLY, KEY_PREFIX, Decision, IRateLimiter,
                                      MemoryRateLimiter, RedisRateLimiter, client_ip,
                                      parse_trusted_proxies, request_cost)
from tests.deferreds import bounded, fired, pause
from tests.processes import free_port, resp

# -- Costs


def test_request_cost():
    assert request_cost(["node_getBlockNumber"]) == 1
    assert request_cost(["node_getBlockNumber"] * 3) == 3  # a batch is the sum of its calls
    assert request_cost(["node_getValidatorsStats"]) == DEFAULT_COSTS["node_getValidatorsStats"] == 20
    assert request_cost(["node_getBlocks", "node_sendTx", "node_somethingNew"]) == 5 + 2 + 1
    assert request_cost(["node_getBlocks"], {"node_getBlocks": 0.5}) == 0.5
    assert all(cost > 1 for cost in DEFAULT_COSTS.values())
    with pytest.raises(TypeError):
        DEFAULT_COSTS["node_getBlock"] = 9  # type: ignore[index]  # a shared default stays shared


def test_importing_the_module_installs_no_reactor():
    """Configuration validates TRUSTED_PROXIES before twistd has chosen a reactor."""
    code = ("import sys, sentinel_proxy.stores.ratelimit; "
            "print('twisted.internet.reactor' in sys.modules, 'txredisapi' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# -- The client's address

TRUSTED = parse_trusted_proxies("10.0.0.0/8, 192.168.1.7, fd00::/8")


def test_parse_trusted_proxies():
    assert parse_trusted_proxies("") == ()
    assert parse_trusted_proxies(" 10.0.0.1 ,, 2001:db8::/32,") == (
        ipaddress.ip_network("10.0.0.1/32"), ipaddress.ip_network("2001:db8::/32"))
    for garbage, hint in [("10.0.0.0/33", "33"), ("proxy.internal", "proxy.internal"),
                          ("10.0.0.1/8", "host bits"), ("10.0.0.0/8;10.1.0.0/16", "10.0.0.0/8;")]:
        with pytest.raises(ValueError) as raised:
            parse_trusted_proxies(f"127.0.0.1,{garbage}")
        assert hint in str(raised.value) and "CIDR" in str(raised.value)


@pytest.mark.parametrize("peer, headers, expected", [
    # No header, or a peer that is not a trusted proxy: the connection's address; the header is forged.
    ("203.0.113.9", None, "203.0.113.9"),
    ("203.0.113.9", [b"198.51.100.1"], "203.0.113.9"),
    # A trusted proxy: the first untrusted address from the right, the rest is the client's own claim.
    ("10.0.0.2", [b"198.51.100.1"], "198.51.100.1"),
    ("10.0.0.2", [b"1.1.1.1, 198.51.100.1, 192.168.1.7"], "198.51.100.1"),
    ("10.0.0.2", [b"1.1.1.1, 198.51.100.1", b"10.9.9.9"], "198.51.100.1"),  # several headers are one list
    ("10.0.0.2", [b""], "10.0.0.2"),
    # Every hop trusted: the leftmost is the client (a request from inside the network).
    ("10.0.0.2", [b"10.1.1.1, 192.168.1.7"], "10.1.1.1"),
    # Malformed entries stop the walk at the last trusted hop.
    ("10.0.0.2", [b"198.51.100.1, unknown"], "10.0.0.2"),
    ("10.0.0.2", [b"198.51.100.1, garbage, 10.3.3.3"], "10.3.3.3"),
    ("10.0.0.2", [b"198.51.100.1,,10.3.3.3"], "10.3.3.3"),
    ("10.0.0.2", [b"\xff\xfe, 10.3.3.3"], "10.3.3.3"),
    ("10.0.0.2", [b"198.51.100.1:80:90"], "10.0.0.2"),
    # Ports and brackets some proxies add.
    ("10.0.0.2", [b"198.51.100.1:4711"], "198.51.100.1"),
    ("10.0.0.2", [b"[2001:db8::7]:443"], "2001:db8::7"),
    ("10.0.0.2", [b"[2001:db8::7]"], "2001:db8::7"),
    ("10.0.0.2", [b"[2001:db8::7]x"], "10.0.0.2"),
    ("10.0.0.2", [b"[2001:db8::7"], "10.0.0.2"),
    # IPv6: normalised, trusted by CIDR; IPv4-mapped folded to IPv4 (dual-stack sockets).
    ("fd00::1", [b"2001:DB8:0:0::1"], "2001:db8::1"),
    ("2001:db8::2", [b"198.51.100.1"], "2001:db8::2"),
    ("::ffff:10.0.0.2", [b"198.51.100.1"], "198.51.100.1"),
    ("::ffff:203.0.113.9", None, "203.0.113.9"),
    ("10.0.0.2", [b"::ffff:198.51.100.1"], "198.51.100.1"),
    # Not an IP peer (a UNIX socket): as is, never trusted.
    ("", [b"198.51.100.1"], ""),
])
def test_client_ip(peer, headers, expected):
    assert client_ip(peer, headers, TRUSTED) == expected


def test_client_ip_does_not_cache_long_junk():
    from sentinel_proxy.stores.ratelimit import _address

    cached = _address.cache_info().currsize
    assert client_ip("10.0.0.2", [b"x" * 10_000 + b", 10.3.3.3"], TRUSTED) == "10.3.3.3"
    assert _address.cache_info().currsize <= cached + 1  # 10.3.3.3 at most


def test_client_ip_trusts_nobody_by_default():
    assert client_ip("10.0.0.2", [b"198.51.100.1"], ()) == "10.0.0.2"


# -- MemoryRateLimiter


def take(limiter: MemoryRateLimiter, key: str = "ip:1.2.3.4", cost: float = 1, rate: float = 2,
         burst: float = 10) -> Decision:
    return fired(limiter.take(key, cost, rate, burst))


def test_memory_provides_the_interface():
    assert verifyObject(IRateLimiter, MemoryRateLimiter(Clock()))


def test_memory_burst_then_limited_then_refills():
    clock = Clock()
    limiter = MemoryRateLimiter(clock)
    decisions = [take(limiter) for _ in range(10)]
    assert all(d.allowed and d.retry_after == 0 for d in decisions)
    assert [d.remaining for d in decisions] == list(range(9, -1, -1))
    refused = take(limiter)
    assert refused == Decision(False, 0.5, 0.0)  # one token at 2 per second
    assert take(limiter, cost=3).retry_after == 1.5
    clock.advance(0.4999)
    assert not take(limiter).allowed
    clock.advance(0.0001)
    assert take(limiter) == Decision(True, 0.0, 0.0)
    clock.advance(2.0)  # four tokens back
    assert take(limiter, cost=3) == Decision(True, 0.0, 1.0)  # a three-call batch
    assert not take(limiter, cost=2).allowed
    clock.advance(100)  # never more than the burst
    assert take(limiter, cost=0) == Decision(True, 0.0, 10.0)
    assert (limiter.allowed, limiter.limited, limiter.errors) == (13, 4, 0)


def test_memory_retry_after_is_enough_for_awkward_rates():
    clock = Clock()
    limiter = MemoryRateLimiter(clock)
    for _ in range(3):
        assert take(limiter, rate=3, burst=1).allowed
        refused = take(limiter, rate=3, burst=1)
        assert not refused.allowed and refused.retry_after == pytest.approx(1 / 3)
        clock.advance(refused.retry_after)


def test_memory_costly_methods():
    limiter = MemoryRateLimiter(Clock())
    stats = request_cost(["node_getValidatorsStats"])
    assert take(limiter, cost=stats, rate=1, burst=30) == Decision(True, 0.0, 10.0)
    refused = take(limiter, cost=stats, rate=1, burst=30)
    assert not refused.allowed and refused.retry_after == 10.0 and refused.remaining == 10.0
    assert take(limiter, cost=request_cost(["node_getBlock"] * 3), rate=1, burst=30).remaining == 7.0


def test_memory_cost_above_burst_needs_a_full_bucket_and_leaves_a_debt():
    clock = Clock()
    limiter = MemoryRateLimiter(clock)
    assert take(limiter, cost=1).allowed
    assert take(limiter, cost=11) == Decision(False, 0.5, 9.0)  # until the bucket is full
    clock.advance(0.5)
    assert take(limiter, cost=11) == Decision(True, 0.0, 0.0)  # 1 token of debt
    assert take(limiter, cost=1) == Decision(False, 1.0, 0.0)  # the debt, then the token
    assert take(limiter, cost=11).retry_after == 5.5
    clock.advance(1.0)
    assert take(limiter, cost=1) == Decision(True, 0.0, 0.0)


def test_memory_keys_are_independent():
    limiter = MemoryRateLimiter(Clock())
    assert take(limiter, "ip:1.2.3.4", cost=10).allowed
    assert not take(limiter, "ip:1.2.3.4").allowed
    assert take(limiter, "ip:1.2.3.5", cost=10).allowed
    assert take(limiter, "key:abc", cost=10, burst=100).remaining == 90  # a key's own limits


def test_memory_rejects_invalid_limits():
    limiter = MemoryRateLimiter(Clock())
    for cost, rate, burst in [(1, 0, 10), (1, 1, 0), (-1, 1, 10), (1, math.inf, 10), (math.nan, 1, 10)]:
        with pytest.raises(ValueError):
            limiter.take("k", cost, rate, burst)
    with pytest.raises(ValueError):
        MemoryRateLimiter(Clock(), max_keys=0)


def test_memory_is_bounded():
    clock = Clock()
    limiter = MemoryRateLimiter(clock, max_keys=3)
    take(limiter, "idle", cost=1)  # full again after 0.5 s
    clock.advance(1)
    for i in range(3):
        take(limiter, f"k{i}", cost=10)
    assert len(limiter) == 3 and limiter.evictions == 0  # "idle" was full, so dropped, not evicted
    take(limiter, "k0")  # k0 becomes the most recently used: k1 is the least
    take(limiter, "k3", cost=10)
    assert len(limiter) == 3 and limiter.evictions == 1
    assert take(limiter, "k1", cost=10).allowed  # forgotten, so a fresh burst (the documented price)
    assert not take(limiter, "k0").allowed and not take(limiter, "k3").allowed
    clock.advance(5)  # every bucket is full again: the next take sweeps them all
    take(limiter, "k9", cost=0)
    assert len(limiter) == 0
    assert fired(limiter.close()) is None


@settings(max_examples=300, deadline=None)
@given(rate=st.floats(0.1, 1000), burst=st.floats(0.5, 100),
       steps=st.lists(st.tuples(st.floats(0, 2), st.floats(0, 30)), max_size=60))
def test_memory_never_allows_more_than_burst_plus_refill(rate, burst, steps):
    """At most burst + rate x elapsed in total (the burst being the largest cost allowed when a
    request cost more), and waiting ``retry_after`` is always enough."""
    clock = Clock()
    clock.advance(1.7e9)  # epoch-sized times, as on a real reactor
    limiter = MemoryRateLimiter(clock)
    started, taken, largest = clock.seconds(), 0.0, burst
    for advance, cost in steps:
        clock.advance(advance)
        decision = take(limiter, cost=cost, rate=rate, burst=burst)
        if not decision.allowed:
            assert 0 < decision.retry_after < math.inf
            clock.advance(decision.retry_after)
            decision = take(limiter, cost=cost, rate=rate, burst=burst)
        assert decision.allowed and decision.retry_after == 0
        taken, largest = taken + cost, max(largest, cost)
        assert taken <= largest + rate * (clock.seconds() - started + EARLY) + 1e-9


# -- RedisRateLimiter


@pytest_twisted.async_yield_fixture
async def redis_limiters():
    """Make RedisRateLimiters; every one is closed at the end of the test."""
    made: list[RedisRateLimiter] = []

    def make(url: str, **options) -> RedisRateLimiter:
        made.append(RedisRateLimiter(url, reactor, **options))
        return made[-1]

    yield make
    for limiter in made:
        await limiter.close()


@pytest_twisted.ensureDeferred
async def test_redis_provides_the_interface(redis_server, redis_limiters):
    assert verifyObject(IRateLimiter, redis_limiters(redis_server.url))


@pytest_twisted.ensureDeferred
async def test_redis_two_gateways_share_one_limit(redis_server, redis_limiters):
    gateways = [redis_limiters(redis_server.url), redis_limiters(redis_server.url)]
    rate = 0.001  # one token per 1000 s: no refill during the test
    decisions = [await bounded(gateways[i % 2].take("ip:1.2.3.4", 1, rate, 5)) for i in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [round(d.remaining, 3) for d in decisions[:5]] == [4, 3, 2, 1, 0]
    assert 999 < decisions[5].retry_after <= 1000 and decisions[5].remaining < 0.001
    assert (await bounded(gateways[0].take("ip:1.2.3.5", 5, rate, 5))).allowed  # another client
    refused = await bounded(gateways[1].take("ip:1.2.3.4", 6, rate, 5))
    assert 4999 < refused.retry_after <= 5000  # more than the burst: when the bucket is full
    assert [(g.allowed, g.limited, g.errors, g.failed_open) for g in gateways] == [(4, 0, 0, 0), (2, 2, 0, 0)]
    # A request above the burst takes a full bucket into debt, in Redis as in memory.
    assert (await bounded(gateways[0].take("ip:1.2.3.6", 7, 10, 5))).allowed
    debt = await bounded(gateways[1].take("ip:1.2.3.6", 1, 10, 5))  # 2 tokens owed, then 1
    assert not debt.allowed and 0.25 < debt.retry_after <= 0.3


@pytest_twisted.ensureDeferred
async def test_redis_refills_and_expires(redis_server, redis_limiters):
    limiter = redis_limiters(redis_server.url)
    assert (await bounded(limiter.take("ip:1.2.3.4", 2, 10, 2))).allowed
    refused = await bounded(limiter.take("ip:1.2.3.4", 1, 10, 2))
    assert not refused.allowed and 0 < refused.retry_after <= 0.1
    # The key lives until the bucket is full again (0.2 s), and not a moment longer.
    key = KEY_PREFIX + b"ip:1.2.3.4"
    assert 0 < int(resp(redis_server.port, "PTTL", key)[1:]) <= 200
    await pause(refused.retry_after + 0.01)
    assert (await bounded(limiter.take("ip:1.2.3.4", 1, 10, 2))).allowed
    await pause(0.25)
    assert resp(redis_server.port, "EXISTS", key) == b":0\r\n"
    assert (await bounded(limiter.take("ip:1.2.3.4", 2, 10, 2))).allowed  # a full burst again
    assert limiter.errors == 0


@pytest_twisted.ensureDeferred
async def test_redis_reloads_a_flushed_script(redis_server, redis_limiters):
    limiter = redis_limiters(redis_server.url)
    assert (await bounded(limiter.take("k", 1, 1, 3))).remaining == pytest.approx(2)
    assert resp(redis_server.port, "SCRIPT", "FLUSH") == b"+OK\r\n"  # as after a Redis restart
    assert (await bounded(limiter.take("k", 1, 1, 3))).remaining == pytest.approx(1, abs=0.01)
    assert limiter.errors == 0 and limiter.allowed == 2


class LogCapture:
    """The rate limiter's log events during a test."""

    def __init__(self):
        self.events: list[dict] = []

    def __enter__(self) -> Self:
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *_) -> None:
        globalLogPublisher.removeObserver(self.events.append)

    def ours(self, level: LogLevel) -> list[dict]:
        return [e for e in self.events
                if e.get("log_namespace") == "sentinel_proxy.stores.redis_link" and e.get("role") == "Redis rate limiter"
                and e["log_level"] is level]


@pytest_twisted.ensureDeferred
async def test_redis_outage_fails_open_and_recovers(redis_server, redis_limiters):
    secret = "key:5ecret-api-key"
    with LogCapture() as captured:
        limiter = redis_limiters(redis_server.url, timeout=0.05, retry_interval=0.2)
        assert (await bounded(limiter.take(secret, 1, 0.001, 1))).allowed
        assert not (await bounded(limiter.take(secret, 1, 0.001, 1))).allowed

        redis_server.kill()
        started = reactor.seconds()
        decisions = await bounded(defer.gatherResults([limiter.take(secret, 1, 0.001, 1) for _ in range(20)]))
        assert reactor.seconds() - started < 0.05 + 0.25
        assert decisions == [Decision(True, 0.0, 0.0)] * 20  # fail open
        assert limiter.errors >= 1 and limiter.failed_open == 20

        # Skipped at once while the breaker is open, probed again every retry interval.
        for _ in range(4):
            started = reactor.seconds()
            assert (await bounded(limiter.take(secret, 1, 0.001, 1))).allowed
            assert reactor.seconds() - started < 0.05 + 0.25
            await pause(0.1)
        assert limiter.errors >= 2

        redis_server.start()  # same port, empty
        deadline = reactor.seconds() + 12.0
        while True:
            before = limiter.failed_open
            await bounded(limiter.take(secret, 1, 0.001, 1))
            if limiter.failed_open == before:  # Redis decided
                break
            assert reactor.seconds() < deadline, "the Redis rate limiter did not recover within 12 s"
            await pause(0.1)
        assert not (await bounded(limiter.take(secret, 1, 0.001, 1))).allowed  # limiting again

    warnings = captured.ours(LogLevel.warn)
    assert len(warnings) == 1, "an outage must be reported once, not once per failed call"
    assert warnings[0]["address"] == redis_server.url and warnings[0]["failures"] >= 1
    assert [formatEvent(e) for e in captured.ours(LogLevel.info)] == [
        f"Redis rate limiter {redis_server.url} reachable again"]
    for event in captured.events:  # no key in any event, Twisted's and txredisapi's included
        assert "5ecret" not in formatEvent(event) and "5ecret" not in repr(event)


@pytest_twisted.ensureDeferred
async def test_redis_hung_fails_open_within_the_timeout(redis_server, redis_limiters):
    """A Redis that accepts and never answers (stopped, swapping, partitioned): the timeout decides."""
    limiter = redis_limiters(redis_server.url, timeout=0.05)
    assert (await bounded(limiter.take("k", 1, 0.001, 1))).allowed
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        with LogCapture() as captured:
            started = reactor.seconds()
            assert (await bounded(limiter.take("k", 1, 0.001, 1))).allowed
            assert 0.05 <= reactor.seconds() - started < 0.05 + 0.25
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    assert limiter.errors == 1 and limiter.failed_open == 1
    [warning] = captured.ours(LogLevel.warn)
    assert warning["reason"] == "no answer within 50 ms"


@pytest_twisted.ensureDeferred
async def test_redis_error_reply_fails_open_without_the_key(redis_server, redis_limiters):
    key = "key:5ecret-api-key"
    resp(redis_server.port, "RPUSH", KEY_PREFIX + key.encode(), "x")  # not a bucket: WRONGTYPE
    with LogCapture() as captured:
        limiter = redis_limiters(redis_server.url)
        assert (await bounded(limiter.take(key, 1, 1, 1))).allowed
    assert (limiter.errors, limiter.failed_open) == (1, 1)
    [warning] = captured.ours(LogLevel.warn)
    assert "WRONGTYPE" in formatEvent(warning)
    assert all("5ecret" not in formatEvent(e) and "5ecret" not in repr(e) for e in captured.events)


@pytest_twisted.ensureDeferred
async def test_redis_never_started_fails_open(redis_limiters):
    limiter = redis_limiters(f"redis://127.0.0.1:{free_port()}/0", timeout=0.05)
    assert (await bounded(limiter.take("k", 1, 1, 1))).allowed
    assert limiter.errors == 1 and limiter.failed_open == 1


@pytest_twisted.ensureDeferred
async def test_redis_after_close_fails_open(redis_server, redis_limiters):
    limiter = redis_limiters(redis_server.url)
    assert (await bounded(limiter.take("k", 1, 0.001, 1))).allowed
    await bounded(limiter.close())
    assert (await bounded(limiter.take("k", 1, 0.001, 1))).allowed
    assert limiter.failed_open == 1 and limiter.errors == 0
    assert await bounded(limiter.close()) is None
