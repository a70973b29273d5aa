"""The gateway's service tree, built from :class:`~sentinel_proxy.settings.Settings` by one function.

:func:`build_service` is what ``twistd`` (through :mod:`sentinel_proxy.tap`) and the tests call.
Each part is made by a small function of the settings, and :func:`reconfigure` hands a reload's
settings to the same parts, so what a setting does at start and on SIGHUP is written side by side.
"""
from __future__ import annotations

import hashlib
import sys
from functools import partial
from typing import Any, Callable, Mapping

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer, threads
from twisted.logger import ILogObserver, Logger

from sentinel_proxy import lifecycle
from sentinel_proxy.checks import CheckClient, HealthService, IntegrityService
from sentinel_proxy.config import load_settings
from sentinel_proxy.core.integrity import IntegrityParams
from sentinel_proxy.core.jsonrpc import MethodPolicy
from sentinel_proxy.core.scoring import BreakerPolicy
from sentinel_proxy.lifecycle import ClosingService
from sentinel_proxy.listening import ListeningService
from sentinel_proxy.ops import logs
from sentinel_proxy.ops.admin import Admin
from sentinel_proxy.ops.metrics import Metrics
from sentinel_proxy.ops.tracing import NO_TRACER, Tracer, make_tracer
from sentinel_proxy.ops.workers import FollowerService, LeaderService, worker_number
from sentinel_proxy.proxy.path import RequestPath
from sentinel_proxy.proxy.values import Limits
from sentinel_proxy.settings import Settings
from sentinel_proxy.state.backends import Backend, BackendPool
from sentinel_proxy.state.history import History, HistoryService
from sentinel_proxy.interfaces import IForwardingClient
from sentinel_proxy.upstream.client import PooledAgent
from sentinel_proxy.upstream.http11 import FastForwardingClient
from sentinel_proxy.upstream.memory import AnswerMemory
from sentinel_proxy.web.auth import Access
from sentinel_proxy.web.rpc import RpcResource
from sentinel_proxy.web.handoff import Connections
from sentinel_proxy.web.server import ClientLimits, LeanServerFactory
from sentinel_proxy.web.site import GatewaySite, make_site

log = Logger(observer=logs.observer)
#: The least time a shared-state command may take (s): the prober's verdicts are larger than a
#: cache entry, and nothing waits on them but the fleet's own round.
FLEET_TIMEOUT = 0.5


class Gateway(MultiService):
    """The running gateway: its child services, and the parts that tests, the demo, a reload and
    the admin endpoints reach. Filled in by :func:`build_service`.

    Stopping it drains (:func:`sentinel_proxy.lifecycle.drain`) instead of stopping every child at
    once, so requests in flight still get their answers.
    """

    pool: BackendPool
    metrics: Metrics
    upstream: Any  # IForwardingClient: FastForwardingClient, or TreqForwardingClient (UPSTREAM_CLIENT=treq)
    answers: AnswerMemory
    check_agent: PooledAgent
    cache: Any  # IResponseCache | None
    limiter: Any  # IRateLimiter | None
    access_log: logs.AccessLog
    forwarder: RequestPath
    #: TRACING's tracer (ops/tracing.py): the no-op one when off.
    tracer: Tracer
    health: HealthService
    integrity: IntegrityService
    #: The dashboard's history sampler and timeline (state/history.py).
    history: HistoryService
    demo: Any = None  # DemoNodesService | None
    site: GatewaySite
    server: LeanServerFactory
    connections: Connections
    listener: ListeningService
    #: With --workers, the link to the other workers (ops/workers.py: LeaderLink or FollowerLink), else None.
    workers: Any = None
    #: The worker that started the others (--workers, worker 0), else None.
    leader: LeaderService | None = None
    #: With SHARED_STATE, worker 0's fleet service (sentinel_proxy/fleet/service.py), else None.
    fleet: Any = None
    #: True from the very start of a shutdown: /ready answers 503 while the drain lets load
    #: balancers notice (DRAIN_DELAY_MS) and the last requests finish.
    draining = False

    def __init__(self, settings: Settings, reactor: Any, load: Callable[[], Settings], handle_signals: bool):
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self._load = load
        self._handle_signals = handle_signals

    def setServiceParent(self, parent: Any) -> None:
        """Under twistd the parent is the Application: hand it the JSON observer when asked for."""
        super().setServiceParent(parent)
        if self.settings.log_format == "json" and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, logs.json_observer())

    def startService(self) -> None:
        super().startService()
        if self._handle_signals:
            self.reactor.callWhenRunning(lifecycle.install_signal_handlers, self.reactor,
                                         lambda: self.forwarder.in_flight, self.reload)

    def stopService(self) -> defer.Deferred[None]:
        self.draining = True
        if self.leader is not None:
            self.leader.terminate_followers()  # every worker drains at the same time
        Service.stopService(self)  # the children stop in the drain's order, not all at once
        others = [service for service in reversed(list(self)) if service is not self.listener]
        stopping = defer.Deferred.fromCoroutine(lifecycle.drain(
            self.reactor, self.settings.drain_delay_ms / 1000.0, self.settings.shutdown_grace_ms / 1000.0,
            self.listener, self.forwarder, self.connections, others))
        stopping.addCallback(lambda _: self.access_log.flush())
        return stopping

    def reload(self) -> None:
        self.settings = lifecycle.reload(self.settings, self._load, partial(reconfigure, self))


