"""Prometheus collectors, on a registry object owned by the service (no import-time globals).

The five Go prototype metrics keep their names and labels: operators' dashboards and alerts
depend on them. Per-backend state (health, lag, verdicts, quarantines) is read from the pool at
scrape time instead of being pushed on every change, so the request path never touches it.
Labels taken from requests are bounded: a JSON-RPC method outside :data:`KNOWN_METHODS` counts as
"other", so a caller cannot create series at will. docs/metrics.md lists every metric.

The request path's metrics (everything counted per request or per attempt) are plain numbers in
dicts keyed by label tuples, updated without locks (the reactor is one thread, and so is each
--workers process) and turned into metric families only when /metrics is scraped, by
:class:`RequestCollector`. prometheus_client's own objects cost a lock per sample, a label
look-up and a bucket walk per observation: ~15 % of the gateway's CPU per request. The
exposition is the one those objects would give for the same observations (tests/test_metrics.py).
The check metrics are kept the same way, so that with --workers every family reaches the shared
metric files (:meth:`Metrics.share`, ops/shared_metrics.py) by one path.

A node is named by one label, ``backend``, whose value is its display name, in every metric but
three of the prototype's (``sentinel_proxy_backend_health``, ``_integrity_score``,
``_block_number``), which keep their ``url`` label (same value) because the contract says so.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterable, Iterator, Sequence, TypeVar

from prometheus_client import (CollectorRegistry, GCCollector, Histogram, PlatformCollector, ProcessCollector,
                               disable_created_metrics, generate_latest)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import INF, floatToGoString
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sentinel_proxy import __version__
from sentinel_proxy.core import methods
from sentinel_proxy.ops.logs import observer
from sentinel_proxy.ops.shared_metrics import MetricFiles
from sentinel_proxy.state.backends import BackendPool

if TYPE_CHECKING:
    from sentinel_proxy.settings import Settings

_log = Logger(observer=observer)

#: Value of the prototype's "method" label; kept for compatibility (it always said "proxy").
PROXY_METHOD = "proxy"
#: "backend" label of requests answered without reaching a node (refused, no candidate).
NO_BACKEND = "none"
OTHER_METHOD = "other"

#: Every method of the method table (4.x ``node_*``, 5.x ``aztec_*``, ``p2p_*``) gets its own label
#: value, spelled exactly; anything else is "other", so the label set stays bounded.
KNOWN_METHODS = methods.metric_labels()

ROUTES = ("/", "/archiver", "/pruned")
OUTCOMES = ("ok", "rpc_error", "upstream_error", "timeout", "rejected")
INTEGRITY_STATUSES = ("perfect", "good", "bad", "unverified")
ROUTING_STATES = ("preferred", "fallback", "quarantined", "down", "drained")
QUARANTINE_REASONS = ("lag", "chain", "diverged")
NODE_TYPES = ("archiver", "pruned")
BREAKER_STATES = ("closed", "open", "half-open")
BATCH_BUCKETS = (1, 2, 3, 5, 10, 20, 50, 100)
#: Observations of the request path waiting to be counted before :meth:`Metrics.settle` runs on
#: its own (a scrape or a --workers sync runs it too): a bound on their memory, not a delay.
SETTLE_AFTER = 512
#: How --workers combines the process collectors' gauges (the others are summed: memory, open
#: files): the oldest worker's start, the per-process limit, the interpreter (the same in all).
PROCESS_GAUGE_MODES = {"process_start_time_seconds": "livemin", "process_max_fds": "livemax",
                       "python_info": "livemax"}
#: prometheus_client's default histogram buckets (``Histogram.DEFAULT_BUCKETS``).
DEFAULT_BUCKETS = Histogram.DEFAULT_BUCKETS


#: ``method_class`` of node attempts: "write" (not safe to repeat: sendTx), "archive" (names a
#: block: served from the node's history), "read" (every other method of the table), "other"
#: (outside it), "mixed" (a batch of several classes). Five values, whatever callers send.
WRITE, ARCHIVE, READ, MIXED = "write", "archive", "read", "mixed"
METHOD_CLASSES = (READ, ARCHIVE, WRITE, OTHER_METHOD, MIXED)


def _class_of(method: str) -> str:
    row = methods.lookup(method)
    assert row is not None
    return WRITE if not row.safe else ARCHIVE if row.routing is not None else READ


#: Wire name -> class, for the exact spellings of the table (as :data:`KNOWN_METHODS`).
_CLASSES = {method: _class_of(method) for method in KNOWN_METHODS}


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else OTHER_METHOD


def method_class(calls: Sequence[str]) -> str:
    """The ``method_class`` of an attempt carrying these calls (see :data:`METHOD_CLASSES`)."""
    if len(calls) == 1:  # the usual attempt (the Aztec client sends batches of one)
        return _CLASSES.get(calls[0], OTHER_METHOD)
    if not calls:
        return OTHER_METHOD
    classes = _CLASSES
    first = classes.get(calls[0], OTHER_METHOD)
    for method in calls:
        if classes.get(method, OTHER_METHOD) != first:
            return MIXED
    return first


class PoolCollector(Collector):
    """Backend gauges computed from the pool on each scrape."""

    def __init__(self, pool: BackendPool):
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        def family(name: str, doc: str, labels: Iterable[str] = ("backend",)) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=list(labels))

        # The prototype's three keep their "url" label (the contract); the value is the display name.
        health = family("sentinel_proxy_backend_health", "Backend health (1 healthy, 0 not)", ("url",))
        score = family("sentinel_proxy_backend_integrity_score", "Backend integrity score (0-100)", ("url",))
        block = family("sentinel_proxy_backend_block_number", "Backend block number", ("url",))
        lag = family("sentinel_proxy_backend_lag_blocks", "Blocks behind the best healthy node on the same chain")
        oldest = family("sentinel_proxy_backend_oldest_block",
                        "Oldest block whose state the node serves (-1 when the node does not say)")
        priority = family("sentinel_proxy_backend_priority", "Selection priority (the prototype's formula)")
        status = family("sentinel_proxy_backend_integrity_status", "1 for the node's current integrity status",
                        ("backend", "status"))
        node_type = family("sentinel_proxy_backend_node_type", "1 for the node's type", ("backend", "type"))
        routing = family("sentinel_proxy_backend_routing", "1 for how the request path treats the node",
                         ("backend", "state"))
        breaker = family("sentinel_proxy_backend_breaker_state", "1 for the node's circuit breaker state",
                         ("backend", "state"))
        quarantine = family("sentinel_proxy_backend_quarantined", "1 when the node is quarantined for that reason",
                            ("backend", "reason"))
        for backend in self._pool.backends:
            name = backend.label  # the display name, under either label name
            health.add_metric([name], 1.0 if backend.healthy else 0.0)
            score.add_metric([name], float(backend.verdict.score) if backend.verdict else 0.0)
            block.add_metric([name], float(backend.block_number))
            lag.add_metric([name], float(backend.lag))
            oldest.add_metric([name], float(-1 if backend.oldest_block is None else backend.oldest_block))
            priority.add_metric([name], float(backend.priority))
            current = backend.verdict.status if backend.verdict else ""
            for value in INTEGRITY_STATUSES:
                status.add_metric([name, value], 1.0 if current == value else 0.0)
            for value in NODE_TYPES:
                node_type.add_metric([name, value], 1.0 if backend.node_type == value else 0.0)
            for value in ROUTING_STATES:
                routing.add_metric([name, value], 1.0 if backend.routing == value else 0.0)
            for value in BREAKER_STATES:
                breaker.add_metric([name, value], 1.0 if backend.breaker.state == value else 0.0)
            for value in QUARANTINE_REASONS:
                quarantine.add_metric([name, value], 1.0 if value in backend.quarantine else 0.0)
        yield from (health, score, block, lag, oldest, priority, status, node_type, routing, quarantine, breaker)


class StoreCollector(Collector):
    """A store's own counters (cache or rate limiter: hits, stores, Redis errors...) at scrape time."""

    FIELDS = {
        "cache": (("hits", "counter", "Cache look-ups that found an answer"),
                  ("misses", "counter", "Cache look-ups that found nothing"),
                  ("stores", "counter", "Answers stored"),
                  ("evictions", "counter", "Entries evicted to stay within the size limit"),
                  ("errors", "counter", "Failed or timed-out Redis calls (each one a miss, never a caller error)"),
                  ("bytes", "gauge", "Bytes held (memory store)")),
        "ratelimit": (("allowed", "counter", "Requests within their rate limit"),
                      ("limited", "counter", "Requests refused with 429"),
                      ("errors", "counter", "Failed or timed-out Redis calls (the limiter then fails open)"),
                      ("failed_open", "counter", "Requests let through without Redis (Redis failing)"),
                      ("evictions", "counter", "Buckets forgotten early to bound memory (memory store)")),
    }

    def __init__(self, kind: str, store: object):
        self._kind = kind
        self._store = store
        self._store_label = type(store).__name__.removesuffix("Cache").removesuffix("RateLimiter").lower()

    def collect(self) -> Iterator[Metric]:
        for field, kind, doc in self.FIELDS[self._kind]:
            name = f"sentinel_proxy_{self._kind}_{field}"
            family = (CounterMetricFamily(name, doc, labels=["store"]) if kind == "counter"
                      else GaugeMetricFamily(name, doc, labels=["store"]))
            family.add_metric([self._store_label], float(getattr(self._store, field, 0)))
            yield family


