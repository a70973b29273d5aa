"""/ready tells the truth: 503 with the reason whenever a call on / would find no node, and from
the first moment of a graceful shutdown."""
import pytest_twisted
from twisted.internet import reactor, task

from sentinel_proxy.core.scoring import BreakerPolicy
from sentinel_proxy.ops.metrics import Metrics
from sentinel_proxy.state.backends import BackendPool
from sentinel_proxy.state.status import RequestTotals, readiness
from tests.stages_support import Verdict, trusted_pool
from tests.support import http, post_json, rpc

ensure = pytest_twisted.ensureDeferred
TOKEN = "an-admin-token-for-the-ready-tests"
BEARER = {b"authorization": [f"Bearer {TOKEN}".encode()]}
ONE_FAILURE = BreakerPolicy(consecutive_failures=1, cooldown=5.0)


def trip(pool: BackendPool, index: int, now: float) -> None:
    pool.record_outcome(pool.backends[index], now, attempt="failed")


def test_a_healthy_fleet_is_ready():
    assert readiness(trusted_pool(), now=0.0) == (True, "ready")


def test_unchecked_or_down_nodes_are_not_ready():
    pool = BackendPool(["http://a:1", "http://b:1"])
    assert readiness(pool, now=0.0) == (False, "no node can take traffic on /: 2 down")
    pool = trusted_pool(2)
    pool.record_health(pool.backends[0], False, now=1.0, error="refused")
    assert readiness(pool, now=1.0)[0], "one node left is enough"
    pool.record_health(pool.backends[1], False, now=1.0, error="refused")
    assert readiness(pool, now=1.0) == (False, "no node can take traffic on /: 2 down")


def test_drained_and_quarantined_nodes_take_no_traffic():
    pool = trusted_pool(3)
    for backend in pool.backends[:2]:
        pool.drain(backend, True)
    assert readiness(pool, now=0.0)[0]
    pool.record_health(pool.backends[2], True, now=1.0, block_number=100, chain=("1", "9"))
    pool.reassess()
    assert pool.backends[2].routing == "quarantined"
    assert readiness(pool, now=1.0) == (False, "no node can take traffic on /: 2 drained, 1 quarantined")


def test_open_breakers_everywhere_are_not_ready_until_the_cool_down():
    pool = trusted_pool(2, breaker=ONE_FAILURE)
    trip(pool, 0, now=10.0)
    assert readiness(pool, now=10.0) == (True, "ready"), "the other node's breaker is closed"
    trip(pool, 1, now=10.0)
    ready, reason = readiness(pool, now=11.0)
    assert not ready and reason == "no node can take traffic on /: the circuit breaker of every eligible node is open"
    assert readiness(pool, now=15.0) == (True, "ready"), "after the cool-down a probe may go: half-open"


def test_a_node_with_a_bad_integrity_verdict_is_a_fallback_and_serves():
    pool = trusted_pool(1)
    pool.record_integrity(pool.backends[0], Verdict(status="bad", score=10))
    assert pool.backends[0].routing == "fallback"
    assert readiness(pool, now=0.0) == (True, "ready")


def test_draining_wins_over_everything():
    assert readiness(trusted_pool(), now=0.0, draining=True) == (False, "draining: the gateway is shutting down")


@ensure
async def test_every_node_drained_makes_ready_503_with_the_reason(cluster):
    first, second = cluster.node("pruned"), cluster.node("pruned")
    _, url = await cluster.gateway([f"first={first.url}", f"second={second.url}"], admin_token=TOKEN)
    ready = await http("GET", url + "/ready")
    assert (ready.code, ready.body) == (200, b"READY")
    for name in ("first", "second"):
        assert (await http("POST", url + f"/admin/drain/{name}", headers=BEARER)).code == 200
    assert (await post_json(url, rpc("node_getBlockNumber"))).code == 503
    ready = await http("GET", url + "/ready")
    assert (ready.code, ready.body) == (503, b"NOT READY: no node can take traffic on /: 2 drained")
    assert ready.header("cache-control") == "no-store"
    assert (await http("POST", url + "/admin/undrain/second", headers=BEARER)).code == 200
    assert (await http("GET", url + "/ready")).code == 200


@ensure
async def test_ready_turns_503_once_draining_begins():
    from twisted.web.server import Site

    from sentinel_proxy.config import load_settings
    from sentinel_proxy.ops.admin import Admin
    from sentinel_proxy.web.app import GatewayApp
    from sentinel_proxy.web.auth import Access

    settings = load_settings(cli={"backends": "http://a:1"}, environ={}, dotenv_path=None)
    pool = trusted_pool()
    draining = [False]
    app = GatewayApp(pool, Metrics(pool), RequestTotals(), task.Clock(), Admin(pool, (), lambda: settings, lambda: 0),
                     Access(lambda: settings), draining=lambda: draining[0])
    port = reactor.listenTCP(0, Site(app.resource()), interface="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/ready"
        ready = await http("GET", url)
        assert (ready.code, ready.body) == (200, b"READY")
        draining[0] = True
        refused = await http("GET", url)
        assert (refused.code, refused.body) == (503, b"NOT READY: draining: the gateway is shutting down")
    finally:
        await port.stopListening()