def build_service(settings: Settings, reactor: Any = None, cli: Mapping[str, str | None] | None = None,
                  handle_signals: bool = False) -> Gateway:
    """The whole gateway for ``settings``, not started yet.

    ``cli`` (field -> option value) is what a reload merges again over the environment and
    ``.env``. ``handle_signals`` is for twistd only: tests run many gateways in one process.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    logs.set_level(settings.log_level)
    gateway = Gateway(settings, reactor, partial(load_settings, cli=dict(cli or {}), demo=settings.demo),
                      handle_signals)
    gateway.pool = pool = BackendPool(settings.backends, max_block_lag=settings.max_block_lag)
    pool.set_breaker_policy(breaker_policy_of(settings))
    gateway.metrics = metrics = Metrics(pool, clock=reactor)
    metrics.configure(settings)
    pool.on_breaker_change = partial(_breaker_changed, metrics)
    gateway.answers = AnswerMemory(settings.max_buffered_answers_mb * 1024 * 1024, reactor)
    gateway.upstream = upstream = make_upstream(settings, reactor, gateway.answers)
    gateway.cache = make_cache(settings, reactor)
    gateway.limiter = make_limiter(settings, reactor)
    for label, store in (("cache", gateway.cache), ("ratelimit", gateway.limiter)):
        if store is not None:
            metrics.watch(label, store)
            ClosingService(store).setServiceParent(gateway)
    gateway.access_log = logs.AccessLog(sys.stdout, settings.log_format == "json")
    gateway.tracer = make_tracer(settings.tracing, reactor)
    ClosingService(gateway.tracer).setServiceParent(gateway)  # the last spans go out once requests are done
    gateway.forwarder = make_forwarder(settings, pool, upstream, metrics, reactor, gateway.access_log,
                                       gateway.cache, gateway.limiter, gateway.answers, gateway.tracer)
    history = History(pool, gateway.forwarder.totals, reactor)
    pool.on_transition = history.timeline.record
    gateway.history = HistoryService(history, reactor)
    gateway.history.setServiceParent(gateway)
    flusher = TimerService(logs.AccessLog.FLUSH_INTERVAL, gateway.access_log.flush)
    flusher.clock = reactor
    flusher.setServiceParent(gateway)
    gateway.check_agent = PooledAgent(reactor, idle_timeout=settings.upstream_idle_timeout_ms / 1000.0,
                                      connect_timeout=settings.connect_timeout_ms / 1000.0)
    gateway.health, gateway.integrity = make_checks(settings, pool, gateway.check_agent, metrics, reactor)
    _add_node_state(gateway, settings, reactor)
    ClosingService(upstream).setServiceParent(gateway)
    ClosingService(gateway.check_agent).setServiceParent(gateway)
    ClosingService(gateway.answers).setServiceParent(gateway)
    gateway.site, gateway.server = make_web(gateway, reactor)
    gateway.connections = gateway.server.connections
    gateway.listener = ListeningService(settings.listen, gateway.server, reactor,
                                        reuse_port=settings.workers > 1, on_listening=_announcer(settings))
    gateway.listener.setServiceParent(gateway)
    return gateway


def make_upstream(settings: Settings, reactor: Any, answers: AnswerMemory) -> IForwardingClient:
    """The forwarding client UPSTREAM_CLIENT names, counting its answers' bytes in ``answers``."""
    options = dict(max_connections=settings.upstream_max_connections,
                   idle_timeout=settings.upstream_idle_timeout_ms / 1000.0,
                   connect_timeout=settings.connect_timeout_ms / 1000.0,
                   max_response_bytes=settings.max_response_bytes, memory=answers)
    if settings.upstream_client == "treq":
        from sentinel_proxy.upstream.treq_client import TreqForwardingClient

        return TreqForwardingClient(reactor, **options)
    return FastForwardingClient(reactor, **options)


