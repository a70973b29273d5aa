"""The loop every background check runs in.

A ``TimerService`` with an injectable clock that checks every target backend concurrently and
catches every failure itself: an unhandled error would stop a ``LoopingCall`` for good, and a
gateway whose checks silently stopped keeps routing on stale state.
"""
from __future__ import annotations

from typing import Any, Iterable

from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sentinel_proxy.interfaces import ICheckClient
from sentinel_proxy.ops.logs import observer
from sentinel_proxy.ops.metrics import Metrics
from sentinel_proxy.state.backends import Backend, BackendPool

log = Logger(observer=observer)


class PeriodicCheck(TimerService):
    """Runs :meth:`check` for the backends :meth:`targets` selects, all at once, every ``interval``."""

    name_of_check = "check"
    #: The ``check`` label of the check metrics.
    metric_name = "check"

    def __init__(self, pool: BackendPool, client: ICheckClient, interval: float, timeout: float,
                 clock: IReactorTime, metrics: Metrics | None = None):
        super().__init__(interval, self.run_once)
        self.clock = clock
        self._pool = pool
        self._client = client
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
