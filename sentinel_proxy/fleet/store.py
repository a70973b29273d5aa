"""The fleet's Redis protocol: a lease with a fencing token, the prober's verdicts, drains, openings.

Every key lives under ``sentinel-proxy:fleet:<hash of the sorted node URLs>:``, so fleets with other
node lists share a Redis without mixing. Each step is one Lua script or one command, atomic in Redis:

* ``lease``: ``"<token> <instance>"`` with a TTL. :meth:`FleetStore.acquire` sets it only when no
  one holds it, taking the next fencing token (``INCR token``); :meth:`FleetStore.renew` extends it
  only for its holder (compare-and-extend), :meth:`FleetStore.release` deletes it the same way.
* ``state``: the prober's last verdicts (fleet/codec.py), with the token they were published under.
  The publish script refuses a token older than the newest one handed out: a prober that lost its
  lease while paused cannot overwrite its successor's verdicts; readers refuse an older one too.
* ``drains``: a hash, node id -> ``1``, for the drained nodes.
* ``opened:<node id>``: one breaker opening, ``"<instance>#<n>"``, expiring with the cooldown.

Every call is bounded by the link's timeout (stores/redis_link.py): a slow Redis costs a tick of the
fleet service, never a caller.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from sentinel_proxy.stores.redis_link import RedisLink

PREFIX = "sentinel-proxy:fleet:"

_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder then return holder end
local value = redis.call('INCR', KEYS[2]) .. ' ' .. ARGV[1]
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return value
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_PUBLISH = """
if tonumber(ARGV[1]) < tonumber(redis.call('GET', KEYS[1]) or '0') then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[1])
return redis.call('INCR', KEYS[4])
"""
_READ = """
local seq = redis.call('GET', KEYS[2]) or '0'
local blob = ''
if seq ~= ARGV[1] then blob = redis.call('GET', KEYS[4]) or '' end
local opened = {}
if #KEYS > 5 then opened = redis.call('MGET', unpack(KEYS, 6)) end
return {redis.call('GET', KEYS[1]) or '', seq, redis.call('GET', KEYS[3]) or '0', blob,
        redis.call('HGETALL', KEYS[5]), opened}
"""


@dataclass(frozen=True, slots=True)
class Lease:
    token: int
    holder: str

    @classmethod
    def parse(cls, value: bytes | str) -> Lease | None:
        text = value.decode() if isinstance(value, bytes) else value
        token, _, holder = text.partition(" ")
        return cls(int(token), holder) if token.isdigit() and holder else None

    @property
    def value(self) -> str:
        return f"{self.token} {self.holder}"


@dataclass(frozen=True, slots=True)
class Reading:
    """One look at the fleet: who holds the lease, the verdicts if new, drains, openings."""

    lease: Lease | None
    seq: str
    #: The token the verdicts were published under (0: none yet).
    token: int
    #: The verdicts, when ``seq`` differs from the one the reader had seen; else None.
    state: bytes | None
    #: Drained node ids.
    drained: frozenset[str]
    #: Node id -> the opening's value, for the nodes with a breaker opening in force.
    opened: dict[str, str]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class FleetStore:
    def __init__(self, link: RedisLink, fleet: str):
        """``fleet``: fleet/codec.py's ``fleet_id`` of the node list."""
        self._link = link
        self._prefix = f"{PREFIX}{fleet}:"

    def key(self, name: str) -> str:
        return self._prefix + name

    async def _eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self._link.command("eval", script, list(keys), [str(a) if not isinstance(a, bytes) else a
                                                                      for a in args])

    async def acquire(self, instance: str, ttl_ms: int) -> Lease | None:
        """The lease as it is after trying to take it: this instance's with a new token, or the holder's."""
        return Lease.parse(await self._eval(_ACQUIRE, [self.key("lease"), self.key("token")], [instance, ttl_ms]))

    async def renew(self, lease: Lease, ttl_ms: int) -> bool:
        return bool(int(await self._eval(_RENEW, [self.key("lease")], [lease.value, ttl_ms])))

    async def release(self, lease: Lease) -> bool:
        return bool(int(await self._eval(_RELEASE, [self.key("lease")], [lease.value])))

    async def publish(self, token: int, state: bytes) -> str | None:
        """The publication's number (what :meth:`read` compares), or None when a newer token was
        handed out since: the verdicts are not written."""
        written = int(await self._eval(_PUBLISH, [self.key("token"), self.key("state"), self.key("state-token"),
                                                  self.key("seq")], [token, state]))
        return str(written) if written > 0 else None

    async def read(self, seen: str, nodes: Sequence[str]) -> Reading:
        """The fleet's state; the verdicts only when they changed since publication ``seen``."""
        keys = [self.key(name) for name in ("lease", "seq", "state-token", "state", "drains")]
        keys += [self.key(f"opened:{node}") for node in nodes]
        lease, seq, token, state, drains, opened = await self._eval(_READ, keys, [seen])
        pairs = [_text(item) for item in drains]
        return Reading(Lease.parse(lease) if lease else None, _text(seq), int(_text(token)), state or None,
                       frozenset(pairs[0::2]),
                       {node: _text(value) for node, value in zip(nodes, opened) if value})

    async def drain(self, node: str, drained: bool) -> None:
        if drained:
            await self._link.command("hset", self.key("drains"), node, "1")
        else:
            await self._link.command("hdel", self.key("drains"), node)

    async def opened(self, node: str, value: str, ttl_ms: int) -> None:
        await self._link.command("set", self.key(f"opened:{node}"), value, pexpire=ttl_ms)