def make_forwarder(settings: Settings, pool: BackendPool, upstream: IForwardingClient, metrics: Metrics, reactor: Any,
                   access_log: logs.AccessLog, cache: Any, limiter: Any, answers: AnswerMemory | None = None,
                   tracer: Tracer = NO_TRACER) -> RequestPath:
    return RequestPath(pool, upstream, metrics, reactor, limits_of(settings), access_log_of(settings, access_log), cache,
                       settings.cache_volatile_ttl_ms / 1000.0, limiter,
                       worker=str(worker_number()) if settings.workers > 1 else None,
                       answer_bytes=None if answers is None else answers.over_cap, tracer=tracer)


def make_checks(settings: Settings, pool: BackendPool, agent: PooledAgent, metrics: Metrics,
                reactor: Any) -> tuple[HealthService, IntegrityService]:
    """The checks speak treq over their own small pool (same TCP_NODELAY and connect timeout as
    the forwarding client), through their own client: gzip is welcome there, never on the hot path.
    A health check gets HEALTH_CHECK_TIMEOUT_MS, the integrity check the request deadline: the
    validator stats are megabytes and may well take longer than a health batch."""
    client = CheckClient.over(agent.agent, reactor)
    health = HealthService(pool, client, settings.health_check_interval_ms / 1000.0,
                           settings.health_check_timeout_ms / 1000.0, reactor, metrics)
    integrity = IntegrityService(
        pool, client, settings.integrity_check_interval_ms / 1000.0, settings.request_timeout, reactor,
        integrity_params(settings), runner=partial(threads.deferToThreadPool, reactor, reactor.getThreadPool()),
        metrics=metrics)
    return health, integrity


def _add_node_state(gateway: Gateway, settings: Settings, reactor: Any) -> None:
    """Worker 0 (the only one without --workers) runs the demo nodes and the checks; the others
    follow its node state, its drains and every worker's breaker openings, and all count into one
    set of metrics (sentinel_proxy/ops/workers.py). With SHARED_STATE, worker 0 runs the checks only
    while its gateway probes for the fleet, and carries the fleet's state to and from its workers."""
    gateway.workers = None
    if worker_number() != 0:
        follower = FollowerService(gateway.pool, gateway.metrics, reactor, worker_number())
        follower.setServiceParent(gateway)
        gateway.workers = follower.link
        gateway.pool.on_breaker_change = partial(_breaker_changed, gateway.metrics, workers=follower.link)
        return
    if settings.demo:
        from sentinel_proxy.demo import DemoNodesService

        gateway.demo = DemoNodesService(gateway.pool, settings, reactor)
        gateway.demo.setServiceParent(gateway)
    if settings.shared_state:
        gateway.fleet = make_fleet(gateway, settings, reactor)  # it runs the checks while it holds the lease
        gateway.fleet.setServiceParent(gateway)
    else:
        gateway.health.setServiceParent(gateway)
        gateway.integrity.setServiceParent(gateway)
    if settings.workers > 1:
        leader = LeaderService(settings.workers, gateway.pool, gateway.metrics, reactor,
                               (settings.drain_delay_ms + settings.shutdown_grace_ms) / 1000.0)
        leader.setServiceParent(gateway)
        gateway.leader = leader
        gateway.workers = leader.link
    links = [link for link in (gateway.workers, gateway.fleet) if link is not None]
    if links:
        gateway.pool.on_breaker_change = partial(_breaker_changed, gateway.metrics, workers=_Links(links))


class _Links:
    """The workers' link and the fleet: both carry this process's breaker openings to the others."""

    def __init__(self, links: list[Any]):
        self._links = links

    def breaker_changed(self, backend: Backend, state: str) -> None:
        for link in self._links:
            link.breaker_changed(backend, state)


def make_fleet(gateway: Gateway, settings: Settings, reactor: Any) -> Any:
    """SHARED_STATE (sentinel_proxy/fleet/): the checks run only while this gateway holds the fleet's
    lease; their verdicts, the drains and the breaker openings travel through Redis. A FleetService."""
    from sentinel_proxy.fleet.codec import fleet_id
    from sentinel_proxy.fleet.service import FleetService
    from sentinel_proxy.fleet.store import FleetStore
    from sentinel_proxy.stores.redis_link import RedisLink  # txredisapi installs the default reactor: import late

    link = RedisLink(settings.shared_state, reactor, max(settings.redis_timeout_ms / 1000.0, FLEET_TIMEOUT),
                     role="shared state Redis", outage="running this gateway's own checks")
    store = FleetStore(link, fleet_id([b.url for b in gateway.pool.backends]))
    return FleetService(gateway.pool, (gateway.health, gateway.integrity), store, reactor,
                        interval=lambda: gateway.settings.health_check_interval_ms / 1000.0,
                        cooldown=lambda: gateway.settings.breaker_cooldown_ms / 1000.0, close=link.close)


