"""Rate limiting: per-method request costs, the client's address, and token buckets in memory or
in Redis.

Every client (an IP address or an API key; the caller builds the opaque key) has a token bucket:
``burst`` tokens at most, refilled at ``rate`` tokens per second; a request takes as many tokens
as its calls cost (:func:`request_cost`). A bucket is kept in its GCRA form, as the one time at
which it will be full again (its "theoretical arrival time", TAT): one number per client, a bucket
that is full is simply absent, and in Redis the key's expiry is exactly that time, so an idle
client costs nothing anywhere. The two forms are the same algorithm: ``tokens = burst - (TAT -
now) * rate``.

A limiter must never make the gateway fail: the Redis limiter fails open (allows) when Redis is
slow or down, and says so in its counters and, at most once a minute, in the log.

This module imports no Redis client at import time (importing txredisapi installs the default
reactor), so the configuration can validate :func:`parse_trusted_proxies` before a reactor is
chosen; :class:`RedisRateLimiter` imports it when it is built.
"""
from __future__ import annotations

import functools
import hashlib
import ipaddress
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sentinel_proxy.core import methods as method_table
from sentinel_proxy.interfaces import IRateLimiter

from sentinel_proxy.ops.logs import observer

log = Logger(observer=observer)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# -- Costs

#: Tokens one call of a method takes; any other method takes 1. The weights follow what a call
#: costs the node and the gateway (answer size, work per call), not what it is worth to a client;
#: docs/rate-limiting.md explains each row.
#: Every wire name of the method table (core/methods.py) that costs more than 1.
DEFAULT_COSTS: Mapping[str, float] = MappingProxyType({
    name: method_table.cost(name) for name in method_table.full_names() if method_table.cost(name) != 1.0})


def request_cost(methods: Iterable[str], costs: Mapping[str, float] = DEFAULT_COSTS) -> float:
    """The tokens a request takes: the sum of its calls' costs (a batch is charged per call, so
    splitting work into batches buys nothing); a method missing from ``costs`` costs 1, or its
    row's cost in the method table for the default costs (``node_sendTx_x`` is a ``sendTx``)."""
    if costs is DEFAULT_COSTS:
        return float(sum(costs.get(method) or method_table.cost(method) for method in methods))
    return float(sum(costs.get(method, 1.0) for method in methods))


# -- The client's address


def parse_trusted_proxies(raw: str) -> tuple[Network, ...]:
    """TRUSTED_PROXIES: comma-separated IP addresses or CIDR networks (``10.0.0.1``, ``10.0.0.0/8``,
    ``fd00::/8``); empty means no proxy is trusted. Host bits in a network (``10.0.0.1/8``) are
    refused rather than guessed at: in a setting that decides who may claim any address, a typo
    must stop the start."""
    networks = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item))
        except ValueError as exc:
            raise ValueError(
                f"{item!r} is not an IP address or a CIDR network such as 10.0.0.0/8 ({exc})") from None
    return tuple(networks)


@functools.lru_cache(maxsize=4096)
def _address(text: str) -> Address | None:
    """An address, IPv4-mapped IPv6 (``::ffff:1.2.3.4``, what a dual-stack socket reports) folded to
    IPv4 so one client has one bucket and matches IPv4 networks; None when ``text`` is not one.

    Cached: parsing costs 1.5 to 4 µs and the same few addresses (the load balancer's, busy
    clients') come back on every request; a miss costs the same as no cache.
    """
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _hop(text: str) -> Address | None:
    """One X-Forwarded-For entry: an address, ``[v6]``, ``[v6]:port`` or ``v4:port`` (some proxies
    add the port); None for anything else (``unknown``, obfuscated names, garbage). Longer entries
    are refused unparsed, so a client inside a trusted network cannot fill the address cache with
    kilobytes of junk (an address with brackets and port is at most 53 characters)."""
    text = text.strip()
    if len(text) > 64:
        return None
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1:]
        if end < 0 or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        return _address(text[1:end])
    if text.count(":") == 1:
        host, port = text.split(":")
        address = _address(host) if port.isdigit() else None
        return address if address is not None and address.version == 4 else None
    return _address(text)


def _is_trusted(address: Address, trusted: Sequence[Network]) -> bool:
    return any(address in network for network in trusted)


def client_ip(peer: str, forwarded_for: list[bytes] | None, trusted: Sequence[Network]) -> str:
    """The address a request is charged to.

    ``peer`` is the connection's address; ``forwarded_for`` the raw ``X-Forwarded-For`` header
    values (several headers are one comma-separated list). The header is believed only as far as
    trusted proxies vouch for it: each proxy appends the address it saw, so the list is walked
    from the right, past trusted proxies, and the first untrusted entry is the client. Entries to
    its left were written by the client itself and are ignored (anyone can send a forged header).
    A malformed entry stops the walk at the last trusted hop; if every entry is trusted the
    leftmost one is the client. The result is a normalised address (IPv6 compressed,
    IPv4-mapped folded to IPv4); a peer that is no IP address (a UNIX socket) is returned as is.
    """
    address = _address(peer)
    if address is None:
        return peer
    if not forwarded_for or not _is_trusted(address, trusted):
        return str(address)
    for entry in reversed(b",".join(forwarded_for).decode("latin-1").split(",")):
        hop = _hop(entry)
        if hop is None:
            break
        address = hop
        if not _is_trusted(address, trusted):
            break
    return str(address)