class CountValue:
    """One counter series (a prometheus_client counter child's ``inc``, without its lock)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class GaugeValue:
    """One gauge series: ``inc``, ``dec`` and ``set`` as on a prometheus_client gauge, without its lock."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class HistogramValue:
    """One histogram series: the count of each bucket (not cumulated: a scrape cumulates) and the sum.

    An observation goes in the first bucket whose upper bound is >= it (Prometheus buckets are
    ``le``), as prometheus_client's ``Histogram.observe`` puts it; ``bisect_left`` finds that bucket.
    (One difference: a NaN, which no clock gives, lands in the first bucket; prometheus_client
    counts it in none.)
    """

    __slots__ = ("counts", "sum", "bounds")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


def upper_bounds(buckets: Sequence[float]) -> tuple[float, ...]:
    """The bounds as prometheus_client's ``Histogram`` keeps them: floats, sorted, +Inf last."""
    bounds = [float(b) for b in buckets]
    if bounds != sorted(bounds):
        raise ValueError("Buckets not in sorted order")
    if not bounds or bounds[-1] != INF:
        bounds.append(INF)
    if len(bounds) < 2:
        raise ValueError("Must have at least two buckets")
    return tuple(bounds)


S = TypeVar("S", CountValue, GaugeValue, HistogramValue)
F = TypeVar("F", bound="Family")


