"""The request path's metrics: plain numbers exported at scrape time, the same exposition as
prometheus_client's own objects fed the same observations (docs/metrics.md is the contract)."""
import math
import random
import timeit

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sentinel_proxy.ops.metrics import (BATCH_BUCKETS, KNOWN_METHODS, NO_BACKEND, OUTCOMES, PROXY_METHOD, ROUTES,
                                        Metrics, PoolCollector, method_label)

from tests.stages_support import sample, trusted_pool

DEFAULT_BOUNDS = (.005, .01, .025, .05, .075, .1, .25, .5, .75, 1.0, 2.5, 5.0, 7.5, 10.0)


class Reference:
    """What Metrics recorded before: prometheus_client's Counter, Histogram and Gauge (same names,
    help, labels and buckets), children cached as the request path cached them."""

    def __init__(self, pool):
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
                                           "Duration of the request that carried each JSON-RPC call", ["method"],
                                           registry=r)
        self.batch_size = Histogram("sentinel_proxy_batch_size", "Calls per JSON-RPC batch", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.in_flight = Gauge("sentinel_proxy_in_flight_requests", "RPC requests being handled", registry=r)
        self.upstream_attempts = Counter("sentinel_proxy_upstream_attempts", "Requests sent to nodes by result",
                                         ["backend", "result"], registry=r)
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
            label = method_label(method)
            child(self.rpc_calls, label, route).inc()
            child(self.rpc_call_duration, label).observe(seconds)
        if batch is not None:
            self.batch_size.observe(batch)

    def observe_cache(self, counts):
        for result, count in counts.items():
            if count:
                self.cache_calls.labels(result).inc(count)

    def observe_attempt(self, backend, result):
        self._child(self.upstream_attempts, backend, result).inc()

    def observe_check(self, check, backend, seconds, ok):
        self.check_duration.labels(check, backend).observe(seconds)
        if not ok:
            self.check_failures.labels(check, backend).inc()


def parsed(registry) -> dict:
    """name -> (type, help, {(sample name, sorted labels): value}) of a text scrape."""
    families = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        samples = {}
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
        families[family.name] = (family.type, family.documentation, samples)
    return families


def same_exposition(ours: Metrics, reference: Reference) -> None:
    got, want = parsed(ours.registry), parsed(reference.registry)
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
METHODS = sorted(KNOWN_METHODS)[:12] + ["other", "node_notAMethod", "eth_blockNumber", ""]
RESULTS = ("ok", "timeout", "connect", "transport", "bad_answer", "too_large")


def feed(targets, pool, rounds: int, seed: int = 7) -> None:
    """The same random traffic to every target: requests, attempts, cache counts, failovers, hedges,
    breaker transitions, in-flight moves and checks."""
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
        attempt = (rng.choice(backends[:-1]), rng.choice(RESULTS))
        cache = {"hit": rng.randint(0, 2), "miss": rng.randint(0, 1), "coalesced": rng.randint(0, 1)}
        step = rng.random()
        state = rng.choice(("open", "half-open", "closed"))
        check = rng.choice(("health", "integrity"))
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
            target.observe_request(route, status, outcome, backend, seconds, methods, batch)
            if step < 0.9:
                target.in_flight.dec()


def test_a_fresh_scrape_is_the_reference_one():
    pool = trusted_pool(2)
    same_exposition(Metrics(pool), Reference(pool))


def test_random_traffic_gives_the_reference_exposition():
    pool = trusted_pool(3)
    ours, reference = Metrics(pool), Reference(pool)
    feed((ours, reference), pool, 3000)
    same_exposition(ours, reference)
    # Not only equivalent: the same text, in the same order.
    assert ours.render() == generate_latest(reference.registry)


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
    assert sample(metrics, "sentinel_proxy_rpc_call_duration_seconds_count", method="other") == 2
    text = metrics.render().decode()
    assert "node_made_up" not in text
    # Every route x outcome is there from the start, at zero.
    for route in ROUTES:
        for outcome in OUTCOMES:
            assert f'sentinel_proxy_rpc_requests_total{{outcome="{outcome}",route="{route}"}}' in text
            assert (f'sentinel_proxy_rpc_request_duration_seconds_count{{outcome="{outcome}",route="{route}"}}'
                    in text)


def test_unknown_method_names_do_not_grow_the_request_path_caches():
    metrics = Metrics(trusted_pool(1))
    for i in range(500):
        metrics.observe_request("/", 200, "ok", "http://n0:1", 0.01, (f"node_x{i}",), None)
    assert not metrics._call_series.get("/") and len(metrics._other_series) == 1
    assert sample(metrics, "sentinel_proxy_rpc_calls_total", method="other", route="/") == 500


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
        for name, target in (("prometheus_client", Reference(pool)), ("plain numbers", Metrics(pool))):
            def observe(target=target):
                target.observe_request("/", 200, "ok", "http://n0:1", 0.0123, methods, batch)
            number = 20000
            timings[name] = min(timeit.repeat(observe, number=number, repeat=5)) / number * 1e6
        lines.append(f"observe_request, {shape}: " + ", ".join(f"{k} {v:.2f} µs" for k, v in timings.items()))
    with capsys.disabled():
        print("\n" + "\n".join(lines))
