"""The request path's metrics: plain numbers exported at scrape time, the same exposition as
prometheus_client's own objects fed the same observations (docs/metrics.md is the contract)."""
import math
import random
import re
import timeit

from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import task

from sentinel_proxy import __version__
from sentinel_proxy.core import methods as method_table
from sentinel_proxy.ops.metrics import (BATCH_BUCKETS, KNOWN_METHODS, METHOD_CLASSES, NO_BACKEND, OUTCOMES,
                                        PROXY_METHOD, ROUTES, Metrics, PoolCollector, method_class, method_label)

from tests.stages_support import sample, trusted_pool

DEFAULT_BOUNDS = (.005, .01, .025, .05, .075, .1, .25, .5, .75, 1.0, 2.5, 5.0, 7.5, 10.0)


class Reference:
    """What Metrics recorded before: prometheus_client's Counter, Histogram and Gauge (same names,
    help, labels and buckets), children cached as the request path cached them."""

    def __init__(self, pool, clock):
        self.clock = clock
        self.checked = set()
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("sentinel_proxy_requests", "Proxied requests", ["method", "status", "backend"],
                                registry=r)
        self.duration = Histogram("sentinel_proxy_request_duration_seconds", "Proxied request duration",
                                  ["method", "backend"], registry=r)
        self.rpc_requests = Counter("sentinel_proxy_rpc_requests", "HTTP requests to the RPC routes by outcome",
                                    ["route", "outcome"], registry=r)
        self.rpc_duration = Histogram("sentinel_proxy_rpc_request_duration_seconds",
                                      "Duration of HTTP requests to the RPC routes", ["route", "outcome"], registry=r)
        self.rpc_calls = Counter("sentinel_proxy_rpc_calls", "JSON-RPC calls (batch items counted one by one)",
                                 ["method", "route"], registry=r)
        self.rpc_call_duration = Histogram("sentinel_proxy_rpc_call_duration_seconds",
                                           "Duration of requests whose calls all use this method (one call, or a "
                                           "batch of this method alone), once per request", ["method"], registry=r)
        self.batch_size = Histogram("sentinel_proxy_batch_size", "Calls per JSON-RPC batch", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.in_flight = Gauge("sentinel_proxy_in_flight_requests", "RPC requests being handled", registry=r)
        self.upstream_attempts = Counter("sentinel_proxy_upstream_attempts", "Requests sent to nodes by result",
                                         ["backend", "result"], registry=r)
        self.attempt_duration = Histogram("sentinel_proxy_upstream_attempt_duration_seconds",
                                          "Duration of each attempt at a node (real traffic), by the class of the "
                                          "methods it carried", ["backend", "method_class"], registry=r)
        self.failovers = Counter("sentinel_proxy_failovers", "Requests sent on to another node after a failure",
                                 ["route"], registry=r)
        self.hedges = Counter("sentinel_proxy_hedges", "Hedged reads: a second node asked because the first was slow",
                              ["route"], registry=r)
        self.breaker_transitions = Counter("sentinel_proxy_breaker_transitions",
                                           "Circuit breaker state changes", ["backend", "state"], registry=r)
        self.cache_calls = Counter("sentinel_proxy_cache_calls", "Cacheable calls by how they were answered",
                                   ["result"], registry=r)
        self.local_errors = Counter("sentinel_proxy_local_errors", "The gateway's own failures (out of file "
                                    "descriptors, no local port or memory), never counted against a node", ["where"],
                                    registry=r)
        self.connections_refused = Counter("sentinel_proxy_connections_refused", "Caller connections closed at once "
                                           "by MAX_CONNECTIONS or MAX_CONNECTIONS_PER_CLIENT", ["reason"], registry=r)
        self.client_timeouts = Counter("sentinel_proxy_client_timeouts", "Requests cut off because their headers or "
                                       "body did not arrive in time (CLIENT_HEADER_TIMEOUT_MS, CLIENT_BODY_TIMEOUT_MS)",
                                       ["phase"], registry=r)
        self.check_duration = Histogram("sentinel_proxy_check_duration_seconds", "Health and integrity check duration",
                                        ["check", "backend"], registry=r)
        self.check_failures = Counter("sentinel_proxy_check_failures", "Failed health and integrity checks",
                                      ["check", "backend"], registry=r)
        self.check_last_success = Gauge("sentinel_proxy_check_last_success_timestamp_seconds",
                                        "When the check of the node last succeeded (Unix time; the time of its first "
                                        "check until one does)", ["check", "backend"], registry=r)
        Gauge("sentinel_proxy_build_info", "Always 1: the gateway's version", ["version"],
              registry=r).labels(__version__).set(1)
        self.max_in_flight = Gauge("sentinel_proxy_max_in_flight", "MAX_IN_FLIGHT: requests in flight past which "
                                   "callers get 503 (with --workers, summed over the workers like "
                                   "sentinel_proxy_in_flight_requests)", registry=r)
        self.error_budget = Gauge("sentinel_proxy_error_budget_ratio", "ERROR_BUDGET_PERCENT as a ratio: the share "
                                  "of requests that may fail at the nodes before SentinelHighErrorRate fires",
                                  registry=r)
        self.check_interval = Gauge("sentinel_proxy_check_interval_seconds", "HEALTH_CHECK_INTERVAL_MS and "
                                    "INTEGRITY_CHECK_INTERVAL_MS, in seconds", ["check"], registry=r)
        r.register(PoolCollector(pool))
        self._children = {}
        for where in ("upstream", "check", "accept"):
            self.local_errors.labels(where)
        for reason in ("total", "per_client"):
            self.connections_refused.labels(reason)
        for phase in ("header", "body"):
            self.client_timeouts.labels(phase)
        for route in ROUTES:
            self.failovers.labels(route)
            self.hedges.labels(route)
            for outcome in OUTCOMES:
                self.rpc_requests.labels(route, outcome)
                self.rpc_duration.labels(route, outcome)
        for result in ("hit", "miss", "coalesced"):
            self.cache_calls.labels(result)

    def _child(self, metric, *labels):
        key = (id(metric),) + labels
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(self, route, status, outcome, backend, seconds, methods, batch):
        child = self._child
        child(self.requests, PROXY_METHOD, str(status), backend).inc()
        child(self.duration, PROXY_METHOD, backend).observe(seconds)
        child(self.rpc_requests, route, outcome).inc()
        child(self.rpc_duration, route, outcome).observe(seconds)
        for method in methods:
            child(self.rpc_calls, method_label(method), route).inc()
            child(self.rpc_call_duration, method_label(method))  # its series exists from the first call on
        if len(set(methods)) == 1:
            child(self.rpc_call_duration, method_label(methods[0])).observe(seconds)
        if batch is not None:
            self.batch_size.observe(batch)

    def observe_cache(self, counts):
        for result, count in counts.items():
            if count:
                self.cache_calls.labels(result).inc(count)

    def observe_attempt(self, backend, result, seconds, calls):
        self._child(self.upstream_attempts, backend, result).inc()
        classes = {self.class_of(method) for method in calls}
        klass = classes.pop() if len(classes) == 1 else "mixed" if classes else "other"
        self._child(self.attempt_duration, backend, klass).observe(seconds)

    @staticmethod
    def class_of(method):
        """Straight from the method table, for the exact spellings only (as the method label)."""
        row = method_table.lookup(method)
        if row is None or method_label(method) == "other":
            return "other"
        return "write" if not row.safe else "archive" if row.routing else "read"

    def observe_check(self, check, backend, seconds, ok):
        self.check_duration.labels(check, backend).observe(seconds)
        if not ok:
            self.check_failures.labels(check, backend).inc()
        if ok or (check, backend) not in self.checked:
            self.check_last_success.labels(check, backend).set(self.clock.seconds())
        self.checked.add((check, backend))

    def configure(self, settings):
        self.max_in_flight.set(settings.max_in_flight)
        self.error_budget.set(settings.error_budget_percent / 100.0)
        self.check_interval.labels("health").set(settings.health_check_interval_ms / 1000.0)
        self.check_interval.labels("integrity").set(settings.integrity_check_interval_ms / 1000.0)


#: The process's own collectors: their values move between two scrapes, so they are compared apart.
PROCESS_PREFIXES = ("process_", "python_")


def name_of(line: bytes) -> str:
    """The metric name of an exposition line (``# HELP name ...``, ``# TYPE name ...`` or a sample)."""
    if line.startswith(b"# "):
        return line.split(b" ", 3)[2].decode()
    return re.split(rb"[{ ]", line, maxsplit=1)[0].decode()


def ours_without_process(text: bytes) -> bytes:
    """A scrape without the process_* and python_* families (which the reference does not make)."""
    return b"".join(line for line in text.splitlines(keepends=True) if not name_of(line).startswith(PROCESS_PREFIXES))


def parsed(text: bytes) -> dict:
    """name -> (type, help, {(sample name, sorted labels): value}) of a text scrape."""
    families = {}
    for family in text_string_to_metric_families(text.decode()):
        samples = {}
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
        families[family.name] = (family.type, family.documentation, samples)
    return families


def same_exposition(ours: Metrics, reference: Reference) -> None:
    got = parsed(ours_without_process(ours.render()))
    want = parsed(generate_latest(reference.registry))
    assert got.keys() == want.keys()
    for name in want:
        assert got[name][:2] == want[name][:2], name
        got_samples, want_samples = got[name][2], want[name][2]
        assert got_samples.keys() == want_samples.keys(), name
        for key, value in want_samples.items():
            # Exact: the sums add the same floats in the same order.
            assert got_samples[key] == value or (math.isnan(value) and math.isnan(got_samples[key])), (name, key)


EDGES = [b for bound in DEFAULT_BOUNDS for b in (bound, math.nextafter(bound, 0.0), math.nextafter(bound, 1e9))]
SECONDS = EDGES + [0.0, -0.001, 1e-9, 10.0000001, 60.0, math.inf]
BATCHES = [1, 2, 3, 4, 5, 6, 10, 11, 20, 21, 50, 51, 99, 100, 101, 1000]
METHODS = sorted(KNOWN_METHODS)[:12] + ["node_sendTx", "node_getBlock", "aztec_getPublicStorageAt", "other",
                                        "node_notAMethod", "eth_blockNumber", ""]
RESULTS = ("ok", "timeout", "connect", "transport", "bad_answer", "too_large")


def feed(targets, clock, pool, rounds: int, seed: int = 7) -> None:
    """The same random traffic to every target: requests, attempts, cache counts, failovers, hedges,
    breaker transitions, in-flight moves, checks and reloads; ``clock`` is the targets' clock."""
    rng = random.Random(seed)
    backends = [b.label for b in pool.backends] + [NO_BACKEND]
    for _ in range(rounds):
        route = rng.choice(ROUTES + ("/other",))
        status = rng.choice((200, 400, 401, 429, 502, 503))
        outcome = rng.choice(OUTCOMES)
        backend = rng.choice(backends)
        seconds = rng.choice(SECONDS) if rng.random() < 0.7 else rng.uniform(0.0, 12.0)
        batch = rng.choice(BATCHES) if rng.random() < 0.5 else None
        methods = tuple(rng.choice(METHODS) for _ in range(rng.randint(0, 4)))
        if rng.random() < 0.3:  # a batch of one method: timed per method
            methods = methods[:1] * rng.randint(1, 4)
        attempt = (rng.choice(backends[:-1]), rng.choice(RESULTS), rng.uniform(0.0, 3.0), methods or ("node_getBlock",))
        cache = {"hit": rng.randint(0, 2), "miss": rng.randint(0, 1), "coalesced": rng.randint(0, 1)}
        step = rng.random()
        state = rng.choice(("open", "half-open", "closed"))
        check = rng.choice(("health", "integrity"))
        limits = SimpleNamespace(max_in_flight=rng.randint(1, 5000), health_check_interval_ms=2500,
                                 error_budget_percent=rng.randint(1, 100),
                                 integrity_check_interval_ms=rng.randint(1, 10 ** 6))
        clock.advance(1.5)
        for target in targets:
            target.in_flight.inc()
            target.observe_attempt(*attempt)
            target.observe_cache(cache)
            if step < 0.1:
                target.failovers.labels(route).inc()
            elif step < 0.2:
                target.hedges.labels(route).inc()
            elif step < 0.25:
                target.breaker_transitions.labels(attempt[0], state).inc()
            elif step < 0.3:
                target.observe_check(check, attempt[0], seconds, step < 0.27)
            elif step < 0.31:
                target.configure(limits)
            target.observe_request(route, status, outcome, backend, seconds, methods, batch)
            if step < 0.9:
                target.in_flight.dec()


def test_a_fresh_scrape_is_the_reference_one():
    pool, clock = trusted_pool(2), task.Clock()
    same_exposition(Metrics(pool, clock=clock), Reference(pool, clock))


def test_random_traffic_gives_the_reference_exposition():
    pool = trusted_pool(3)
    clock = task.Clock()
    ours, reference = Metrics(pool, clock=clock), Reference(pool, clock)
    feed((ours, reference), clock, pool, 3000)
    same_exposition(ours, reference)
    # Not only equivalent: the same text, in the same order, followed by the process's own families.
    text = ours.render()
    assert ours_without_process(text) == generate_latest(reference.registry)
    assert text.startswith(generate_latest(reference.registry))


def test_a_value_on_a_bound_goes_in_that_bucket():
    metrics = Metrics(trusted_pool(1))
    labels = {"route": "/", "outcome": "ok"}
    for bound in DEFAULT_BOUNDS:
        metrics.observe_request("/", 200, "ok", "http://n0:1", bound, (), None)
    for i, bound in enumerate(DEFAULT_BOUNDS):
        le = repr(float(bound))
        assert sample(metrics, "sentinel_proxy_rpc_request_duration_seconds_bucket", le=le, **labels) == i + 1
    metrics = Metrics(trusted_pool(1))
    metrics.observe_request("/", 200, "ok", "http://n0:1", math.nextafter(0.005, 1.0), (), None)
    assert sample(metrics, "sentinel_proxy_rpc_request_duration_seconds_bucket", le="0.005", **labels) == 0
    assert sample(metrics, "sentinel_proxy_rpc_request_duration_seconds_bucket", le="0.01", **labels) == 1


def test_inf_bucket_count_and_sum():
    metrics = Metrics(trusted_pool(1))
    for seconds in (0.001, 10.0, 10.5, 99.0):
        metrics.observe_request("/pruned", 502, "timeout", "http://n0:1", seconds, ("node_getBlock",), None)
    for name, labels in (("sentinel_proxy_rpc_request_duration_seconds", {"route": "/pruned", "outcome": "timeout"}),
                         ("sentinel_proxy_request_duration_seconds", {"method": "proxy", "backend": "http://n0:1"}),
                         ("sentinel_proxy_rpc_call_duration_seconds", {"method": "node_getBlock"})):
        assert sample(metrics, f"{name}_bucket", le="0.005", **labels) == 1
        assert sample(metrics, f"{name}_bucket", le="10.0", **labels) == 2
        assert sample(metrics, f"{name}_bucket", le="+Inf", **labels) == 4
        assert sample(metrics, f"{name}_count", **labels) == 4
        assert sample(metrics, f"{name}_sum", **labels) == 0.001 + 10.0 + 10.5 + 99.0


def test_batch_size_buckets():
    metrics = Metrics(trusted_pool(1))
    for size in (1, 2, 4, 100, 101):
        metrics.observe_request("/", 200, "ok", "http://n0:1", 0.01, (), size)
    metrics.observe_request("/", 200, "ok", "http://n0:1", 0.01, (), None)  # not a batch: not counted
    expected = {"1.0": 1, "2.0": 2, "3.0": 2, "5.0": 3, "50.0": 3, "100.0": 4, "+Inf": 5}
    for le, count in expected.items():
        assert sample(metrics, "sentinel_proxy_batch_size_bucket", le=le) == count
    assert sample(metrics, "sentinel_proxy_batch_size_count") == 5
    assert sample(metrics, "sentinel_proxy_batch_size_sum") == 208.0


def test_label_values():
    metrics = Metrics(trusted_pool(1))
    metrics.observe_request("/archiver", 503, "rejected", NO_BACKEND, 0.002,
                            ("node_getBlockNumber", "node_made_up", "other", "node_getBlockNumber"), 4)
    assert sample(metrics, "sentinel_proxy_requests_total", method="proxy", status="503", backend="none") == 1
    assert sample(metrics, "sentinel_proxy_request_duration_seconds_count", method="proxy", backend="none") == 1
    assert sample(metrics, "sentinel_proxy_rpc_requests_total", route="/archiver", outcome="rejected") == 1
    assert sample(metrics, "sentinel_proxy_rpc_calls_total", method="node_getBlockNumber", route="/archiver") == 2
    assert sample(metrics, "sentinel_proxy_rpc_calls_total", method="other", route="/archiver") == 2
    # Calls of several methods: their time is no one method's.
    assert sample(metrics, "sentinel_proxy_rpc_call_duration_seconds_count", method="other") == 0
    text = metrics.render().decode()
    assert "node_made_up" not in text
    # Every route x outcome is there from the start, at zero.
    for route in ROUTES:
        for outcome in OUTCOMES:
            assert f'sentinel_proxy_rpc_requests_total{{outcome="{outcome}",route="{route}"}}' in text
            assert (f'sentinel_proxy_rpc_request_duration_seconds_count{{outcome="{outcome}",route="{route}"}}'
                    in text)


def test_a_request_is_timed_for_its_method_only_when_all_its_calls_share_it():
    metrics = Metrics(trusted_pool(1))
    metrics.observe_request("/", 200, "ok", "n0", 0.2, ("node_getBlock",), None)
    metrics.observe_request("/", 200, "ok", "n0", 0.4, ("node_getBlock",) * 3, 3)
    metrics.observe_request("/", 200, "ok", "n0", 9.0, ("node_getBlock", "node_getBlockNumber"), 2)
    assert sample(metrics, "sentinel_proxy_rpc_calls_total", method="node_getBlock", route="/") == 5
    assert sample(metrics, "sentinel_proxy_rpc_call_duration_seconds_count", method="node_getBlock") == 2
    assert sample(metrics, "sentinel_proxy_rpc_call_duration_seconds_sum", method="node_getBlock") == 0.2 + 0.4
    assert sample(metrics, "sentinel_proxy_rpc_call_duration_seconds_count", method="node_getBlockNumber") == 0


def test_method_classes_come_from_the_method_table():
    assert method_class(("node_sendTx",)) == method_class(("aztec_sendTx",)) == "write"
    assert method_class(("node_getBlock",)) == method_class(("aztec_getPublicStorageAt",)) == "archive"
    assert method_class(("node_getBlocks",)) == "archive"
    assert method_class(("node_getBlockNumber",)) == method_class(("p2p_getPendingTxs",)) == "read"
    assert method_class(("node_getBlockNumber", "node_getL2Tips")) == "read"
    assert method_class(("eth_call",)) == method_class(("node_sendTx_x",)) == method_class(()) == "other"
    assert method_class(("node_getBlock", "node_getBlockNumber")) == "mixed"
    assert {method_class((m,)) for m in KNOWN_METHODS} == {"read", "archive", "write"}
    assert set(METHOD_CLASSES) == {"read", "archive", "write", "other", "mixed"}


def test_node_attempts_are_timed_by_node_and_method_class():
    metrics = Metrics(trusted_pool(2))
    metrics.observe_attempt("n0:1", "ok", 0.03, ("node_getBlock",))
    metrics.observe_attempt("n0:1", "timeout", 10.0, ("node_getBlock", "aztec_getBlockHeader"))
    metrics.observe_attempt("n1:1", "ok", 0.2, ("node_sendTx",))
    metrics.observe_attempt("n1:1", "ok", 0.001, ("node_getBlockNumber", "node_getBlock"))
    labels = {"backend": "n0:1", "method_class": "archive"}
    assert sample(metrics, "sentinel_proxy_upstream_attempt_duration_seconds_count", **labels) == 2
    assert sample(metrics, "sentinel_proxy_upstream_attempt_duration_seconds_bucket", le="0.05", **labels) == 1
    assert sample(metrics, "sentinel_proxy_upstream_attempt_duration_seconds_sum", **labels) == 10.03
    assert sample(metrics, "sentinel_proxy_upstream_attempt_duration_seconds_count", backend="n1:1",
                  method_class="write") == 1
    assert sample(metrics, "sentinel_proxy_upstream_attempt_duration_seconds_count", backend="n1:1",
                  method_class="mixed") == 1
    assert sample(metrics, "sentinel_proxy_upstream_attempts_total", backend="n0:1", result="timeout") == 1


def test_every_node_metric_names_the_node_by_one_label_but_the_prototypes_three():
    metrics = Metrics(trusted_pool(2))
    metrics.observe_attempt("n0:1", "ok", 0.03, ("node_getBlock",))
    metrics.observe_check("health", "n0:1", 0.01, True)
    metrics.breaker_transitions.labels("n0:1", "open").inc()
    prototype = {"sentinel_proxy_backend_health", "sentinel_proxy_backend_integrity_score",
                 "sentinel_proxy_backend_block_number"}
    named = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            node_labels = {"url", "backend"} & set(s.labels)
            if node_labels:
                named.setdefault(family.name, set()).update(node_labels)
    assert {name for name, labels in named.items() if labels == {"url"}} == prototype
    assert all(labels == {"backend"} for name, labels in named.items() if name not in prototype)
    assert len(named) > 15


def test_build_info_and_the_settings_the_alerts_compare_against():
    metrics = Metrics(trusted_pool(1))
    assert sample(metrics, "sentinel_proxy_build_info", version=__version__) == 1
    metrics.configure(SimpleNamespace(max_in_flight=64, health_check_interval_ms=2500,
                                      integrity_check_interval_ms=60000, error_budget_percent=5))
    assert sample(metrics, "sentinel_proxy_max_in_flight") == 64
    assert sample(metrics, "sentinel_proxy_check_interval_seconds", check="health") == 2.5
    assert sample(metrics, "sentinel_proxy_check_interval_seconds", check="integrity") == 60.0
    assert sample(metrics, "sentinel_proxy_error_budget_ratio") == 0.05
    metrics.configure(SimpleNamespace(max_in_flight=8, health_check_interval_ms=1000,
                                      integrity_check_interval_ms=60000, error_budget_percent=20))  # a reload
    assert sample(metrics, "sentinel_proxy_max_in_flight") == 8
    assert sample(metrics, "sentinel_proxy_error_budget_ratio") == 0.2


def test_a_check_last_succeeded_when_it_last_passed():
    clock = task.Clock()
    metrics = Metrics(trusted_pool(1), clock=clock)
    clock.advance(100)
    metrics.observe_check("integrity", "n0:1", 0.5, False)  # never passed yet: counted from the first check
    assert sample(metrics, "sentinel_proxy_check_last_success_timestamp_seconds", check="integrity",
                  backend="n0:1") == 100
    clock.advance(60)
    metrics.observe_check("integrity", "n0:1", 0.5, True)
    clock.advance(60)
    metrics.observe_check("integrity", "n0:1", 0.5, False)
    assert sample(metrics, "sentinel_proxy_check_last_success_timestamp_seconds", check="integrity",
                  backend="n0:1") == 160


def test_process_and_python_collectors():
    families = {f.name: f for f in text_string_to_metric_families(Metrics(trusted_pool(1)).render().decode())}
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_start_time_seconds",
                 "process_open_fds", "python_info", "python_gc_objects_collected"):
        assert name in families, name
    assert families["process_resident_memory_bytes"].samples[0].value > 1e6