class Family(Generic[S]):
    """A metric and its series, keyed by their label values (a tuple of str, in label-name order).

    ``labels(...)`` works as on a prometheus_client metric, for the callers that count rare events
    (failovers, hedges, breaker transitions); the request path reads ``series`` directly.
    """

    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()):
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.series: dict[tuple[str, ...], S] = {}
        if not self.labelnames:
            self.series[()] = self._new()

    def _new(self) -> S:
        raise NotImplementedError

    def child(self, key: tuple[str, ...]) -> S:
        """The series of ``key`` (label values already str), created at zero on first use."""
        found = self.series.get(key)
        if found is None:
            found = self.series[key] = self._new()
        return found

    def labels(self, *values: object, **named: object) -> S:
        if named:
            if values:
                raise ValueError("Can't pass both *args and **kwargs")
            if set(named) != set(self.labelnames):
                raise ValueError("Incorrect label names")
            values = tuple(named[name] for name in self.labelnames)
        if len(values) != len(self.labelnames):
            raise ValueError("Incorrect label count")
        return self.child(tuple(str(value) for value in values))

    def family(self) -> Metric:
        raise NotImplementedError


class CounterFamily(Family[CountValue]):
    kind = "counter"

    def _new(self) -> CountValue:
        return CountValue()

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, series in list(self.series.items()):
            family.add_metric(key, series.value)
        return family


class GaugeFamily(Family[GaugeValue]):
    kind = "gauge"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), mode: str = "livesum"):
        #: How --workers combines the workers' values (a prometheus_client multiprocess mode):
        #: "livesum" for amounts (in flight, bytes), "livemax" for what every worker says alike.
        self.mode = mode
        super().__init__(name, documentation, labelnames)

    def _new(self) -> GaugeValue:
        return GaugeValue()

    def family(self) -> Metric:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, series in list(self.series.items()):
            family.add_metric(key, series.value)
        return family


