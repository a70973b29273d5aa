"""Background checks that write backend state: readiness (HealthService) and integrity.

Each is a ``TimerService`` with an injectable clock, checks every backend concurrently, and
catches every failure itself: an unhandled error would stop a ``LoopingCall`` for good, and a
gateway whose checks silently stopped keeps routing on stale state.
"""
from __future__ import annotations

from typing import Any, Iterable

from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .backends import Backend, BackendPool
from .integrity import IntegrityInputError, IntegrityParams, analyse
from .logs import observer
from .upstream import RpcCallError, UpstreamClient, UpstreamError

log = Logger(observer=observer)

CHECK_ERRORS = (UpstreamError, RpcCallError, IntegrityInputError)


def block_number_of(result: Any) -> int:
    """node_getBlockNumber answers a number; older nodes and proxies may send a numeric string."""
    if isinstance(result, bool):
        raise RpcCallError(f"node_getBlockNumber: not a number: {result!r}")
    if isinstance(result, int) and result >= 0:
        return result
    if isinstance(result, str) and result.isdigit():
        return int(result)
    raise RpcCallError(f"node_getBlockNumber: not a number: {result!r:.80}")


class PeriodicCheck(TimerService):
    """Runs :meth:`check` for the backends :meth:`targets` selects, all at once, every ``interval``."""

    name_of_check = "check"

    def __init__(self, pool: BackendPool, upstream: UpstreamClient, interval: float, timeout: float,
                 clock: IReactorTime):
        super().__init__(interval, self.run_once)
        self.clock = clock
        self._pool = pool
        self._upstream = upstream
        self._timeout = timeout
        self._round: defer.Deferred[Any] | None = None

    def targets(self) -> Iterable[Backend]:
        return self._pool.backends

    async def check(self, backend: Backend) -> None:
        raise NotImplementedError

    async def _guarded(self, backend: Backend) -> None:
        try:
            await self.check(backend)
        except defer.CancelledError:
            raise
        except Exception:  # a bug in one check must not stop the loop or the other checks
            log.failure("{check} of {backend} crashed", check=self.name_of_check, backend=backend.name)

    def run_once(self) -> defer.Deferred[Any]:
        """One round over the targets; the returned Deferred never fails."""
        checks = [defer.Deferred.fromCoroutine(self._guarded(b)) for b in self.targets()]
        self._round = defer.DeferredList(checks, consumeErrors=True)
        return self._round

    def stopService(self) -> defer.Deferred[None]:
        # A check can wait up to REQUEST_TIMEOUT_MS on a hanging node: do not let it delay shutdown.
        if self._round is not None and not self._round.called:
            self._round.cancel()
        return super().stopService()


class HealthService(PeriodicCheck):
    """The prototype's readiness check: node_isReady, then node_getBlockNumber."""

    name_of_check = "health check"

    async def check(self, backend: Backend) -> None:
        started = self.clock.seconds()
        try:
            ready = await self._upstream.call(backend, "node_isReady", [], self._timeout)
            if ready is not True:
                raise RpcCallError(f"node_isReady answered {ready!r:.40}")
            block = block_number_of(await self._upstream.call(backend, "node_getBlockNumber", [], self._timeout))
        except CHECK_ERRORS as exc:
            if backend.healthy or backend.last_check is None:
                log.warn("backend {backend} is unhealthy: {reason}", backend=backend.name, reason=str(exc))
            self._pool.record_health(backend, False, self.clock.seconds(), error=str(exc))
            return
        now = self.clock.seconds()
        if not backend.healthy:
            log.info("backend {backend} is healthy at block {block}", backend=backend.name, block=block)
        self._pool.record_health(backend, True, now, block_number=block, latency_ms=(now - started) * 1000.0)


class IntegrityService(PeriodicCheck):
    """Fetches node_getValidatorsStats and records the analyser's verdict and the node type."""

    name_of_check = "integrity check"

    def __init__(self, pool: BackendPool, upstream: UpstreamClient, interval: float, timeout: float,
                 clock: IReactorTime, params: IntegrityParams):
        super().__init__(pool, upstream, interval, timeout, clock)
        self._params = params

    def targets(self) -> Iterable[Backend]:
        # Unchecked backends are included so the first round, which runs together with the first
        # health check at start, does not leave every node without a type for a whole interval.
        return [b for b in self._pool.backends if not b.checked_down]

    async def check(self, backend: Backend) -> None:
        try:
            stats = await self._upstream.call(backend, "node_getValidatorsStats", [], self._timeout)
            verdict = analyse(stats, self._params)
        except CHECK_ERRORS as exc:
            log.warn("integrity check of {backend} failed: {reason}", backend=backend.name, reason=str(exc))
            return
        previous = backend.verdict.status if backend.verdict else None
        self._pool.record_integrity(backend, verdict)
        if verdict.status != previous:
            log.info("backend {backend} integrity {status} (score {score}, type {node_type})",
                     backend=backend.name, status=verdict.status, score=verdict.score,
                     node_type=verdict.node_type or "unknown")

