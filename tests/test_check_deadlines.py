"""Each node's check on its own deadline: a hung node delays no other node's verdict, nor the next
round of the others. In memory: the real check client over ``RequestTraversalAgent`` to simulated
nodes, ``task.Clock`` for the loops and the deadlines."""
from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from sentinel_proxy.checks import HealthService, IntegrityService
from sentinel_proxy.checks.client import CallError
from sentinel_proxy.config import load_settings
from sentinel_proxy.interfaces import ICheckClient
from sentinel_proxy.ops.metrics import Metrics
from sentinel_proxy.service import make_checks
from sentinel_proxy.state.backends import BackendPool
from sentinel_proxy.upstream.client import PooledAgent

from tests.support import CHAIN_SETTINGS
from tests.checks_support import PARAMS, Setup, simulated

INTERVAL = 30.0
DEADLINE = 5.0


def setup_of(**scenarios: str) -> tuple[task.Clock, dict[str, Any], Setup]:
    """Simulated nodes by name, each in its scenario, on one clock, and the checks' setup over them."""
    clock = task.Clock()
    nodes = {name: simulated(scenario, clock) for name, scenario in scenarios.items()}
    return clock, nodes, Setup(clock, nodes)


def health(setup: Setup, timeout: float = DEADLINE) -> HealthService:
    return HealthService(setup.pool, setup.client, INTERVAL, timeout, setup.clock)


def test_a_hung_node_delays_no_other_node_s_verdict():
    clock, nodes, setup = setup_of(hung="hang", good="pruned")
    service = health(setup)
    service.startService()
    hung, good = setup.backends["hung"], setup.backends["good"]
    assert good.healthy and good.last_check == 0.0, "recorded when it arrived, not at the end of the round"
    assert hung.last_check is None
    clock.advance(DEADLINE)
    assert not hung.healthy and hung.last_error == f"no answer within {DEADLINE:g} s"
    service.stopService()


def test_a_node_killed_while_another_hangs_is_marked_down_at_the_next_round():
    """The issue's case, with a hung check longer than the interval: before, the loop waited for
    the hung node's round, so the killed node's next check came only after it."""
    clock, nodes, setup = setup_of(hung="hang", killed="pruned")
    service = health(setup, timeout=INTERVAL + 15.0)
    service.startService()
    killed = setup.backends["killed"]
    assert killed.healthy
    clock.advance(7.0)
    nodes["killed"].scenario = "failing-500"
    clock.advance(INTERVAL - 7.0)
    assert not killed.healthy and killed.last_check == INTERVAL and killed.last_error == "HTTP 500"
    assert nodes["hung"].requests == 1, "a node whose check still runs is not asked twice"
    clock.advance(15.0)
    assert setup.backends["hung"].last_error == f"no answer within {INTERVAL + 15.0:g} s"
    clock.advance(INTERVAL - 15.0)
    assert nodes["hung"].requests == 2 and nodes["killed"].requests == 3, "both back on the schedule"
    service.stopService()


def test_a_round_is_reassessed_without_waiting_for_a_hung_node_of_an_earlier_round():
    clock, nodes, setup = setup_of(hung="hang", good="pruned")
    service = health(setup, timeout=INTERVAL * 3)
    service.startService()
    clock.advance(INTERVAL)
    reassessed: list[float] = []
    setup.pool.reassess = lambda: reassessed.append(clock.seconds())  # type: ignore[method-assign]
    done = service.run_once()
    assert done.called and reassessed == [INTERVAL], "the round of the others ended at once"
    service.stopService()


def test_stop_cancels_every_check_still_running():
    clock, nodes, setup = setup_of(a="hang", b="hang")
    service = health(setup)
    service.startService()
    assert service.stopService().called
    setup.agent.flush()
    assert [node.in_flight for node in nodes.values()] == [0, 0]
    assert all(backend.last_check is None for backend in setup.pool.backends)
    service.startService()  # started again: nothing left over marks a node as still being checked
    assert [node.requests for node in nodes.values()] == [2, 2]
    service.stopService()


@implementer(ICheckClient)
class Scripted:
    """A check client whose batches the test answers; it records each batch's timeout."""

    def __init__(self) -> None:
        self.timeouts: list[float] = []
        self.pending: list[defer.Deferred[Any]] = []

    def batch(self, backend: Any, calls: Any, timeout: float) -> defer.Deferred[Any]:
        self.timeouts.append(timeout)
        self.pending.append(defer.Deferred())
        return self.pending[-1]

    def fetch(self, backend: Any, body: bytes, timeout: float) -> defer.Deferred[Any]:
        raise AssertionError("not a health call")


def test_one_deadline_covers_the_whole_check_a_second_batch_included():
    clock = task.Clock()
    pool = BackendPool(["http://a:1"])
    backend = pool.backends[0]
    backend.tips_method = "node_getL2Tips"
    client = Scripted()
    service = HealthService(pool, client, INTERVAL, DEADLINE, clock)
    service.startService()
    clock.advance(3.0)
    moved = CallError("node_getL2Tips: error", -32601)
    client.pending[0].callback(([True, 1000, {}, {}, moved], _NoHeaders()))
    assert client.timeouts == [DEADLINE, DEADLINE - 3.0], "the second batch gets what is left"
    service.stopService()


class _NoHeaders:
    def getRawHeaders(self, name: bytes) -> None:
        return None


def test_integrity_rounds_do_not_wait_for_a_hung_node_either():
    """The integrity check keeps the request deadline (the validator stats are megabytes): a node
    hung for all of it delays no other node's next round."""
    clock, nodes, setup = setup_of(hung="hang", good="pruned")
    service = IntegrityService(setup.pool, setup.client, 10.0, 30.0, clock, PARAMS)
    service.startService()
    assert setup.backends["good"].verdict is not None
    clock.advance(10.0)
    assert nodes["good"].requests == 2 and nodes["hung"].requests == 1
    service.stopService()


class Reactor(MemoryReactorClock):
    def getThreadPool(self) -> None:
        return None  # the integrity check's runner: not run here


def test_the_gateway_gives_health_checks_their_own_deadline():
    """HEALTH_CHECK_TIMEOUT_MS, not REQUEST_TIMEOUT_MS, ends a health check of a silent node."""
    reactor = Reactor()
    settings = load_settings(cli={"backends": "http://127.0.0.1:1", "health_check_timeout_ms": "1234",
                                  "request_timeout_ms": "30000", **CHAIN_SETTINGS}, environ={}, dotenv_path=None)
    pool = BackendPool(settings.backends)
    checks = make_checks(settings, pool, PooledAgent(reactor), Metrics(pool), reactor)
    checks[0].run_once()
    reactor.advance(1.233)
    assert pool.backends[0].last_check is None
    reactor.advance(0.001)
    assert pool.backends[0].last_error == "no answer within 1.234 s"
