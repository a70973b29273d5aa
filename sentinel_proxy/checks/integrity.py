"""The integrity check: each node's validator stats, judged by the analyser off the reactor thread."""
from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sentinel_proxy.checks.client import NODE_ERRORS, parse_json, request_body, result_of
from sentinel_proxy.checks.periodic import PeriodicCheck
from sentinel_proxy.core.integrity import IntegrityInputError, IntegrityParams, IntegrityVerdict, analyse
from sentinel_proxy.interfaces import ICheckClient
from sentinel_proxy.ops.logs import observer
from sentinel_proxy.ops.metrics import Metrics
from sentinel_proxy.state.backends import Backend, BackendPool

log = Logger(observer=observer)

STATS_METHOD = "node_getValidatorsStats"
Runner = Callable[..., "defer.Deferred[Any]"]


def judge(body: bytes, params: IntegrityParams) -> IntegrityVerdict:
    """Parse and analyse a node_getValidatorsStats answer (~2 MB on 4.x): run off the reactor thread."""
    return analyse(result_of(STATS_METHOD, parse_json(STATS_METHOD, body)), params)


def run_inline(function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(function, *args)


class IntegrityService(PeriodicCheck):
    """Fetches node_getValidatorsStats and records the analyser's verdict and the node type.

    ``runner`` runs :func:`judge`: the gateway passes ``deferToThreadPool``, as parsing and
    analysing a 4.x answer on the reactor thread stalls every request for its duration
    (bench/integrity_stall.py); the tests run it inline.
    """

    name_of_check = "integrity check"
    metric_name = "integrity"

    def __init__(self, pool: BackendPool, client: ICheckClient, interval: float, timeout: float,
                 clock: IReactorTime, params: IntegrityParams, runner: Runner = run_inline,
                 metrics: Metrics | None = None):
        super().__init__(pool, client, interval, timeout, clock, metrics)
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
            answer = await self._client.fetch(backend, request_body(STATS_METHOD, []), self._timeout)
            verdict = await self._runner(judge, answer.body, self._params)
        except (*NODE_ERRORS, IntegrityInputError) as exc:
            log.warn("integrity check of {backend} failed: {reason}", backend=backend.name, reason=str(exc))
            return False
        previous = backend.verdict.status if backend.verdict else None
        self._pool.record_integrity(backend, verdict)
        if verdict.status != previous:
            log.info("backend {backend} integrity {status} (score {score}, type {node_type})",
                     backend=backend.name, status=verdict.status, score=verdict.score,
                     node_type=backend.node_type or "unknown")
        return True