# -- Buckets


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer for one request.

    ``retry_after``: seconds until the same request would be allowed (0 when allowed); always
    finite, also for a request that costs more than the burst (see :func:`_gcra`).
    ``remaining``: the tokens left in the bucket, after this request when it was allowed.
    """

    allowed: bool
    retry_after: float
    remaining: float



#: Seconds a take may come early and still be allowed. A client that waits exactly
#: ``retry_after`` must get through, but clocks are floats: near the epoch (1.7e9 s) they tick in
#: 0.24 µs steps, so the wait can come out a fraction of a microsecond short. Nothing is given
#: away: the bucket records the debt. Redis's clock (µs) gets the same allowance.
EARLY = 1e-6


def _check(cost: float, rate: float, burst: float) -> None:
    if not (0 < rate < math.inf and 0 < burst < math.inf and 0 <= cost < math.inf):
        raise ValueError(f"invalid rate limit: cost={cost!r} rate={rate!r} burst={burst!r} "
                         "(rate and burst must be positive, cost not negative, all finite)")


def _gcra(now: float, tat: float, cost: float, rate: float, burst: float) -> tuple[Decision, float]:
    """The decision for a take at ``now`` on a bucket full again at ``tat`` (>= now), and the
    bucket's new TAT. This is the reference the Lua script in :data:`SCRIPT` mirrors.

    A request that costs more than the burst needs a full bucket and leaves it in debt (the
    client then waits until the debt is refilled): refusing it for ever would lock out clients
    that cannot choose their batches (the Aztec client merges every call of a tick into one batch
    of up to 100), and the long-run rate still holds. Over any stretch of time at most
    ``max(burst, largest cost) + rate * (elapsed + EARLY)`` tokens are allowed.
    """
    tokens = burst - (tat - now) * rate
    wait = (min(cost, burst) - tokens) / rate  # until the bucket holds the cost, or is full
    if wait > EARLY:
        return Decision(False, wait, max(0.0, tokens)), tat
    new_tat = tat + cost / rate
    return Decision(True, 0.0, max(0.0, burst - (new_tat - now) * rate)), new_tat


@implementer(IRateLimiter)
class MemoryRateLimiter:
    """Buckets in this process: one float per client that is not at full burst, O(1) per take.
    One process only: with --workers each worker would allow the whole rate, so config.py refuses
    it there (Redis holds one set of buckets for them all).

    Memory is bounded twice. Buckets are kept in least-recently-used order, and each take drops
    the least recently used ones that have refilled completely (a full bucket is the same as no
    bucket: exact, not an approximation), which is amortised O(1) since each bucket is dropped at
    most once per insertion. And at most ``max_keys`` are kept: beyond that the least recently used
    bucket is forgotten even though not yet full (counted in ``evictions``), which gives that
    client a fresh burst. Only a flood of more than ``max_keys`` distinct clients within one refill
    time can cause that; a bucket costs about 180 bytes with an ``ip:`` key (100,000 ≈ 18 MB).
    """

    errors = 0  # the same counters as RedisRateLimiter; memory cannot fail

    def __init__(self, clock: IReactorTime, max_keys: int = 100_000):
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, not {max_keys}")
        self._clock = clock
        self.max_keys = max_keys
        # Times are kept relative to the creation of the limiter, not the epoch: near 1.7e9 s a
        # float resolves only 0.24 µs, and every cost / rate added to a TAT would be rounded to
        # that: a systematic error growing with the rate (0.012 % of each token at 1000 tokens/s).
        self._origin = clock.seconds()
        self._buckets: OrderedDict[str, float] = OrderedDict()  # key -> TAT; least recent first
        self.allowed = 0
        self.limited = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, cost: float, rate: float, burst: float) -> Deferred:
        _check(cost, rate, burst)
        now = self._clock.seconds() - self._origin
        buckets = self._buckets
        tat = buckets.get(key, now)
        decision, new_tat = _gcra(now, max(tat, now), cost, rate, burst)
        if decision.allowed:
            self.allowed += 1
            if new_tat > now:
                buckets[key] = new_tat
                buckets.move_to_end(key)
            else:
                buckets.pop(key, None)
        else:
            self.limited += 1
            if key in buckets:
                buckets.move_to_end(key)
        while buckets and next(iter(buckets.values())) <= now:
            buckets.popitem(last=False)
        if len(buckets) > self.max_keys:
            buckets.popitem(last=False)
            self.evictions += 1
        return succeed(decision)

    def close(self) -> Deferred:
        self._buckets.clear()
        return succeed(None)


#: Prefix of every bucket key in Redis: the limiter can share a Redis (and a database) with the
#: response cache and other gateways' limiters; the version tag changes with the stored format.
KEY_PREFIX = b"sentinel:rl:v1:"

#: :func:`_gcra` in Lua, run atomically by Redis. The clock is Redis's own (TIME, in µs, exact in a
#: double), so gateways with skewed clocks still share one bucket; this needs Redis 5 or newer
#: (commands after TIME in a script). The value is the TAT in µs; the key expires when the bucket
#: is full again. Numbers go back as strings: Redis truncates Lua numbers to integers.
SCRIPT = """
local cost, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or 0), now)
local tokens = burst - (tat - now) / 1e6 * rate
local wait = (math.min(cost, burst) - tokens) / rate
if wait > %(early)r then
  return {0, tostring(math.max(0, tokens)), tostring(wait)}