def make_web(gateway: Gateway, reactor: Any) -> tuple[GatewaySite, LeanServerFactory]:
    """What listens: the lean HTTP/1.1 server for POST on the RPC routes, with the twisted.web
    site behind it for every other request (handed over on the same connection), and behind the
    site the web layer and the admin actions, each given only the parts it uses; the settings
    through a getter, since a reload replaces them."""
    from sentinel_proxy.web.app import GatewayApp  # klein installs the default reactor: import late

    def settings() -> Settings:
        return gateway.settings

    access = Access(settings)
    admin = Admin(gateway.pool, (gateway.health, gateway.integrity), settings, lambda: gateway.forwarder.in_flight,
                  gateway.workers)
    app = GatewayApp(gateway.pool, gateway.metrics, gateway.forwarder.totals, reactor, admin, access,
                     lambda: gateway.draining, gateway.history.history)
    root = RpcResource(gateway.forwarder, access, app.resource())
    idle = gateway.settings.client_idle_timeout_ms / 1000.0
    site = make_site(root, gateway.settings.max_body_bytes, idle, gateway.metrics, reactor)
    return site, LeanServerFactory(gateway.forwarder, access, site, reactor, gateway.settings.max_body_bytes, idle,
                                   client_limits_of(gateway.settings), gateway.metrics)


def client_limits_of(settings: Settings) -> ClientLimits:
    return ClientLimits(header_timeout=settings.client_header_timeout_ms / 1000.0,
                        body_timeout=settings.client_body_timeout_ms / 1000.0,
                        max_connections=settings.max_connections,
                        max_per_client=settings.max_connections_per_client)


def _announcer(settings: Settings) -> Callable[[Any], None] | None:
    if not settings.demo:
        return None
    from sentinel_proxy.demo import announce

    return announce


def reconfigure(gateway: Gateway, settings: Settings) -> None:
    """Hand a reload's settings to the parts that take them; the web layer and the admin actions
    read the new ones through their getter."""
    logs.set_level(settings.log_level)
    gateway.pool.replace(list(settings.backends) + (gateway.demo.entries if gateway.demo is not None else []))
    gateway.pool.set_max_lag(settings.max_block_lag)
    gateway.pool.set_breaker_policy(breaker_policy_of(settings))
    gateway.forwarder.configure(limits_of(settings), access_log_of(settings, gateway.access_log))
    gateway.server.configure(client_limits_of(settings))
    gateway.health.configure(settings.health_check_interval_ms / 1000.0, settings.health_check_timeout_ms / 1000.0)
    gateway.integrity.configure(settings.integrity_check_interval_ms / 1000.0, settings.request_timeout,
                                integrity_params(settings))
    gateway.metrics.configure(settings)


def _breaker_changed(metrics: Metrics, backend: Backend, state: str, workers: Any = None) -> None:
    """``workers``: the --workers link (ops/workers.py), which carries an opening to the other workers."""
    metrics.breaker_transitions.labels(backend.label, state).inc()
    (log.warn if state == "open" else log.info)("circuit breaker of {backend} is now {state}",
                                                 backend=backend.name, state=state)
    if workers is not None:
        workers.breaker_changed(backend, state)


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
                  hedge_delay=settings.hedge_delay_ms / 1000.0, max_in_flight=settings.max_in_flight,
                  max_response=settings.max_response_bytes)


def breaker_policy_of(settings: Settings) -> BreakerPolicy:
    return BreakerPolicy(consecutive_failures=settings.breaker_consecutive_failures, window=settings.breaker_window,
                         window_failures=settings.breaker_window_failures,
                         cooldown=settings.breaker_cooldown_ms / 1000.0,
                         close_after=settings.breaker_close_successes)


def integrity_params(settings: Settings) -> IntegrityParams:
    return IntegrityParams(
        slots_per_epoch=settings.slots_per_epoch,
        expected_validators=settings.expected_validators,
        check_epochs=settings.integrity_check_epochs,
        score_threshold=settings.integrity_score_threshold,
        archiver_threshold_epochs=settings.archiver_threshold_epochs,
    )


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
