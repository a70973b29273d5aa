"""The fleet in a running gateway: probe while holding the lease, else follow the prober's verdicts.

Every :data:`TICK` (at most a third of the lease's TTL) one round trips to Redis: the prober renews
its lease and publishes its verdicts when they changed; any other instance tries to take the lease
and otherwise applies the published verdicts. Both then write this instance's new drains, and
apply the fleet's drains and the breaker openings of the others. An opening made here is written at
once, with the breaker's cooldown as its expiry.

When a round fails (Redis down, slow, or refusing), the instance is *alone*: it runs its own checks
from its last known state, says so once, and retries every :data:`RETRY` seconds; once Redis answers
again it rejoins (takes the lease or follows) and says so once. Drains made meanwhile stay local
and are written when it is back; an opening made meanwhile is not (it would expire soon anyway).
The request path never waits on any of this: it reads the local pool.
"""
from __future__ import annotations

import os
import secrets
import socket
from typing import Any, Callable, Sequence

from twisted.application.service import IService, Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from sentinel_proxy.core.scoring import OPEN
from sentinel_proxy.fleet import codec
from sentinel_proxy.fleet.store import FleetStore, Lease, Reading
from sentinel_proxy.ops.logs import observer
from sentinel_proxy.ops.workers import trip
from sentinel_proxy.state.backends import Backend, BackendPool

log = Logger(observer=observer)

#: Seconds between rounds (shorter when a third of the lease's TTL is shorter).
TICK = 0.5
#: Seconds between attempts to reach Redis while it is down.
RETRY = 1.0
#: The lease's TTL in health check intervals, and its floor in seconds: a dead prober's lease
#: expires, and a follower takes it at its next round, within two check intervals.
TTL_INTERVALS = 1.5
MIN_TTL = 1.5


