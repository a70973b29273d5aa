"""Prometheus collectors, on a registry object owned by the service (no import-time globals).

The five Go prototype metrics keep their names and labels: operators' dashboards and alerts
depend on them. Per-backend gauges are read from the pool at scrape time instead of being
updated on every state change, so the request path never touches them.
"""
from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .backends import BackendPool

#: Value of the prototype's "method" label; kept for compatibility (it always said "proxy").
PROXY_METHOD = "proxy"
#: "backend" label of requests answered without reaching a node (refused, no candidate).
NO_BACKEND = "none"


class PoolCollector(Collector):
    """Backend gauges computed from the pool on each scrape."""

    def __init__(self, pool: BackendPool):
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        health = GaugeMetricFamily("sentinel_proxy_backend_health", "Backend health (1 healthy, 0 not)",
                                   labels=["url"])
        score = GaugeMetricFamily("sentinel_proxy_backend_integrity_score",
                                  "Backend integrity score (0-100)", labels=["url"])
        block = GaugeMetricFamily("sentinel_proxy_backend_block_number", "Backend block number",
                                  labels=["url"])
        for backend in self._pool.backends:
            health.add_metric([backend.name], 1.0 if backend.healthy else 0.0)
            score.add_metric([backend.name], float(backend.verdict.score) if backend.verdict else 0.0)
            block.add_metric([backend.name], float(backend.block_number))
        yield health
        yield score
        yield block


class Metrics:
    def __init__(self, pool: BackendPool, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.requests = Counter("sentinel_proxy_requests", "Proxied requests",
                                ["method", "status", "backend"], registry=self.registry)
        self.duration = Histogram("sentinel_proxy_request_duration_seconds", "Proxied request duration",
                                  ["method", "backend"], registry=self.registry)
        self.registry.register(PoolCollector(pool))

    def observe_request(self, status: int, backend: str, seconds: float) -> None:
        self.requests.labels(PROXY_METHOD, str(status), backend).inc()
        self.duration.labels(PROXY_METHOD, backend).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