end
local new_tat = tat + cost / rate * 1e6
local ttl_ms = math.max(1, math.ceil((new_tat - now) / 1000))
redis.call('SET', KEYS[1], string.format('%%.17g', new_tat), 'PX', ttl_ms)
return {1, tostring(math.max(0, burst - (new_tat - now) / 1e6 * rate)), '0'}
""" % {"early": EARLY}
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()


@implementer(IRateLimiter)
class RedisRateLimiter:
    """Buckets in Redis, shared by every gateway that uses the same Redis and prefix.

    One EVALSHA per take (EVAL when Redis does not know the script yet, e.g. after a restart or
    SCRIPT FLUSH), cut off after ``timeout`` seconds. Any failure — Redis down, slow, refusing,
    an unexpected reply — allows the request (fail open: a limiter outage must not become a
    gateway outage), counts in ``errors`` and stops calls to Redis for ``retry_interval`` seconds
    (during which takes are decided at once; see :meth:`_fail_open`), then one take probes it
    again, as :class:`~sentinel_proxy.stores.cache.RedisCache` does and for the same reasons. An outage
    is logged once per ``log_interval``, without keys: they may hold API keys.

    Counters: ``allowed`` and ``limited`` (decisions, whoever made them), ``errors`` (failed Redis
    calls) and ``failed_open`` (decisions made without Redis).
    """

    def __init__(self, url: str, reactor: IReactorTime, timeout: float = 0.05, *,
                 prefix: bytes = KEY_PREFIX, poolsize: int = 2, retry_interval: float = 1.0,
                 log_interval: float = 60.0):
        # Imported here, not at the top: txredisapi installs the default reactor (see the module
        # docstring), and sentinel_proxy.stores.redis_link imports it.
        import txredisapi

        from sentinel_proxy.stores.redis_link import RedisLink

        self._link = RedisLink(url, reactor, timeout, role="Redis rate limiter",
                               outage="requests are not rate limited until it answers", poolsize=poolsize,
                               retry_interval=retry_interval, log_interval=log_interval)
        self.address = self._link.address
        self._prefix = prefix
        self._no_script = txredisapi.ScriptDoesNotExist
        self.allowed = 0
        self.limited = 0
        self.failed_open = 0

    @property
    def errors(self) -> int:
        return self._link.errors

    def take(self, key: str, cost: float, rate: float, burst: float) -> Deferred:
        _check(cost, rate, burst)
        if not self._link.usable:
            return succeed(self._fail_open(cost, burst))
        keys = [self._prefix + key.encode()]
        # Sent as exact decimal strings: txredisapi would format floats with 6 decimals.
        args = [repr(float(cost)), repr(float(rate)), repr(float(burst))]
        try:
            sent = self._link.client.evalsha(SCRIPT_SHA, keys, args)
        except Exception:
            sent = fail()
        sent.addErrback(self._load_script, keys, args)
        return self._link.bounded(sent).addCallback(self._decided).addErrback(self._failed, cost, burst)

    def close(self) -> Deferred:
        """Disconnect (within a second at most); later takes fail open. Closing twice is a no-op."""
        return self._link.close()

    def _load_script(self, failure: Failure, keys: list[bytes], args: list[str]) -> Deferred:
        failure.trap(self._no_script)
        return self._link.client.eval(SCRIPT, keys, args)

    def _decided(self, reply: Any) -> Decision:
        allowed, remaining, retry_after = reply
        decision = Decision(allowed == 1, float(retry_after), float(remaining))
        self._link.reachable()
        if decision.allowed:
            self.allowed += 1
        else:
            self.limited += 1
        return decision

    def _fail_open(self, cost: float, burst: float) -> Decision:
        """Decide without Redis: allowed, as from a full bucket."""
        self.failed_open += 1
        self.allowed += 1
        return Decision(True, 0.0, max(0.0, burst - cost))

    def _failed(self, failure: Failure, cost: float, burst: float) -> Decision:
        """Count and log the failure (the link stops calling Redis for a while), and fail open."""
        self._link.failed(failure)
        return self._fail_open(cost, burst)
