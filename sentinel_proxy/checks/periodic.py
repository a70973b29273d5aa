"""Background checks that write backend state: readiness (HealthService) and integrity.

Each is a ``TimerService`` with an injectable clock, checks every backend concurrently, and
catches every failure itself: an unhandled error would stop a ``LoopingCall`` for good, and a
gateway whose checks silently stopped keeps routing on stale state.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from sentinel_proxy.state.backends import Backend, BackendPool
from sentinel_proxy.core.integrity import IntegrityInputError, IntegrityParams, IntegrityVerdict, analyse
from sentinel_proxy.ops.logs import observer
from sentinel_proxy.ops.metrics import Metrics
from sentinel_proxy.upstream.client import (
    RpcCallError,
    UpstreamClient,
    UpstreamError,
    parse_json,
    request_body,
    result_of,
)

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
    #: The ``check`` label of the check metrics.
    metric_name = "check"

    def __init__(self, pool: BackendPool, upstream: UpstreamClient, interval: float, timeout: float,
                 clock: IReactorTime, metrics: Metrics | None = None):
        super().__init__(interval, self.run_once)
        self.clock = clock
        self._pool = pool
        self._upstream = upstream
        self._timeout = timeout
        self._metrics = metrics
        self._round: defer.Deferred[Any] | None = None

    def targets(self) -> Iterable[Backend]:
        return self._pool.backends

    def configure(self, interval: float, timeout: float) -> None:
        """New interval and timeout (SIGHUP): the running loop picks the interval up at its next turn."""
        self.step = interval
        self._timeout = timeout
        loop = getattr(self, "_loop", None)
        if loop is not None:
            loop.interval = interval

    async def check(self, backend: Backend) -> bool:
        """Check one backend and record the result; True when the check succeeded."""
        raise NotImplementedError

    async def _guarded(self, backend: Backend) -> None:
        started = self.clock.seconds()
        ok = False
        try:
            ok = await self.check(backend)
        except defer.CancelledError:
            raise
        except Exception:  # a bug in one check must not stop the loop or the other checks
            log.failure("{check} of {backend} crashed", check=self.name_of_check, backend=backend.name)
        if self._metrics is not None:
            self._metrics.observe_check(self.metric_name, backend.label, self.clock.seconds() - started, ok)

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


def chain_of(info: Any, headers: Headers) -> tuple[str, str] | None:
    """(l1ChainId, rollupVersion) from node_getNodeInfo, else from the ``x-aztec-*`` headers."""
    if isinstance(info, dict) and info.get("l1ChainId") is not None and info.get("rollupVersion") is not None:
        return str(info["l1ChainId"]), str(info["rollupVersion"])
    chain_id = headers.getRawHeaders(b"x-aztec-l1chainid")
    version = headers.getRawHeaders(b"x-aztec-rollupversion")
    if chain_id and version:
        return chain_id[0].decode("latin-1"), version[0].decode("latin-1")
    return None


def oldest_block_of(sync_status: Any) -> int | None:
    """``oldestHistoricBlockNumber`` from node_getWorldStateSyncStatus, when the node offers it."""
    if not isinstance(sync_status, dict):
        return None
    oldest = sync_status.get("oldestHistoricBlockNumber")
    if isinstance(oldest, int) and not isinstance(oldest, bool) and oldest >= 0:
        return oldest
    return None


#: One batch per node and round: readiness and tip decide health (the prototype's check); chain
#: identity, world-state depth and the finality tips (for the cache) come in the same round trip,
#: and may be missing on old nodes.
HEALTH_CALLS: tuple[tuple[str, list[Any]], ...] = (
    ("node_isReady", []), ("node_getBlockNumber", []), ("node_getNodeInfo", []),
    ("node_getWorldStateSyncStatus", []), ("node_getL2Tips", []),
)


class HealthService(PeriodicCheck):
    """Readiness and tip of every node; after each round, lag and chain quarantines are reassessed."""

    name_of_check = "health check"
    metric_name = "health"

    def run_once(self) -> defer.Deferred[Any]:
        return super().run_once().addCallback(lambda _: self._pool.reassess())

    async def check(self, backend: Backend) -> bool:
        started = self.clock.seconds()
        try:
            (ready, block, info, sync_status, tips), headers = await self._upstream.batch(
                backend, HEALTH_CALLS, self._timeout)
            if ready is not True:
                raise ready if isinstance(ready, RpcCallError) else RpcCallError(f"node_isReady answered {ready!r:.40}")
            if isinstance(block, RpcCallError):
                raise block
            block = block_number_of(block)
        except CHECK_ERRORS as exc:
            if backend.healthy or backend.last_check is None:
                log.warn("backend {backend} is unhealthy: {reason}", backend=backend.name, reason=str(exc))
            self._pool.record_health(backend, False, self.clock.seconds(), error=str(exc))
            return False
        now = self.clock.seconds()
        if not backend.healthy:
            log.info("backend {backend} is healthy at block {block}", backend=backend.name, block=block)
        self._pool.record_health(backend, True, now, block_number=block, latency_ms=(now - started) * 1000.0,
                                 chain=chain_of(info, headers), oldest_block=oldest_block_of(sync_status),
                                 tips=None if isinstance(tips, RpcCallError) else tips)
        return True


def judge(body: bytes, params: IntegrityParams) -> IntegrityVerdict:
    """Parse and analyse a node_getValidatorsStats answer (~2 MB on 4.x): run off the reactor thread."""
    return analyse(result_of(STATS_METHOD, parse_json(STATS_METHOD, body)), params)


STATS_METHOD = "node_getValidatorsStats"
Runner = Callable[..., "defer.Deferred[Any]"]


def run_inline(function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(function, *args)


class IntegrityService(PeriodicCheck):
    """Fetches node_getValidatorsStats and records the analyser's verdict and the node type."""

    name_of_check = "integrity check"
    metric_name = "integrity"

    def __init__(self, pool: BackendPool, upstream: UpstreamClient, interval: float, timeout: float,
                 clock: IReactorTime, params: IntegrityParams, runner: Runner = run_inline,
                 metrics: Metrics | None = None):
        super().__init__(pool, upstream, interval, timeout, clock, metrics)
        self._params = params
        self._runner = runner

    def configure(self, interval: float, timeout: float, params: IntegrityParams | None = None) -> None:
        super().configure(interval, timeout)
        if params is not None:
            self._params = params

    def targets(self) -> Iterable[Backend]:
        # Unchecked backends are included so the first round, which runs together with the first
        # health check at start, does not leave every node without a type for a whole interval.
        return [b for b in self._pool.backends if not b.checked_down]

    async def check(self, backend: Backend) -> bool:
        try:
            response = await self._upstream.fetch(backend, request_body(STATS_METHOD, []), self._timeout)
            verdict = await self._runner(judge, response.body, self._params)
        except CHECK_ERRORS as exc:
            log.warn("integrity check of {backend} failed: {reason}", backend=backend.name, reason=str(exc))
            return False
        previous = backend.verdict.status if backend.verdict else None
        self._pool.record_integrity(backend, verdict)
        if verdict.status != previous:
            log.info("backend {backend} integrity {status} (score {score}, type {node_type})",
                     backend=backend.name, status=verdict.status, score=verdict.score,
                     node_type=backend.node_type or "unknown")
        return True
