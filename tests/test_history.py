"""The dashboard's history: samples of real traffic per node, bounded, taken by a loop that survives
its own failures, and served behind PROTECT_STATUS as /health is."""
import pytest_twisted
from twisted.internet import task
from twisted.logger import LogLevel

from sentinel_proxy.state.history import History, HistoryService, percentile
from sentinel_proxy.state.status import RequestTotals
from tests.stages_support import trusted_pool
from tests.support import http

ensure = pytest_twisted.ensureDeferred
TOKEN = "history-token-0123456789"


def series(history: History, name: str) -> dict:
    return next(node["series"] for node in history.document()["nodes"] if node["name"] == name)


def test_a_sample_takes_the_interval_s_traffic_not_the_health_check_s():
    clock = task.Clock()
    pool = trusted_pool(2)
    totals = RequestTotals()
    history = History(pool, totals, clock, interval=10.0)
    n0, n1 = pool.backends
    for latency in range(1, 101):  # 1..100 ms
        pool.record_outcome(n0, 0.0, attempt="answered", latency_ms=float(latency), reply_status=200)
    pool.record_outcome(n0, 0.0, attempt="failed", reply_status=502)
    for status in (200, 400, 429, 502):
        totals.record(status)
    history.sample()
    clock.advance(10.0)
    pool.record_outcome(n0, 10.0, attempt="answered", latency_ms=500.0, reply_status=200)
    history.sample()
    first = series(history, "n0:1")
    assert first["at"] == [0.0, 10.0]
    assert (first["p50"], first["p99"]) == ([51.0, 500.0], [100.0, 500.0]), "each interval's own answers"
    assert first["requests"] == [101, 1] and first["error_rate"] == [round(1 / 101, 4), 0.0]
    assert first["height"] == [100, 100] and first["lag"] == [0, 0] and first["routing"] == ["preferred"] * 2
    idle = series(history, "n1:1")
    assert idle["p50"] == [None, None] and idle["error_rate"] == [None, None], "no traffic is no value, not zero"
    traffic = history.document()["traffic"]
    assert (traffic["requests"], traffic["caller_errors"], traffic["node_errors"]) == ([4, 0], [2, 0], [1, 0])
    assert history.document()["totals"] == {"requests": 4, "callerErrors": 2, "rateLimited": 1, "refusedCalls": 0,
                                            "nodeErrors": 1}


def test_memory_is_bounded_and_removed_nodes_are_forgotten():
    clock = task.Clock()
    pool = trusted_pool(2)
    history = History(pool, RequestTotals(), clock, size=5)
    for _ in range(12):
        clock.advance(10.0)
        history.sample()
    assert len(series(history, "n0:1")["at"]) == 5 and series(history, "n0:1")["at"][0] == 80.0
    pool.replace([("n0:1", "http://n0:1")])
    history.sample()
    assert [node["name"] for node in history.document()["nodes"]] == ["n0:1"]
    assert set(history._nodes) == {"n0:1"}


def test_breaker_open_shows_in_the_routing_series():
    from sentinel_proxy.core.scoring import BreakerPolicy

    clock = task.Clock()
    pool = trusted_pool(1, breaker=BreakerPolicy(consecutive_failures=1, cooldown=60.0))
    history = History(pool, RequestTotals(), clock)
    pool.record_outcome(pool.backends[0], 0.0, attempt="failed")
    history.sample()
    assert series(history, "n0:1")["routing"] == ["breaker-open"]


def test_percentile_is_nearest_rank():
    assert percentile([1.0], 0.99) == 1.0
    assert percentile([float(i) for i in range(1, 11)], 0.5) == 6.0


def test_the_sampler_runs_on_its_clock_and_survives_a_failing_sample(logged):
    clock = task.Clock()
    history = History(trusted_pool(1), RequestTotals(), clock, interval=10.0)
    service = HistoryService(history, clock)
    service.startService()
    assert len(series(history, "n0:1")["at"]) == 1, "a first sample at start"
    real = history.sample
    history.sample = lambda: 1 / 0
    clock.advance(10.0)
    history.sample = real
    clock.advance(10.0)
    assert series(history, "n0:1")["at"] == [0.0, 20.0]
    (failure,) = [e for e in logged if e.get("log_level") == LogLevel.critical]
    assert failure["log_failure"].check(ZeroDivisionError) and failure["interval"] == 10.0
    service.stopService()


@ensure
async def test_the_history_route_is_protected_as_health_is(cluster):
    node = cluster.node("pruned")
    service, url = await cluster.gateway([node], admin_token=TOKEN, protect_status="on")
    refused = await http("GET", url + "/dashboard/history")
    assert refused.code == 401
    answer = await http("GET", url + "/dashboard/history", headers={b"authorization": [b"Bearer " + TOKEN.encode()]})
    assert answer.code == 200 and answer.header("cache-control") == "no-store"
    document = answer.json()
    assert [n["name"] for n in document["nodes"]] == [node.url] and document["interval"] == 10.0
    assert {e["kind"] for e in document["timeline"]} >= {"up"}
