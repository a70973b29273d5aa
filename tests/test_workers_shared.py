"""One gateway across --workers: one set of metrics, and drains and breaker openings in every worker."""
import http.client
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request

from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import task

from sentinel_proxy import __version__
from sentinel_proxy.core.scoring import BreakerPolicy
from sentinel_proxy.ops.metrics import Metrics
from sentinel_proxy.ops.workers import FollowerLink, LeaderLink
from sentinel_proxy.state.backends import BackendPool
from tests.processes import Daemon, free_port, poll
from tests.stages_support import trusted_pool

TOKEN = "an-admin-token-of-some-length"


def values(text: bytes) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def total(text: bytes, name: str, **labels: str) -> float:
    return sum(value for (sample, pairs), value in values(text).items()
               if sample == name and set(labels.items()) <= set(pairs))


class Store:
    hits = misses = stores = evictions = errors = bytes = 0


def test_every_scrape_shows_every_workers_counts(tmp_path):
    pool = trusted_pool(2)
    first, second = Metrics(pool), Metrics(pool)
    stores = Store(), Store()
    for metrics, store, pid in ((first, stores[0], 1001), (second, stores[1], 1002)):
        metrics.watch("cache", store)
        metrics.share(str(tmp_path), pid)
    first.observe_request("/", 200, "ok", "http://n0:1", 0.02, ("node_getBlockNumber",), 3)
    second.observe_request("/", 200, "ok", "http://n0:1", 0.2, ("node_getBlockNumber",), None)
    second.observe_request("/pruned", 502, "upstream_error", "http://n1:1", 7.0, ("node_getBlock",), None)
    first.observe_check("health", "http://n0:1", 0.01, ok=False)
    second.local_errors.labels("accept").inc()
    second.connections_refused.child(("per_client",)).inc(2)
    first.in_flight.inc()
    second.in_flight.inc(2)
    stores[0].hits, stores[1].hits, stores[1].bytes = 4, 5, 100

    second.sync()
    seen = first.render()
    assert total(seen, "sentinel_proxy_requests_total") == 3
    assert total(seen, "sentinel_proxy_rpc_requests_total", route="/", outcome="ok") == 2
    assert total(seen, "sentinel_proxy_rpc_call_duration_seconds_count", method="node_getBlockNumber") == 2
    assert total(seen, "sentinel_proxy_rpc_call_duration_seconds_bucket", method="node_getBlockNumber",
                 le="0.025") == 1
    assert total(seen, "sentinel_proxy_rpc_call_duration_seconds_bucket", method="node_getBlockNumber",
                 le="+Inf") == 2
    assert total(seen, "sentinel_proxy_request_duration_seconds_sum") == pytest.approx(7.22)
    assert total(seen, "sentinel_proxy_batch_size_count") == 1
    assert total(seen, "sentinel_proxy_check_failures_total", check="health") == 1
    assert total(seen, "sentinel_proxy_check_duration_seconds_count", check="health") == 1
    assert total(seen, "sentinel_proxy_local_errors_total", where="accept") == 1
    assert total(seen, "sentinel_proxy_connections_refused_total", reason="per_client") == 2
    assert total(seen, "sentinel_proxy_in_flight_requests") == 3
    assert total(seen, "sentinel_proxy_cache_hits_total") == 9 and total(seen, "sentinel_proxy_cache_bytes") == 100
    assert total(seen, "sentinel_proxy_backend_health") == 2, "the node gauges: this worker's pool, once"
    counters = {key: value for key, value in values(seen).items() if key[0].endswith(("_total", "_count", "_bucket"))
                and not key[0].startswith(("process_", "python_"))}  # (those move with every render)
    assert values(second.render()).items() >= counters.items(), "the same totals whichever worker renders"

    # A worker that is gone: its counts stay in the totals, its requests in flight leave them.
    second.unshare()
    mark_process_dead(1002, str(tmp_path))
    after = first.render()
    assert total(after, "sentinel_proxy_requests_total") == 3 and total(after, "sentinel_proxy_in_flight_requests") == 1
    first.unshare()
    assert total(first.render(), "sentinel_proxy_requests_total") == 1, "unshared: this process's numbers again"


