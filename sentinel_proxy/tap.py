"""``twistd sentinel-proxy``: options and the service tree.

``makeService`` only turns options into :class:`~sentinel_proxy.config.Settings` (one line on
stderr and a non-zero exit for a bad value, no traceback); :func:`build_service` wires the parts
and is what tests call with their own reactor and settings.
"""
from __future__ import annotations

import hashlib
import signal
import sys
from dataclasses import fields, replace
from functools import partial
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer, threads
from twisted.internet.endpoints import serverFromString
from twisted.internet.tcp import makeBinding
from twisted.internet.interfaces import IListeningPort
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.failure import Failure

from sentinel_proxy.ops import logs
from sentinel_proxy.ops.admin import Admin, masked
from sentinel_proxy.state.backends import BackendPool
from sentinel_proxy.checks.periodic import HealthService, IntegrityService
from sentinel_proxy.config import SPECS, ConfigError, Settings, load_settings
from sentinel_proxy.proxy.forwarder import Forwarder, Limits
from sentinel_proxy.core.integrity import IntegrityParams
from sentinel_proxy.core.jsonrpc import MethodPolicy
from sentinel_proxy.ops.metrics import Metrics
from sentinel_proxy.core.scoring import BreakerPolicy
from sentinel_proxy.upstream.client import UpstreamClient
from sentinel_proxy.ops.workers import FollowerService, LeaderService, tcp_address, worker_number

log = Logger(observer=logs.observer)


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("JSON-RPC gateway in front of Aztec nodes. Every option can also be set with the "
                "environment variable named in its help, or in a .env file in the working directory; "
                "the option wins.")
    optFlags = [["demo", None, "run four simulated Aztec nodes in this process and proxy to them"]]
    optParameters = [
        [spec.option, None, None,
         f"{spec.help} [{spec.env}" + (f", default {spec.default}]" if spec.default is not None else "]")]
        for spec in SPECS
    ]

    def cli_values(self) -> dict[str, str | None]:
        return {spec.field: self[spec.option] for spec in SPECS}


class ListenService(Service):
    """Listens on an endpoint string; exposes the bound port so tests can use ``tcp:0``."""

    def __init__(self, description: str, factory: Any, reactor: Any, demo: bool = False, reuse_port: bool = False):
        self._description = description
        self._demo = demo
        self._reuse_port = reuse_port
        self._factory = factory
        self._reactor = reactor
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        if self._reuse_port:  # several workers bind the same port (--workers)
            interface, port = tcp_address(self._description)
            binding = makeBinding(interface, port, reuseAddress=True, reusePort=True)
            listening = defer.maybeDeferred(self._reactor.listenTCP, binding, self._factory)
        else:
            listening = serverFromString(self._reactor, self._description).listen(self._factory)
        failures: list[Failure] = []
        listening.addCallbacks(self._listening, failures.append)
        if failures:  # TCP/UNIX endpoints fail synchronously: refuse to start rather than idle deaf
            raise SystemExit(f"sentinel-proxy: cannot listen on {self._description}: {failures[0].value}")

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        address = port.getHost()
        log.info("sentinel-proxy listening on {address}", address=str(address))
        if self._demo and hasattr(address, "port"):
            url = f"http://127.0.0.1:{address.port}"
            log.info("demo: open {url}/health, or try: curl -s -H 'Content-Type: application/json' -d "
                     "'[{{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"node_getBlockNumber\",\"params\":[]}}]' "
                     "{url}/", url=url)

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)
        return None


class UpstreamService(Service):
    """Closes pooled upstream connections on shutdown."""

    def __init__(self, upstream: UpstreamClient):
        self.upstream = upstream

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self.upstream.close()