def test_unknown_method_names_do_not_grow_the_request_path_caches():
    metrics = Metrics(trusted_pool(1))
    for i in range(500):
        metrics.observe_request("/", 200, "ok", "http://n0:1", 0.01, (f"node_x{i}",), None)
    metrics.settle()
    assert not metrics._call_series.get("/") and len(metrics._other_series) == 1
    assert sample(metrics, "sentinel_proxy_rpc_calls_total", method="other", route="/") == 500


def test_observations_are_counted_by_every_export_and_never_wait_unbounded():
    """The request path's observations are counted together (Metrics.settle): a scrape sees every
    one made before it, and no more than SETTLE_AFTER wait in between."""
    from sentinel_proxy.ops.metrics import SETTLE_AFTER

    metrics = Metrics(trusted_pool(1))
    metrics.observe_request("/", 200, "ok", "n0", 0.01, ("node_getBlockNumber",), 1)
    metrics.observe_attempt("n0", "ok", 0.005, ("node_getBlockNumber",))
    assert sample(metrics, "sentinel_proxy_requests_total", method="proxy", status="200", backend="n0") == 1
    assert sample(metrics, "sentinel_proxy_upstream_attempts_total", backend="n0", result="ok") == 1
    for _ in range(SETTLE_AFTER + 3):
        metrics.observe_request("/", 200, "ok", "n0", 0.01, ("node_getBlockNumber",), 1)
    assert len(metrics._requests_seen) == 3, "counted on their own once SETTLE_AFTER waited"
    assert (b'sentinel_proxy_requests_total{backend="n0",method="proxy",status="200"} %d.0' % (SETTLE_AFTER + 4)
            in metrics.render())