class HistogramFamily(Family[HistogramValue]):
    kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 buckets: Sequence[float] = DEFAULT_BUCKETS):
        self.bounds = upper_bounds(buckets)
        #: The ``le`` label of each bucket, as the exposition spells it.
        self.les = tuple(floatToGoString(bound) for bound in self.bounds)
        super().__init__(name, documentation, labelnames)

    def _new(self) -> HistogramValue:
        return HistogramValue(self.bounds)

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        les = self.les
        for key, series in list(self.series.items()):
            cumulated, total = [], 0
            for le, count in zip(les, series.counts):
                total += count
                cumulated.append((le, total))
            family.add_metric(key, cumulated, series.sum)
        return family


class RequestCollector(Collector):
    """Exports the families above at scrape time, in the order they were made; ``settle`` first
    counts what the request path observed since the last scrape (:meth:`Metrics.settle`)."""

    def __init__(self, settle: Callable[[], None]) -> None:
        self.families: list[Family] = []
        self._settle = settle

    def add(self, family: F) -> F:
        self.families.append(family)
        return family

    def collect(self) -> Iterator[Metric]:
        self._settle()
        for family in self.families:
            yield family.family()

    def describe(self) -> Iterator[Metric]:
        """The names, without the samples: lets the registry refuse a duplicate name."""
        for family in self.families:
            if family.kind == "counter":
                yield CounterMetricFamily(family.name, family.documentation, labels=family.labelnames)
            elif family.kind == "gauge":
                yield GaugeMetricFamily(family.name, family.documentation, labels=family.labelnames)
            else:
                yield HistogramMetricFamily(family.name, family.documentation, labels=family.labelnames)


def _count_each(seen: Sequence[tuple[Any, ...]], count: Callable[..., None], what: str) -> None:
    """Count each observation; one that cannot be counted is logged and lost on its own, never the
    rest of the batch, nor the request or scrape that settles it."""
    for observed in seen:
        try:
            count(*observed)
        except Exception:
            _log.failure("{what} metrics could not be counted: {observed!r}", what=what, observed=observed)