def test_per_process_values_combine_into_the_gateways(tmp_path):
    """process_* and python_* and the settings gauges: summed where a sum means something (memory,
    CPU, open files, in-flight capacity), else one worker's value (limits, start, version, intervals)."""
    pool = trusted_pool(2)
    workers = Metrics(pool), Metrics(pool)
    limits = SimpleNamespace(max_in_flight=64, health_check_interval_ms=2500, integrity_check_interval_ms=60000,
                             error_budget_percent=5)
    for metrics, pid in zip(workers, (1001, 1002)):
        metrics.configure(limits)
        metrics.share(str(tmp_path), pid)
        metrics.observe_attempt("n0:1", "ok", 0.03, ("node_getBlock",))
    workers[0].observe_check("integrity", "n0:1", 0.2, True)
    own = values(generate_latest(workers[0].registry))
    workers[1].sync()
    seen = workers[0].render()
    assert total(seen, "sentinel_proxy_build_info", version=__version__) == 1
    assert total(seen, "sentinel_proxy_max_in_flight") == 128, "the gateway's capacity, as in-flight is summed"
    assert total(seen, "sentinel_proxy_check_interval_seconds", check="health") == 2.5
    assert total(seen, "sentinel_proxy_error_budget_ratio") == 0.05, "a setting, not summed"
    assert total(seen, "sentinel_proxy_check_last_success_timestamp_seconds", check="integrity") > 0
    assert total(seen, "sentinel_proxy_upstream_attempt_duration_seconds_count", method_class="archive") == 2
    assert total(seen, "process_max_fds") == own[("process_max_fds", ())]
    assert total(seen, "process_start_time_seconds") == own[("process_start_time_seconds", ())]
    assert total(seen, "process_resident_memory_bytes") > 1.5 * own[("process_resident_memory_bytes", ())]
    assert total(seen, "process_cpu_seconds_total") >= 2 * own[("process_cpu_seconds_total", ())] - 0.5
    assert total(seen, "python_info") == 1
    assert total(seen, "python_gc_collections_total") >= own[("python_gc_collections_total", (("generation", "0"),))]
    assert [key for key in values(seen) if ("pid", "1001") in key[1] or ("pid", "1002") in key[1]] == []

    workers[1].unshare()
    mark_process_dead(1002, str(tmp_path))
    after = workers[0].render()
    assert total(after, "sentinel_proxy_max_in_flight") == 64
    assert total(after, "process_resident_memory_bytes") < 1.5 * own[("process_resident_memory_bytes", ())]
    workers[0].unshare()


def test_sync_cost(tmp_path, capsys):
    """µs per sync of a busy worker's series (printed, not asserted): the request path pays nothing."""
    metrics = Metrics(trusted_pool(3))
    metrics.share(str(tmp_path), 1001)
    methods = [f"node_{name}" for name in ("getBlockNumber", "getBlock", "getTxReceipt", "getL2Tips", "getNodeInfo")]
    for i in range(3000):
        metrics.observe_request("/", 200, "ok", f"http://n{i % 3}:1", (i % 100) / 100, methods[: i % 5 + 1], i % 4)
    metrics.sync()
    timings: dict[str, list[float]] = {"nothing new": [], "after 100 requests": []}
    for round in range(50):
        for shape, count in (("nothing new", 0), ("after 100 requests", 100)):
            for i in range(count):
                metrics.observe_request("/", 200, "ok", f"http://n{i % 3}:1", 0.01 * i, methods[: i % 5 + 1], None)
            started = time.perf_counter()
            metrics.sync()
            timings[shape].append(time.perf_counter() - started)
    metrics.unshare()
    with capsys.disabled():
        print("\nMetrics.sync: " + ", ".join(f"{k} {min(v) * 1e6:.0f} µs" for k, v in timings.items()))