def test_the_rare_counters_keep_prometheus_client_labels():
    metrics = Metrics(trusted_pool(1))
    metrics.failovers.labels("/").inc()
    metrics.failovers.labels(route="/").inc(2)
    metrics.breaker_transitions.labels("http://n0:1", "open").inc()
    assert sample(metrics, "sentinel_proxy_failovers_total", route="/") == 3
    assert sample(metrics, "sentinel_proxy_breaker_transitions_total", backend="http://n0:1", state="open") == 1
    with pytest.raises(ValueError):
        metrics.failovers.labels("/", "extra")
    with pytest.raises(ValueError):
        metrics.failovers.labels(path="/")
    with pytest.raises(ValueError):
        metrics.failovers.labels("/").inc(-1)
    metrics.in_flight.inc()
    metrics.in_flight.inc()
    metrics.in_flight.dec()
    assert sample(metrics, "sentinel_proxy_in_flight_requests") == 1


def test_names_stay_reserved_on_the_registry():
    metrics = Metrics(trusted_pool(1))
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Counter("sentinel_proxy_requests", "again", registry=metrics.registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Histogram("sentinel_proxy_rpc_call_duration_seconds", "again", registry=metrics.registry)


def test_microbenchmark_observe_request(capsys):
    """µs per observe_request, before (prometheus_client objects) and now: printed, not asserted."""
    pool = trusted_pool(2)
    lines = []
    for shape, methods, batch in (("one call", ("node_getBlockNumber",), None),
                                  ("batch of 3", ("node_getBlock", "node_getBlockNumber", "node_nope"), 3)):
        timings = {}
        for name, target in (("prometheus_client", Reference(pool, task.Clock())), ("plain numbers", Metrics(pool))):
            def observe(target=target):
                target.observe_request("/", 200, "ok", "http://n0:1", 0.0123, methods, batch)
            number = 20000
            timings[name] = min(timeit.repeat(observe, number=number, repeat=5)) / number * 1e6
        lines.append(f"observe_request, {shape}: " + ", ".join(f"{k} {v:.2f} µs" for k, v in timings.items()))
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_an_observation_that_cannot_be_counted_loses_only_itself(logged):
    metrics = Metrics(trusted_pool(1))
    metrics.observe_request("/", 200, "ok", "n0", 0.01, ("node_getBlockNumber",), 1)
    metrics.observe_request("/", 200, "ok", "n0", "not seconds", ("node_getBlockNumber",), 1)  # type: ignore[arg-type]
    metrics.observe_request("/", 200, "ok", "n0", 0.02, ("node_getBlockNumber",), 1)
    assert sample(metrics, "sentinel_proxy_requests_total", method="proxy", status="200", backend="n0") == 2
    failures = [event for event in logged if "log_failure" in event]
    assert len(failures) == 1 and failures[0]["log_failure"].check(TypeError)