def instance_id() -> str:
    """Unique per process and per start: a restarted gateway with the same pid is another instance."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class FleetService(Service):
    def __init__(self, pool: BackendPool, checks: Sequence[IService], store: FleetStore, clock: IReactorTime,
                 interval: Callable[[], float], cooldown: Callable[[], float], instance: str | None = None,
                 close: Callable[[], defer.Deferred[Any]] | None = None):
        """``interval``: the health check interval (s), ``cooldown``: the breaker cooldown (s), both
        getters since a reload changes them; ``close``: disconnects from Redis at the end."""
        self._pool = pool
        self._checks = checks
        self._store = store
        self._clock = clock
        self._interval = interval
        self._cooldown = cooldown
        self._close = close
        self.instance = instance or instance_id()
        #: This instance's lease while it is the prober.
        self.lease: Lease | None = None
        #: The lease as last seen in Redis (anyone's).
        self.holder: Lease | None = None
        #: None before the first round, then whether the last round reached Redis.
        self.redis_ok: bool | None = None
        self._retry_at = 0.0
        self._seen = ""  # the publication last applied or made here
        self._token = 0  # the newest token whose verdicts were applied here
        self._published: bytes | None = None
        #: Each node's drain as the fleet last had it: a local difference is this instance's to write.
        self._known: dict[str, bool] = {}
        #: The openings in force in the fleet, as last read: each is applied once.
        self._openings: dict[str, str] = {}
        self._opened = 0
        self._applying = False
        self._round: defer.Deferred[None] | None = None
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = clock

    @property
    def role(self) -> str:
        if self.lease is not None:
            return "prober"
        return "follower" if self.redis_ok else "alone"

    def view(self) -> dict[str, Any]:
        """/health's ``fleet``: who probes for this instance's verdicts."""
        prober = self.instance if self.role != "follower" else (self.holder.holder if self.holder else None)
        token = self.lease.token if self.lease else (self.holder.token if self.holder else self._token)
        return {"prober": prober, "this": self.instance, "role": self.role,
                "redis": "ok" if self.redis_ok else "down", "token": token}

    def ttl(self) -> float:
        return max(MIN_TTL, TTL_INTERVALS * self._interval())

    def startService(self) -> None:
        super().startService()
        self._loop.start(min(TICK, self.ttl() / 3), now=True)

    async def _stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self._round is not None:
            self._round.cancel()
        self._stop_checks()
        if self.lease is not None:
            try:
                await self._store.release(self.lease)  # the next prober need not wait for the TTL
            except Exception:
                pass  # it expires
            self.lease = None
        if self._close is not None:
            await self._close()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    # ------------------------------------------------------------------ the round

    def tick(self) -> defer.Deferred[None] | None:
        """Start a round unless one is still running or Redis is being left alone."""
        if (self._round is not None and not self._round.called) or self._clock.seconds() < self._retry_at:
            return None
        self._round = defer.Deferred.fromCoroutine(self._once())
        self._round.addErrback(self._failed)
        return self._round

    async def _once(self) -> None:
        ttl_ms = int(self.ttl() * 1000)
        if self.lease is not None and not await self._store.renew(self.lease, ttl_ms):
            self._lost("its lease expired before it was renewed")
        if self.lease is None:
            self.holder = await self._store.acquire(self.instance, ttl_ms)
            if self.holder is not None and self.holder.holder == self.instance:
                self._lead(self.holder)
        if self.lease is not None:
            self.holder = self.lease
            await self._publish()
        await self._write_drains()
        ids = [codec.node_id(b.url) for b in self._pool.backends]
        reading = await self._store.read(self._seen, ids)
        self._reached()
        self._apply(reading)
        self._pool.fleet = self.view()

    def _lead(self, lease: Lease) -> None:
        self.lease = lease
        self._published = None
        log.info("shared state: this gateway ({instance}) now probes the nodes for the fleet (token {token})",
                 instance=self.instance, token=lease.token)
        self._start_checks()

    def _lost(self, why: str) -> None:
        log.info("shared state: this gateway ({instance}) no longer probes: {why}", instance=self.instance, why=why)
        self.lease = None
        self._stop_checks()

    async def _publish(self) -> None:
        assert self.lease is not None
        state = codec.encode(self._pool)
        if state == self._published:
            return
        seq = await self._store.publish(self.lease.token, state)
        if seq is None:
            self._lost("a newer prober holds the fencing token")
            return
        self._published, self._seen, self._token = state, seq, self.lease.token

    async def _write_drains(self) -> None:
        for backend in self._pool.backends:
            node = codec.node_id(backend.url)
            if backend.drained != self._known.get(node, False):
                drained = backend.drained
                await self._store.drain(node, drained)
                self._known[node] = drained

    def _apply(self, reading: Reading) -> None:
        if self.lease is None:
            self.holder = reading.lease
            self._stop_checks()
            if reading.state is not None:
                self._apply_state(reading)
        for backend in self._pool.backends:
            node = codec.node_id(backend.url)
            if backend.drained != self._known.get(node, False):
                continue  # drained or undrained here since the last write: the next round writes it
            drained = node in reading.drained
            if backend.drained != drained:
                self._pool.drain(backend, drained)
            self._known[node] = drained
        self._take_openings(reading.opened)

    def _apply_state(self, reading: Reading) -> None:
        self._seen = reading.seq
        if reading.token < self._token:
            log.warn("shared state: ignored verdicts published under token {token}, older than {newest}",
                     token=reading.token, newest=self._token)
            return
        try:
            snapshot = codec.decode(reading.state or b"", self._pool)
        except codec.SnapshotError as exc:
            log.warn("shared state: cannot apply the prober's verdicts: {reason}", reason=str(exc))
            return
        self._token = reading.token
        self._pool.apply(snapshot)

    def _take_openings(self, opened: dict[str, str]) -> None:
        mine = f"{self.instance}#"
        by_id = {codec.node_id(b.url): b for b in self._pool.backends}
        for node, value in opened.items():
            backend = by_id.get(node)
            if self._openings.get(node) != value and not value.startswith(mine) and backend is not None:
                self._applying = True
                try:
                    trip(backend.breaker, self._clock.seconds())
                finally:
                    self._applying = False
        self._openings = dict(opened)

    # ------------------------------------------------------------------ openings made here

    def breaker_changed(self, backend: Backend, state: str) -> None:
        """Every breaker transition here (BackendPool.on_breaker_change): an opening that did not
        come from the fleet goes to it at once."""
        if state != OPEN or self._applying or not self.redis_ok:
            return
        self._opened += 1
        value = f"{self.instance}#{self._opened}"
        node = codec.node_id(backend.url)
        sent = defer.Deferred.fromCoroutine(
            self._store.opened(node, value, max(1, int(self._cooldown() * 1000))))
        sent.addErrback(self._failed)

    # ------------------------------------------------------------------ Redis up and down

    def _reached(self) -> None:
        if self.redis_ok is False:
            log.info("shared state: Redis is back; this gateway rejoins the fleet as {role}", role=self.role)
        self.redis_ok = True

    def _failed(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError) and not self.running:
            return
        self._retry_at = self._clock.seconds() + RETRY
        if self.redis_ok is not False:
            log.warn("shared state: Redis unreachable ({reason}); this gateway runs its own checks on its last "
                     "known state until it is back", reason=failure.getErrorMessage() or failure.type.__name__)
        self.redis_ok = False
        self.lease = None
        self._seen = ""  # take the fleet's verdicts at once when back
        self._pool.fleet = self.view()
        if self.running:
            self._start_checks()

    def _start_checks(self) -> None:
        for check in self._checks:
            if not check.running:
                check.startService()

    def _stop_checks(self) -> None:
        for check in self._checks:
            if check.running:
                check.stopService()