def linked(count: int = 2):
    """A leader and ``count`` followers over lists: what each side wrote, delivered by hand."""
    clock = task.Clock()
    clock.advance(100)
    entries = [("a", "http://a:1"), ("b", "http://b:1")]
    policy = BreakerPolicy(consecutive_failures=3, cooldown=30.0)
    changes: list[int] = []
    leader_pool = BackendPool(entries)
    leader_pool.set_breaker_policy(policy)
    leader = LeaderLink(leader_pool, clock, lambda: changes.append(1))
    leader_pool.on_breaker_change = leader.breaker_changed
    followers, outboxes = [], []
    for number in range(1, count + 1):
        pool = BackendPool(entries)
        pool.set_breaker_policy(policy)
        outbox: list[bytes] = []
        link = FollowerLink(pool, number, clock, outbox.append)
        pool.on_breaker_change = link.breaker_changed
        followers.append((pool, link))
        outboxes.append(outbox)
    return clock, leader_pool, leader, followers, outboxes, changes


def deliver(leader, outboxes):
    for number, outbox in enumerate(outboxes, start=1):
        for line in outbox:
            leader.received(number, line.rstrip(b"\n"))
        outbox.clear()


def test_a_drain_in_one_worker_reaches_all_without_flapping():
    _, leader_pool, leader, followers, outboxes, changes = linked()
    (pool1, link1), (pool2, link2) = followers
    stale = leader.state()  # published before the drain reached the leader
    pool1.drain(pool1.backends[0], True)
    link1.drained(pool1.backends[0])
    link1.apply(stale)
    assert pool1.backends[0].drained, "a publication from before the drain does not undo it"
    link2.apply(stale)
    assert not pool2.backends[0].drained

    deliver(leader, outboxes)
    assert changes and leader_pool.backends[0].drained
    state = leader.state()
    for pool, link in followers:
        link.apply(state)
        assert [b.drained for b in pool.backends] == [True, False]
        assert pool.backends[0].routing == "drained"

    # Undrained from the leader itself: the followers follow.
    leader_pool.drain(leader_pool.backends[0], False)
    leader.drained(leader_pool.backends[0])
    state = leader.state()
    for pool, link in followers:
        link.apply(state)
        assert not pool.backends[0].drained


def test_a_breaker_opening_reaches_all_once():
    clock, leader_pool, leader, followers, outboxes, _ = linked()
    (pool1, _), (pool2, link2) = followers
    for _ in range(3):
        pool1.record_outcome(pool1.backends[1], clock.seconds(), attempt="failed")
    assert pool1.backends[1].breaker.state == "open"
    deliver(leader, outboxes)
    assert leader_pool.backends[1].breaker.state == "open"
    assert leader_pool.backends[0].breaker.state == "closed"
    state = leader.state()
    for pool, link in followers:
        link.apply(state)
    assert [b.breaker.state for b in pool2.backends] == ["closed", "open"]
    assert len(pool1.backends[1].breaker.transitions) == 1, "the worker it opened in is not tripped again"
    assert outboxes == [[], []], "an opening applied from elsewhere does not travel back"
    assert leader.state()["opened"] == [], "published once"

    # One that opens in the leader travels too; each breaker then closes on its own traffic.
    clock.advance(31)
    for _ in range(3):
        leader_pool.record_outcome(leader_pool.backends[0], clock.seconds(), attempt="failed")
    state = leader.state()
    assert state["opened"] == [("http://a:1", 0)]
    link2.apply(state)
    assert pool2.backends[0].breaker.state == "open" and pool2.backends[1].breaker.available(clock.seconds())


def test_the_leader_ignores_messages_that_are_not_ours():
    _, leader_pool, leader, _, _, changes = linked()
    for line in (b"not json", b"[]", b'{"kind": "drain", "url": "http://a:1"}', b'{"kind": "x", "url": "http://a:1"}',
                 b'{"kind": "opened", "url": "http://elsewhere:1"}'):
        leader.received(1, line)
    assert not changes and not leader_pool.backends[0].drained and leader.state()["opened"] == []


