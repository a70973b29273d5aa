"""Prometheus collectors, on a registry object owned by the service (no import-time globals).

The five Go prototype metrics keep their names and labels: operators' dashboards and alerts
depend on them. Per-backend state (health, lag, verdicts, quarantines) is read from the pool at
scrape time instead of being pushed on every change, so the request path never touches it.
Labels taken from requests are bounded: a JSON-RPC method outside :data:`KNOWN_METHODS` counts as
"other", so a caller cannot create series at will. docs/metrics.md lists every metric.
"""
from __future__ import annotations

from typing import Iterable, Iterator

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sentinel_proxy.state.backends import BackendPool

#: Value of the prototype's "method" label; kept for compatibility (it always said "proxy").
PROXY_METHOD = "proxy"
#: "backend" label of requests answered without reaching a node (refused, no candidate).
NO_BACKEND = "none"
OTHER_METHOD = "other"

#: Public Aztec node methods (2.x to 4.x) that get their own label value.
KNOWN_METHODS = frozenset({
    "node_isReady", "node_getNodeInfo", "node_getNodeVersion", "node_getVersion", "node_getChainId",
    "node_getL1ContractAddresses", "node_getProtocolContractAddresses", "node_getEncodedEnr",
    "node_getBlockNumber", "node_getProvenBlockNumber", "node_getCheckpointedBlockNumber", "node_getL2Tips",
    "node_getBlock", "node_getBlocks", "node_getBlockByHash", "node_getBlockByArchive", "node_getBlockHeader",
    "node_getPublishedBlocks", "node_getCheckpoints", "node_getCheckpointedBlocks",
    "node_getTxReceipt", "node_getTxEffect", "node_getTxByHash", "node_getTxsByHash", "node_getPendingTxs",
    "node_getPendingTxCount", "node_sendTx", "node_isValidTx", "node_simulatePublicCalls",
    "node_getPublicStorageAt", "node_getContract", "node_getContractClass", "node_getCurrentBaseFees",
    "node_getCurrentMinFees", "node_getMaxPriorityFees", "node_getValidatorsStats", "node_getValidatorStats",
    "node_getWorldStateSyncStatus", "node_getL2ToL1Messages", "node_getLogsByTags", "node_getPrivateLogsByTags",
    "node_getPublicLogsByTagsFromContract", "node_getPublicLogs", "node_getPrivateLogs",
    "node_getContractClassLogs", "node_findLeavesIndexes", "node_getNullifierMembershipWitness",
    "node_getLowNullifierMembershipWitness", "node_getPublicDataWitness", "node_getPublicDataTreeWitness",
    "node_getArchiveMembershipWitness", "node_getNoteHashMembershipWitness",
    "node_getL1ToL2MessageMembershipWitness", "node_getBlockHashMembershipWitness",
    "node_getL1ToL2MessageBlock", "node_isL1ToL2MessageSynced", "node_getArchiveSiblingPath",
    "node_getNoteHashSiblingPath", "node_getNullifierSiblingPath", "node_getPublicDataSiblingPath",
    "node_getL1ToL2MessageSiblingPath", "node_registerContractFunctionSignatures", "node_getAllowedPublicSetup",
    "p2p_getPeers", "p2p_getPendingTxs", "p2p_getPendingTxCount", "p2p_getEncodedEnr", "p2p_getTxByHash",
    "p2p_getTxStatus", "p2p_getAttestationsForSlot",
})

ROUTES = ("/", "/archiver", "/pruned")
OUTCOMES = ("ok", "rpc_error", "upstream_error", "timeout", "rejected")
INTEGRITY_STATUSES = ("perfect", "good", "bad", "unverified")
ROUTING_STATES = ("preferred", "fallback", "quarantined", "down", "drained")
QUARANTINE_REASONS = ("lag", "chain")
NODE_TYPES = ("archiver", "pruned")
BREAKER_STATES = ("closed", "open", "half-open")
BATCH_BUCKETS = (1, 2, 3, 5, 10, 20, 50, 100)


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else OTHER_METHOD