class Metrics:
    def __init__(self, pool: BackendPool, registry: CollectorRegistry | None = None,
                 clock: IReactorTime | None = None):
        """``clock``: the wall clock of the check timestamps (the global reactor when None)."""
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self._clock = clock
        # No ``*_created`` series: the Go prototype never had them, and they double every counter's
        # and histogram's series for no alert anyone writes (a process-wide client setting).
        disable_created_metrics()
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        #: What the request path observed, one tuple a request (or attempt), counted by :meth:`settle`.
        self._requests_seen: list[tuple[Any, ...]] = []
        self._attempts_seen: list[tuple[str, str, float, Sequence[str]]] = []
        hot = RequestCollector(self.settle)
        add = hot.add
        # The prototype's request metrics (contract: names and labels unchanged).
        self.requests = add(CounterFamily("sentinel_proxy_requests", "Proxied requests",
                                          ["method", "status", "backend"]))
        self.duration = add(HistogramFamily("sentinel_proxy_request_duration_seconds", "Proxied request duration",
                                            ["method", "backend"]))
        # Ours.
        self.rpc_requests = add(CounterFamily("sentinel_proxy_rpc_requests",
                                              "HTTP requests to the RPC routes by outcome", ["route", "outcome"]))
        self.rpc_duration = add(HistogramFamily("sentinel_proxy_rpc_request_duration_seconds",
                                                "Duration of HTTP requests to the RPC routes", ["route", "outcome"]))
        self.rpc_calls = add(CounterFamily("sentinel_proxy_rpc_calls",
                                           "JSON-RPC calls (batch items counted one by one)", ["method", "route"]))
        self.rpc_call_duration = add(HistogramFamily("sentinel_proxy_rpc_call_duration_seconds",
                                                     "Duration of requests whose calls all use this method (one call, "
                                                     "or a batch of this method alone), once per request",
                                                     ["method"]))
        self.batch_size = add(HistogramFamily("sentinel_proxy_batch_size", "Calls per JSON-RPC batch",
                                              buckets=BATCH_BUCKETS))
        self.in_flight_family = add(GaugeFamily("sentinel_proxy_in_flight_requests", "RPC requests being handled"))
        #: ``inc()``/``dec()`` by admission.InFlight on every request.
        self.in_flight: GaugeValue = self.in_flight_family.child(())
        self.upstream_attempts = add(CounterFamily("sentinel_proxy_upstream_attempts",
                                                   "Requests sent to nodes by result", ["backend", "result"]))
        self.attempt_duration = add(HistogramFamily(
            "sentinel_proxy_upstream_attempt_duration_seconds", "Duration of each attempt at a node (real traffic), "
            "by the class of the methods it carried", ["backend", "method_class"]))
        self.failovers = add(CounterFamily("sentinel_proxy_failovers",
                                           "Requests sent on to another node after a failure", ["route"]))
        self.hedges = add(CounterFamily("sentinel_proxy_hedges",
                                        "Hedged reads: a second node asked because the first was slow", ["route"]))
        self.breaker_transitions = add(CounterFamily("sentinel_proxy_breaker_transitions",
                                                     "Circuit breaker state changes", ["backend", "state"]))
        self.cache_calls = add(CounterFamily("sentinel_proxy_cache_calls", "Cacheable calls by how they were answered",
                                             ["result"]))
        # The gateway's own trouble, never a node's (issue 12): counted apart so no alert blames a node.
        self.local_errors = add(CounterFamily(
            "sentinel_proxy_local_errors", "The gateway's own failures (out of file descriptors, no local port "
            "or memory), never counted against a node", ["where"]))
        self.connections_refused = add(CounterFamily(
            "sentinel_proxy_connections_refused", "Caller connections closed at once by MAX_CONNECTIONS or "
            "MAX_CONNECTIONS_PER_CLIENT", ["reason"]))
        self.client_timeouts = add(CounterFamily(
            "sentinel_proxy_client_timeouts", "Requests cut off because their headers or body did not arrive in "
            "time (CLIENT_HEADER_TIMEOUT_MS, CLIENT_BODY_TIMEOUT_MS)", ["phase"]))
        # Rare (one per check), and made by the worker that runs the checks only.
        self.check_duration = add(HistogramFamily("sentinel_proxy_check_duration_seconds",
                                                  "Health and integrity check duration", ["check", "backend"]))
        self.check_failures = add(CounterFamily("sentinel_proxy_check_failures", "Failed health and integrity checks",
                                                ["check", "backend"]))
        self.check_last_success = add(GaugeFamily(
            "sentinel_proxy_check_last_success_timestamp_seconds", "When the check of the node last succeeded "
            "(Unix time; the time of its first check until one does)", ["check", "backend"], mode="livemax"))
        # What the alert rules compare against (deploy/prometheus/alerts.yml): :meth:`configure`.
        self.build_info = add(GaugeFamily("sentinel_proxy_build_info", "Always 1: the gateway's version",
                                          ["version"], mode="livemax"))
        self.build_info.child((__version__,)).set(1)
        self.max_in_flight = add(GaugeFamily(
            "sentinel_proxy_max_in_flight", "MAX_IN_FLIGHT: requests in flight past which callers get 503 "
            "(with --workers, summed over the workers like sentinel_proxy_in_flight_requests)"))
        self.error_budget = add(GaugeFamily(
            "sentinel_proxy_error_budget_ratio", "ERROR_BUDGET_PERCENT as a ratio: the share of requests that may "
            "fail at the nodes before SentinelHighErrorRate fires", mode="livemax"))
        self.check_interval = add(GaugeFamily(
            "sentinel_proxy_check_interval_seconds", "HEALTH_CHECK_INTERVAL_MS and INTEGRITY_CHECK_INTERVAL_MS, in "
            "seconds", ["check"], mode="livemax"))
        r.register(hot)
        self._hot = hot
        self._pool = pool
        self.registry.register(PoolCollector(pool))
        #: process_* and python_*: with --workers, copied into the files like the rest (:meth:`sync`).
        self._process: tuple[Collector, ...] = (ProcessCollector(registry=r), PlatformCollector(registry=r),
                                                GCCollector(registry=r))
        self._stores: list[StoreCollector] = []
        #: With --workers: this process's metric files and the registry that reads every worker's.
        self._files: MetricFiles | None = None
        self._shared: CollectorRegistry | None = None
        # The duration histograms share the default buckets: observe_request bisects once.
        assert (self.duration.bounds == self.rpc_duration.bounds == self.rpc_call_duration.bounds
                == self.attempt_duration.bounds)
        self._bounds = self.rpc_duration.bounds
        self._batch: HistogramValue = self.batch_size.child(())
        #: (route, status, outcome, backend) -> the four series a request of that kind updates.
        self._request_series: dict[tuple[str, int, str, str], tuple[CountValue, HistogramValue, CountValue,
                                                                     HistogramValue]] = {}
        #: route -> method -> (its rpc_calls series, its rpc_call_duration series), for the known methods only;
        #: route -> the "other" pair for the rest.
        self._call_series: dict[str, dict[str, tuple[CountValue, HistogramValue]]] = {}
        self._other_series: dict[str, tuple[CountValue, HistogramValue]] = {}
        self._attempt_series: dict[tuple[str, str], CountValue] = {}
        self._attempt_durations: dict[tuple[str, str], HistogramValue] = {}
        self._preset()

    def _preset(self) -> None:
        """Create every route/outcome series up front, so rate() and alerts see zeros, not gaps."""
        self._cache_series = {result: self.cache_calls.child((result,)) for result in ("hit", "miss", "coalesced")}
        for where in ("upstream", "check", "accept"):
            self.local_errors.child((where,))
        for reason in ("total", "per_client"):
            self.connections_refused.child((reason,))
        for phase in ("header", "body"):
            self.client_timeouts.child((phase,))
        for route in ROUTES:
            self.failovers.child((route,))
            self.hedges.child((route,))
            for outcome in OUTCOMES:
                self.rpc_requests.child((route, outcome))
                self.rpc_duration.child((route, outcome))

    def _new_request_series(self, route: str, status: int, outcome: str,
                            backend: str) -> tuple[CountValue, HistogramValue, CountValue, HistogramValue]:
        key = (route, status, outcome, backend)
        route, outcome, backend = str(route), str(outcome), str(backend)
        series = self._request_series[key] = (
            self.requests.child((PROXY_METHOD, str(status), backend)),
            self.duration.child((PROXY_METHOD, backend)),
            self.rpc_requests.child((route, outcome)),
            self.rpc_duration.child((route, outcome)))
        return series

    def _new_call_series(self, route: str, method: str) -> tuple[CountValue, HistogramValue]:
        label = method_label(method)
        if label == OTHER_METHOD:
            # Unknown names are not kept: a caller sending random names must not grow a dict.
            series = self._other_series.get(route)
            if series is None:
                series = self._other_series[route] = (self.rpc_calls.child((label, str(route))),
                                                      self.rpc_call_duration.child((label,)))
            return series
        series = self._call_series.setdefault(route, {})[method] = (
            self.rpc_calls.child((label, str(route))), self.rpc_call_duration.child((label,)))
        return series

    def observe_request(self, route: str, status: int, outcome: str, backend: str, seconds: float,
                        methods: Sequence[str], batch: int | None) -> None:
        """Noted, and counted with the others at the next :meth:`settle`: counting a few hundred
        requests in one loop costs the gateway ~1 µs a request live, against ~7 µs counting each
        between requests (docs/performance.md), where the rest of the request and the kernel push
        this code out of the caches."""
        seen = self._requests_seen
        seen.append((route, status, outcome, backend, seconds, methods, batch))
        if len(seen) >= SETTLE_AFTER:
            self.settle()

    def observe_attempt(self, backend: str, result: str, seconds: float, calls: Sequence[str]) -> None:
        """One attempt at a node: its result, and its duration by :func:`method_class` of ``calls``;
        counted at the next :meth:`settle`, as :meth:`observe_request`."""
        seen = self._attempts_seen
        seen.append((backend, result, seconds, calls))
        if len(seen) >= SETTLE_AFTER:
            self.settle()

    def settle(self) -> None:
        """Count what the request path observed since the last call. Runs before every export
        (a scrape, a sync of the --workers files) and whenever ``SETTLE_AFTER`` observations wait."""
        if self._requests_seen:
            seen, self._requests_seen = self._requests_seen, []
            _count_each(seen, self._count_request, "a request's")
        if self._attempts_seen:
            seen, self._attempts_seen = self._attempts_seen, []
            _count_each(seen, self._count_attempt, "an attempt's")

    def _count_request(self, route: str, status: int, outcome: str, backend: str, seconds: float,
                       methods: Sequence[str], batch: int | None) -> None:
        series = self._request_series.get((route, status, outcome, backend))
        if series is None:
            series = self._new_request_series(route, status, outcome, backend)
        requests, duration, rpc_requests, rpc_duration = series
        # Every duration histogram here has the default buckets: one bisect for all of them.
        bucket = bisect_left(self._bounds, seconds)
        requests.value += 1
        duration.counts[bucket] += 1
        duration.sum += seconds
        rpc_requests.value += 1
        rpc_duration.counts[bucket] += 1
        rpc_duration.sum += seconds
        if methods:
            calls = self._call_series.get(route)
            if calls is None:
                calls = self._call_series[route] = {}
            for method in methods:
                call = calls.get(method)
                if call is None:
                    call = self._new_call_series(route, method)
                call[0].value += 1
            # A request's time is one method's only when every call is that method (docs/metrics.md).
            if len(methods) == 1 or methods.count(methods[0]) == len(methods):
                call_duration = call[1]
                call_duration.counts[bucket] += 1
                call_duration.sum += seconds
        if batch is not None:
            sizes = self._batch
            sizes.counts[bisect_left(sizes.bounds, batch)] += 1
            sizes.sum += batch

    def watch(self, kind: str, store: object) -> None:
        """Export a store's counters: ``kind`` is "cache" or "ratelimit"."""
        collector = StoreCollector(kind, store)
        self.registry.register(collector)
        self._stores.append(collector)

    def observe_cache(self, counts: dict[str, int]) -> None:
        for result, count in counts.items():
            if count:
                self._cache_series[result].inc(count)

    def _count_attempt(self, backend: str, result: str, seconds: float, calls: Sequence[str]) -> None:
        series = self._attempt_series.get((backend, result))
        if series is None:
            series = self._attempt_series[(backend, result)] = self.upstream_attempts.child((str(backend), str(result)))
        series.value += 1
        key = (backend, method_class(calls))
        duration = self._attempt_durations.get(key)
        if duration is None:
            duration = self._attempt_durations[key] = self.attempt_duration.child((str(backend), key[1]))
        duration.counts[bisect_left(self._bounds, seconds)] += 1
        duration.sum += seconds

    def observe_check(self, check: str, backend: str, seconds: float, ok: bool) -> None:
        self.check_duration.labels(check, backend).observe(seconds)
        if not ok:
            self.check_failures.labels(check, backend).inc()
        key = (str(check), str(backend))
        if ok or key not in self.check_last_success.series:
            self.check_last_success.child(key).set(self._clock.seconds())

    def configure(self, settings: Settings) -> None:
        """Export the settings the alert rules take their thresholds from (at build and on reload)."""
        self.max_in_flight.child(()).set(settings.max_in_flight)
        self.error_budget.child(()).set(settings.error_budget_percent / 100.0)
        self.check_interval.child(("health",)).set(settings.health_check_interval_ms / 1000.0)
        self.check_interval.child(("integrity",)).set(settings.integrity_check_interval_ms / 1000.0)

    def share(self, directory: str, pid: int) -> None:
        """From now on count into ``directory`` too, and show what every process counted there
        (--workers: ops/shared_metrics.py); the node gauges stay this process's, which all workers
        share through the leader's snapshots."""
        self._files = MetricFiles(directory, pid)
        self._shared = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(self._shared, path=directory)
        self._shared.register(PoolCollector(self._pool))
        self.sync()

    def sync(self) -> None:
        """Copy what changed since the last call into this process's files (when shared)."""
        files = self._files
        if files is None:
            return
        self.settle()
        for family in self._hot.families:
            files.write_family(family)
        for store in self._stores:
            for metric in store.collect():
                files.write_metric(metric)
        for collector in self._process:
            for metric in collector.collect():
                files.write_metric(metric, PROCESS_GAUGE_MODES.get(metric.name, "livesum"))

    def unshare(self) -> None:
        """Back to this process's numbers alone: the directory is about to go."""
        if self._files is not None:
            self.sync()
            self._files.close()
        self._files = self._shared = None

    def render(self) -> bytes:
        if self._shared is None:
            return generate_latest(self.registry)
        self.sync()
        return generate_latest(self._shared)