def rpc(base: str, i: int) -> tuple[int, str | None, str | None]:
    """One call on a new connection (the kernel spreads them over the workers): status, worker, node."""
    body = json.dumps([{"jsonrpc": "2.0", "id": i, "method": "node_getPendingTxCount", "params": []}]).encode()
    request = urllib.request.Request(base + "/", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
            return response.status, response.headers["X-Sentinel-Worker"], response.headers["X-Sentinel-Backend"]
    except urllib.error.HTTPError as error:
        return error.code, error.headers["X-Sentinel-Worker"], error.headers["X-Sentinel-Backend"]


def on_worker(port: int, worker: str) -> http.client.HTTPConnection:
    """A kept-alive connection that ``worker`` accepted (the kernel picks: try new ones, bounded)."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "node_getPendingTxCount", "params": []})
    for _ in range(100):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("POST", "/", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        if response.headers["X-Sentinel-Worker"] == worker:
            return connection
        connection.close()
    raise AssertionError(f"no connection reached worker {worker} in 100")


def scrape(base: str) -> bytes:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        return response.read()


@pytest.mark.slow
def test_two_workers_are_one_gateway(tmp_path):
    port = free_port()
    daemon = Daemon(["sentinel-proxy", "--demo", "--listen", f"tcp:{port}:interface=127.0.0.1", "--workers", "2",
                     "--admin-token", TOKEN], tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        directory = daemon.wait_for_line(r"started 1 more workers on the same port \(metrics in (.+)\)")[1]
        assert os.path.isdir(directory)
        sent, workers, nodes = 0, set(), []

        def traffic(count: int) -> None:
            nonlocal sent
            for _ in range(count):
                status, worker, node = rpc(base, sent)
                sent += 1
                workers.add(worker)
                if status == 200:
                    nodes.append(node)

        totals: list[float] = []

        def counted() -> bool:
            text = scrape(base)
            totals.append(total(text, "sentinel_proxy_rpc_requests_total"))
            return totals[-1] == sent

        # Metrics: each scrape (a new connection, either worker) shows both workers' calls, never fewer.
        assert poll(lambda: traffic(20) or (workers == {"0", "1"} and nodes), timeout=30), workers
        for _ in range(5):
            traffic(10)
            totals.append(total(scrape(base), "sentinel_proxy_rpc_requests_total"))
        assert poll(counted, timeout=10), (totals, sent)
        assert totals == sorted(totals), f"a scrape went backwards: {totals}"

        # A drain through a connection that a follower took: within a second no worker sends it anything.
        drained = nodes[-1]
        connection = on_worker(port, "1")
        try:
            connection.request("POST", f"/admin/drain/{drained}", headers={"Authorization": f"Bearer {TOKEN}"})
            response = connection.getresponse()
            assert json.loads(response.read())["drained"] is True
        finally:
            connection.close()
        started = time.monotonic()

        def avoided() -> bool:
            answers = [rpc(base, i) for i in range(20)]
            return all(node != drained for _, _, node in answers)

        assert poll(avoided, timeout=2.0), "the drain must reach every worker"
        took = time.monotonic() - started
        answers = [rpc(base, i) for i in range(60)]
        assert all(node != drained for _, _, node in answers), answers
        assert any(status == 200 for status, _, _ in answers), "the other nodes serve"
        print(f"\ndrain seen by every worker within {took:.2f} s")
    finally:
        daemon.process.send_signal(signal.SIGTERM)
        code = daemon.process.wait(timeout=30)
        daemon.stop()
    assert code == 0, "".join(daemon.lines)
    assert not os.path.exists(directory), "the metrics directory goes with the leader"
    assert not re.search(r"Traceback|Unhandled", "".join(daemon.lines)), "".join(daemon.lines)
