"""How a running gateway ends and changes: signals, the graceful drain, and SIGHUP reloads.

Kept apart from the wiring (:mod:`sentinel_proxy.service`) so the order of a shutdown and the
rules of a reload read in one place, each taking only the parts it acts on.
"""
from __future__ import annotations

import signal
from dataclasses import replace
from typing import Any, Awaitable, Callable, Iterable, Protocol

from twisted.application.service import IService, Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sentinel_proxy.config import ConfigError
from sentinel_proxy.ops.admin import masked
from sentinel_proxy.ops.logs import observer
from sentinel_proxy.settings import RELOADABLE, SPECS, Settings

log = Logger(observer=observer)


class Closable(Protocol):
    def close(self) -> defer.Deferred[None]: ...


class ClosingService(Service):
    """Closes a resource's connections when the gateway stops: the upstream pool, and a Redis
    cache or rate limiter."""

    def __init__(self, resource: Closable):
        self.resource = resource

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self.resource.close()


class Requests(Protocol):
    """What the drain needs of the request path."""

    @property
    def in_flight(self) -> int: ...

    def drained(self) -> defer.Deferred[None]: ...


class Connections(Protocol):
    """What the drain needs of the callers' connections."""

    def drain(self, clock: IReactorTime) -> None: ...

    def settle(self, clock: IReactorTime, timeout: float) -> Awaitable[None]: ...

    def close_all(self, clock: IReactorTime, timeout: float) -> Awaitable[None]: ...


async def drain(clock: IReactorTime, delay: float, grace: float, listener: IService, requests: Requests,
                connections: Connections, others: Iterable[IService]) -> None:
    """Graceful stop that cuts nothing:

    1. at once, every answer says ``Connection: close`` and idle connections close after a short
       window (web/handoff.py); ``/ready`` already says 503 (``Gateway.draining``);
    2. for ``delay`` seconds (DRAIN_DELAY_MS) new connections are still accepted and served, so
       load balancers see the 503 and stop sending;
    3. the listener takes what the kernel has queued, then closes (listening.py);
    4. requests in flight finish and the connections close themselves, up to ``grace`` seconds;
       what is still open then is closed once its answers are out;
    5. the other services (checks, pools, stores) stop together.

    When this returns the process may exit at once (twistd stops the reactor, which drops every
    connection left), so nothing a caller is owed may still be in a buffer by then.
    """
    connections.drain(clock)
    if delay > 0:
        await task.deferLater(clock, delay, lambda: None)
    await defer.maybeDeferred(listener.stopService)
    deadline = clock.seconds() + grace
    drained = requests.drained()
    drained.addTimeout(grace, clock)
    try:
        await drained
    except defer.TimeoutError:
        log.warn("{count} requests still in flight after {grace} s; stopping anyway",
                 count=requests.in_flight, grace=grace)
    await connections.settle(clock, deadline - clock.seconds())
    # The last answers may still sit in write buffers: let them out, then close.
    await connections.close_all(clock, max(0.5, deadline - clock.seconds()))
    await defer.DeferredList([defer.maybeDeferred(service.stopService) for service in others], consumeErrors=True)


def reload(running: Settings, load: Callable[[], Settings], apply: Callable[[Settings], None]) -> Settings:
    """SIGHUP: the settings to run with from now on.

    ``load`` reads the environment and ``.env`` again (options given on the command line still
    win). A configuration that does not load is refused as a whole and the running one stays; of
    one that does, the reloadable changes are handed to ``apply`` and the others logged and kept.
    Every change is logged with its secrets masked.
    """
    try:
        new = load()
    except ConfigError as exc:
        log.error("reload refused, keeping the running configuration: {reason}", reason=str(exc))
        return running
    changed = [spec.field for spec in SPECS if getattr(running, spec.field) != getattr(new, spec.field)]
    if not changed:
        log.info("reload: nothing changed")
        return running
    for name in changed:
        if name in RELOADABLE:
            log.info("reload: {setting} {old} -> {new}", setting=name, old=masked(name, getattr(running, name)),
                     new=masked(name, getattr(new, name)))
        else:
            log.warn("reload: {setting} changed but takes a restart; keeping {old}", setting=name,
                     old=masked(name, getattr(running, name)))
    applied = replace(running, **{name: getattr(new, name) for name in changed if name in RELOADABLE})
    apply(applied)
    return applied


def install_signal_handlers(reactor: Any, in_flight: Callable[[], int], reload: Callable[[], None]) -> None:
    """SIGTERM/SIGINT: drain and exit 0 (twistd's own handler re-raises the signal, so the
    process would end "killed by SIGTERM"); SIGHUP: ``reload``.

    The handlers only schedule the work: a signal lands between any two bytecodes, and the
    reactor must run it at a point of its own choosing.
    """
    def stop(signum: int, frame: Any) -> None:
        reactor.callFromThread(_shut_down, reactor, signal.Signals(signum).name, in_flight)

    def hang_up(signum: int, frame: Any) -> None:
        reactor.callFromThread(reload)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, hang_up)


def _shut_down(reactor: Any, name: str, in_flight: Callable[[], int]) -> None:
    log.info("received {signal}: closing the listener and draining {count} requests in flight",
             signal=name, count=in_flight())
    reactor.stop()