#: Settings a SIGHUP applies to the running gateway; the rest (listening, log format, pools,
#: body limits, the demo) take a restart, and a reload that changes them says so.
RELOADABLE = frozenset({
    "backends", "log_level", "access_log", "request_timeout_ms", "attempt_timeout_ms", "max_attempts", "hedge",
    "hedge_delay_ms", "breaker_consecutive_failures", "breaker_window", "breaker_window_failures",
    "breaker_cooldown_ms", "breaker_close_successes", "max_in_flight", "max_block_lag", "max_batch_size",
    "health_check_interval_ms", "integrity_check_interval_ms", "integrity_check_epochs",
    "integrity_score_threshold", "slots_per_epoch", "expected_validators", "archiver_threshold_epochs",
    "method_allow", "method_deny", "archiver_method_allow", "pruned_method_allow", "admin_token", "protect_status",
    "rate_limit_rate", "rate_limit_burst", "trusted_proxies", "api_keys", "api_key_rate", "api_key_burst",
})


def access_log_of(settings: Settings, access_log: logs.AccessLog) -> logs.AccessLog | None:
    """The access log when it is on and LOG_LEVEL lets info lines through."""
    return access_log if settings.access_log and settings.log_level in ("debug", "info") else None


def policies_of(settings: Settings) -> dict[str, MethodPolicy]:
    """The method policy of each route: /archiver and /pruned may narrow the allow list."""
    def policy(allow: tuple[str, ...]) -> MethodPolicy:
        return MethodPolicy(allow or settings.method_allow, settings.method_deny)

    return {"/": policy(()), "/archiver": policy(settings.archiver_method_allow),
            "/pruned": policy(settings.pruned_method_allow)}


def limits_of(settings: Settings) -> Limits:
    return Limits(policies=policies_of(settings), rate=settings.rate_limit_rate, burst=settings.rate_limit_burst,
                  key_rate=settings.api_key_rate, key_burst=settings.api_key_burst,
                  key_digests=frozenset(hashlib.sha256(key.encode()).hexdigest() for key in settings.api_keys),
                  max_batch=settings.max_batch_size, max_body=settings.max_body_bytes,
                  timeout=settings.request_timeout, attempt_timeout=settings.attempt_timeout_ms / 1000.0,
                  max_attempts=settings.max_attempts, hedge=settings.hedge,
                  hedge_delay=settings.hedge_delay_ms / 1000.0, max_in_flight=settings.max_in_flight)


def breaker_policy_of(settings: Settings) -> BreakerPolicy:
    return BreakerPolicy(consecutive_failures=settings.breaker_consecutive_failures, window=settings.breaker_window,
                         window_failures=settings.breaker_window_failures,
                         cooldown=settings.breaker_cooldown_ms / 1000.0,
                         close_after=settings.breaker_close_successes)


class ClosingService(Service):
    """Closes a store's connections (Redis) on shutdown: the cache, the rate limiter."""

    def __init__(self, store: Any):
        self.store = store

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self.store.close()


def make_limiter(settings: Settings, reactor: Any) -> Any:
    """The configured rate limiter (an ``IRateLimiter``), or None when rate limiting is off."""
    if settings.rate_limit == "off":
        return None
    from sentinel_proxy.stores.ratelimit import MemoryRateLimiter, RedisRateLimiter

    if settings.rate_limit == "memory":
        return MemoryRateLimiter(reactor)
    return RedisRateLimiter(settings.rate_limit, reactor, timeout=settings.redis_timeout_ms / 1000.0)


def make_cache(settings: Settings, reactor: Any) -> Any:
    """The configured response cache (an ``IResponseCache``), or None when caching is off."""
    if settings.cache == "off":
        return None
    from sentinel_proxy.stores.cache import MemoryCache, RedisCache  # txredisapi installs the default reactor: import late

    if settings.cache == "memory":
        return MemoryCache(settings.cache_size_mb * 1024 * 1024, reactor)
    return RedisCache(settings.cache, reactor, timeout=settings.redis_timeout_ms / 1000.0)


