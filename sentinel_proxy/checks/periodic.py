"""The loop every background check runs in.

A ``TimerService`` with an injectable clock that checks every target backend concurrently and
catches every failure itself: an unhandled error would stop a ``LoopingCall`` for good, and a
gateway whose checks silently stopped keeps routing on stale state.

Each node's check runs on its own deadline and records its verdict when it arrives. The loop does
not wait for a round to end: a hung node would hold back the next round of every other node (a
node killed meanwhile was marked down 37 s late). A node whose check is still running is left out
of the next round rather than asked twice; its deadline ends that check.

A check that fails for want of the gateway's own resources (:class:`LocalError`: no file
descriptor, no local port) gives no verdict: the node's state stays as it was, and the failure
is counted and logged as the gateway's (``sentinel_proxy_local_errors_total{where="check"}``).
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
from sentinel_proxy.upstream.response import LocalError, LocalErrors

log = Logger(observer=observer)


class PeriodicCheck(TimerService):
    """Runs :meth:`check` for the backends :meth:`targets` selects, all at once, every ``interval``."""

    name_of_check = "check"
    #: The ``check`` label of the check metrics.
    metric_name = "check"

    def __init__(self, pool: BackendPool, client: ICheckClient, interval: float, timeout: float,
                 clock: IReactorTime, metrics: Metrics | None = None):
        super().__init__(interval, self._tick)
        self.clock = clock
        self._pool = pool
        self._client = client
        self._timeout = timeout
        self._metrics = metrics
        self._local = LocalErrors(clock, "check", metrics)
        #: The checks still running, by node: each ends by its own deadline.
        self._running: dict[Backend, defer.Deferred[None]] = {}

    def targets(self) -> Iterable[Backend]:
        return self._pool.backends

    def configure(self, interval: float, timeout: float) -> None:
        """New interval and timeout (SIGHUP): the running loop picks the interval up at its next turn,
        checks started from then on the timeout."""
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
        except LocalError as failure:
            self._local.report(failure, backend.name)
            return  # no verdict, and no check metric: the node was not asked
        except Exception:  # a bug in one check must not stop the loop or the other checks
            log.failure("{check} of {backend} crashed", check=self.name_of_check, backend=backend.name)
        if self._metrics is not None:
            self._metrics.observe_check(self.metric_name, backend.label, self.clock.seconds() - started, ok)

    def _start(self, backend: Backend) -> defer.Deferred[None]:
        check = defer.Deferred.fromCoroutine(self._guarded(backend))
        if not check.called:  # (an in-memory node answers at once)
            self._running[backend] = check
            check.addBoth(self._finished, backend)
        return check

    def _finished(self, result: Any, backend: Backend) -> Any:
        del self._running[backend]
        return result

    def run_once(self) -> defer.Deferred[Any]:
        """One round over the targets but those whose check still runs; fires once every check it
        started has ended (never with a failure)."""
        running = self._running
        checks = [self._start(b) for b in self.targets() if b not in running]
        return defer.DeferredList(checks, consumeErrors=True)

    def _tick(self) -> None:
        """The loop's call: starts a round and returns at once, so the next one starts on time."""
        self.run_once().addErrback(
            lambda failure: log.failure("{check} round failed", failure, check=self.name_of_check))

    def stopService(self) -> defer.Deferred[None]:
        # A check can wait up to its deadline on a hanging node: do not let it delay shutdown.
        for check in list(self._running.values()):
            check.cancel()
        return super().stopService()