class PoolCollector(Collector):
    """Backend gauges computed from the pool on each scrape."""

    def __init__(self, pool: BackendPool):
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        def family(name: str, doc: str, labels: Iterable[str] = ("url",)) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=list(labels))

        health = family("sentinel_proxy_backend_health", "Backend health (1 healthy, 0 not)")
        score = family("sentinel_proxy_backend_integrity_score", "Backend integrity score (0-100)")
        block = family("sentinel_proxy_backend_block_number", "Backend block number")
        lag = family("sentinel_proxy_backend_lag_blocks", "Blocks behind the best healthy node on the same chain")
        oldest = family("sentinel_proxy_backend_oldest_block",
                        "Oldest block whose state the node serves (-1 when the node does not say)")
        priority = family("sentinel_proxy_backend_priority", "Selection priority (the prototype's formula)")
        status = family("sentinel_proxy_backend_integrity_status", "1 for the node's current integrity status",
                        ("url", "status"))
        node_type = family("sentinel_proxy_backend_node_type", "1 for the node's type", ("url", "type"))
        routing = family("sentinel_proxy_backend_routing", "1 for how the request path treats the node",
                         ("url", "state"))
        breaker = family("sentinel_proxy_backend_breaker_state", "1 for the node's circuit breaker state",
                         ("url", "state"))
        quarantine = family("sentinel_proxy_backend_quarantined", "1 when the node is quarantined for that reason",
                            ("url", "reason"))
        for backend in self._pool.backends:
            url = backend.label
            health.add_metric([url], 1.0 if backend.healthy else 0.0)
            score.add_metric([url], float(backend.verdict.score) if backend.verdict else 0.0)
            block.add_metric([url], float(backend.block_number))
            lag.add_metric([url], float(backend.lag))
            oldest.add_metric([url], float(-1 if backend.oldest_block is None else backend.oldest_block))
            priority.add_metric([url], float(backend.priority))
            current = backend.verdict.status if backend.verdict else ""
            for value in INTEGRITY_STATUSES:
                status.add_metric([url, value], 1.0 if current == value else 0.0)
            for value in NODE_TYPES:
                node_type.add_metric([url, value], 1.0 if backend.node_type == value else 0.0)
            for value in ROUTING_STATES:
                routing.add_metric([url, value], 1.0 if backend.routing == value else 0.0)
            for value in BREAKER_STATES:
                breaker.add_metric([url, value], 1.0 if backend.breaker.state == value else 0.0)
            for value in QUARANTINE_REASONS:
                quarantine.add_metric([url, value], 1.0 if value in backend.quarantine else 0.0)
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


class Metrics:
    def __init__(self, pool: BackendPool, registry: CollectorRegistry | None = None):
        # No ``*_created`` series: the Go prototype never had them, and they double every counter's
        # and histogram's series for no alert anyone writes (a process-wide client setting).
        disable_created_metrics()
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        # The prototype's request metrics (contract: names and labels unchanged).
        self.requests = Counter("sentinel_proxy_requests", "Proxied requests", ["method", "status", "backend"],
                                registry=r)
        self.duration = Histogram("sentinel_proxy_request_duration_seconds", "Proxied request duration",
                                  ["method", "backend"], registry=r)
        # Ours.
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
        self.check_duration = Histogram("sentinel_proxy_check_duration_seconds", "Health and integrity check duration",
                                        ["check", "backend"], registry=r)
        self.check_failures = Counter("sentinel_proxy_check_failures", "Failed health and integrity checks",
                                      ["check", "backend"], registry=r)
        self.registry.register(PoolCollector(pool))
        self._children: dict[tuple, object] = {}
        self._preset()

    def _preset(self) -> None:
        """Create every route/outcome series up front, so rate() and alerts see zeros, not gaps."""
        self._cache_children = {result: self.cache_calls.labels(result) for result in ("hit", "miss", "coalesced")}
        for route in ROUTES:
            self.failovers.labels(route)
            self.hedges.labels(route)
            for outcome in OUTCOMES:
                self.rpc_requests.labels(route, outcome)
                self.rpc_duration.labels(route, outcome)

    def _child(self, metric: Counter | Histogram, *labels: str) -> Counter | Histogram:
        """``metric.labels(...)`` costs a lock and a tuple build; the request path caches children."""
        key = (id(metric),) + labels
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(self, route: str, status: int, outcome: str, backend: str, seconds: float,
                        methods: Iterable[str], batch: int | None) -> None:
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

    def watch(self, kind: str, store: object) -> None:
        """Export a store's counters: ``kind`` is "cache" or "ratelimit"."""
        self.registry.register(StoreCollector(kind, store))

    def observe_cache(self, counts: dict[str, int]) -> None:
        for result, count in counts.items():
            if count:
                self._cache_children[result].inc(count)

    def observe_attempt(self, backend: str, result: str) -> None:
        self._child(self.upstream_attempts, backend, result).inc()

    def observe_check(self, check: str, backend: str, seconds: float, ok: bool) -> None:
        self._child(self.check_duration, check, backend).observe(seconds)
        if not ok:
            self._child(self.check_failures, check, backend).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