class GatewayService(MultiService):
    """The whole gateway; its attributes are the parts tests and the demo need to reach."""

    def __init__(self, settings: Settings, reactor: Any, cli: dict[str, str | None] | None = None,
                 handle_signals: bool = False):
        super().__init__()
        from sentinel_proxy.web.app import (  # klein installs the default reactor: import late
            GatewayApp,
            make_site,
        )

        self.settings = settings
        self._reactor = reactor
        self._cli = cli or {}
        self._handle_signals = handle_signals
        self.pool = BackendPool(settings.backends, max_block_lag=settings.max_block_lag)
        self.pool.set_breaker_policy(breaker_policy_of(settings))
        self.upstream = UpstreamClient(reactor, settings.upstream_max_connections,
                                       settings.upstream_idle_timeout_ms / 1000.0,
                                       connect_timeout=settings.connect_timeout_ms / 1000.0,
                                       max_response_bytes=settings.max_response_bytes)
        self.metrics = Metrics(self.pool)
        self.pool.on_breaker_change = self._breaker_changed
        self.cache = make_cache(settings, reactor)
        if self.cache is not None:
            self.metrics.watch("cache", self.cache)
            ClosingService(self.cache).setServiceParent(self)
        self.limiter = make_limiter(settings, reactor)
        if self.limiter is not None:
            self.metrics.watch("ratelimit", self.limiter)
            ClosingService(self.limiter).setServiceParent(self)
        self.access_log = logs.AccessLog(sys.stdout, settings.log_format == "json")
        self.forwarder = Forwarder(self.pool, self.upstream, self.metrics, reactor, limits_of(settings),
                                   access_log_of(settings, self.access_log), self.cache,
                                   settings.cache_volatile_ttl_ms / 1000.0, self.limiter,
                                   worker=str(worker_number()) if settings.workers > 1 else None)
        flusher = TimerService(logs.AccessLog.FLUSH_INTERVAL, self.access_log.flush)
        flusher.clock = reactor
        flusher.setServiceParent(self)
        self.app = GatewayApp(self.forwarder, self.pool, self.metrics, reactor, Admin(self))
        self.app.configure_access(settings.admin_token, settings.protect_status, settings.trusted_proxies)

        # Worker 0 (the only one without --workers) runs the demo nodes and the checks; the others
        # follow its node state (sentinel_proxy/workers.py).
        leader = worker_number() == 0
        self.demo = None
        if settings.demo and leader:
            from sentinel_proxy.demo import DemoNodesService

            self.demo = DemoNodesService(self.pool, settings, reactor)
            self.demo.setServiceParent(self)
        self.health = HealthService(self.pool, self.upstream, settings.health_check_interval_ms / 1000.0,
                                    settings.request_timeout, reactor, self.metrics)
        self.integrity = IntegrityService(
            self.pool, self.upstream, settings.integrity_check_interval_ms / 1000.0, settings.request_timeout,
            reactor, integrity_params(settings),
            runner=partial(threads.deferToThreadPool, reactor, reactor.getThreadPool()), metrics=self.metrics)
        if leader:
            self.health.setServiceParent(self)
            self.integrity.setServiceParent(self)
            if settings.workers > 1:
                LeaderService(settings.workers, self.pool, reactor,
                              settings.shutdown_grace_ms / 1000.0).setServiceParent(self)
        else:
            FollowerService(self.pool, reactor).setServiceParent(self)
        UpstreamService(self.upstream).setServiceParent(self)
        self.site = make_site(self.app.resource(), settings.max_body_bytes, settings.client_idle_timeout_ms / 1000.0)
        self.listener = ListenService(settings.listen, self.site, reactor, demo=settings.demo,
                                      reuse_port=settings.workers > 1)
        self.listener.setServiceParent(self)

    def _breaker_changed(self, backend: Any, state: str) -> None:
        self.metrics.breaker_transitions.labels(backend.label, state).inc()
        (log.warn if state == "open" else log.info)("circuit breaker of {backend} is now {state}",
                                                     backend=backend.name, state=state)

    def setServiceParent(self, parent: Any) -> None:
        """Under twistd the parent is the Application: hand it the JSON observer when asked for."""
        super().setServiceParent(parent)
        if self.settings.log_format == "json" and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, logs.json_observer())

    def startService(self) -> None:
        super().startService()
        if self._handle_signals:
            self._reactor.callWhenRunning(self._install_signal_handlers)

    def _install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: drain and exit 0 (twistd's own handler re-raises the signal, so the
        process would end "killed by SIGTERM"); SIGHUP: reload the configuration."""
        def stop(signum: int, frame: Any) -> None:
            self._reactor.callFromThread(self._begin_shutdown, signal.Signals(signum).name)

        def reload(signum: int, frame: Any) -> None:
            self._reactor.callFromThread(self.reload)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    def _begin_shutdown(self, name: str) -> None:
        log.info("received {signal}: closing the listener and draining {count} requests in flight",
                 signal=name, count=self.forwarder.in_flight)
        self._reactor.stop()

    def stopService(self) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        """Graceful: no new connections, requests in flight finish (up to SHUTDOWN_GRACE_MS), then
        the checks and the connection pool stop."""
        Service.stopService(self)
        await defer.maybeDeferred(self.listener.stopService)
        grace = self.settings.shutdown_grace_ms / 1000.0
        deadline = self._reactor.seconds() + grace
        drained = self.forwarder.drained()
        drained.addTimeout(grace, self._reactor)
        try:
            await drained
        except defer.TimeoutError:
            log.warn("{count} requests still in flight after {grace} s; stopping anyway",
                     count=self.forwarder.in_flight, grace=grace)
        # The last answers may still sit in write buffers: let them out, then close.
        await self.site.close_connections(self._reactor, max(0.5, deadline - self._reactor.seconds()))
        rest = [s for s in reversed(list(self)) if s is not self.listener]
        await defer.DeferredList([defer.maybeDeferred(s.stopService) for s in rest], consumeErrors=True)
        self.access_log.flush()

    def reload(self) -> None:
        """SIGHUP: read the environment and .env again; apply what can change live, refuse a bad config."""
        try:
            new = load_settings(cli=self._cli, demo=self.settings.demo)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: {reason}", reason=str(exc))
            return
        old = self.settings
        changed = [f.name for f in fields(Settings) if getattr(old, f.name) != getattr(new, f.name)]
        if not changed:
            log.info("reload: nothing changed")
            return
        for name in changed:
            if name in RELOADABLE:
                log.info("reload: {setting} {old} -> {new}", setting=name, old=masked(name, getattr(old, name)),
                         new=masked(name, getattr(new, name)))
            else:
                log.warn("reload: {setting} changed but takes a restart; keeping {old}", setting=name,
                         old=masked(name, getattr(old, name)))
        applied = {name: getattr(new, name) for name in changed if name in RELOADABLE}
        self.settings = replace(old, **applied)
        self._apply(self.settings)

    def _apply(self, settings: Settings) -> None:
        logs.set_level(settings.log_level)
        backends = list(settings.backends)
        if self.demo is not None:
            backends += self.demo.entries
        self.pool.replace(backends)
        self.pool.set_max_lag(settings.max_block_lag)
        self.pool.set_breaker_policy(breaker_policy_of(settings))
        self.forwarder.configure(limits_of(settings), access_log_of(settings, self.access_log))
        self.app.configure_access(settings.admin_token, settings.protect_status, settings.trusted_proxies)
        self.health.configure(settings.health_check_interval_ms / 1000.0, settings.request_timeout)
        self.integrity.configure(settings.integrity_check_interval_ms / 1000.0, settings.request_timeout,
                                 integrity_params(settings))


def integrity_params(settings: Settings) -> IntegrityParams:
    return IntegrityParams(
        slots_per_epoch=settings.slots_per_epoch,
        expected_validators=settings.expected_validators,
        check_epochs=settings.integrity_check_epochs,
        score_threshold=settings.integrity_score_threshold,
        archiver_threshold_epochs=settings.archiver_threshold_epochs,
    )


def build_service(settings: Settings, reactor: Any = None, cli: dict[str, str | None] | None = None,
                  handle_signals: bool = False) -> GatewayService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    logs.set_level(settings.log_level)
    return GatewayService(settings, reactor, cli, handle_signals)


def makeService(options: Options, reactor: Any = None) -> GatewayService:
    cli = options.cli_values()
    try:
        settings = load_settings(cli=cli, demo=bool(options["demo"]))
    except ConfigError as exc:
        raise SystemExit(f"sentinel-proxy: {exc}") from None
    return build_service(settings, reactor, cli, handle_signals=True)
