"""The check services' loops, driven by task.Clock, with an in-memory upstream."""
import pytest
from twisted.internet import defer, task

from sentinel_proxy.backends import BackendPool
from sentinel_proxy.checks import HealthService, IntegrityService, block_number_of
from sentinel_proxy.integrity import IntegrityParams
from sentinel_proxy.upstream import RpcCallError, UpstreamError


class ScriptedUpstream:
    """Answers check calls from a table: node URL -> method -> value, exception, or a pending Deferred."""

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    async def call(self, backend, method, params, timeout):
        self.calls.append((backend.url, method))
        answer = self.answers[backend.url][method]
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, defer.Deferred):
            return await answer
        return answer


def health_service(pool, upstream, clock):
    return HealthService(pool, upstream, interval=30.0, timeout=5.0, clock=clock)


def test_health_check_runs_at_start_and_every_interval():
    clock = task.Clock()
    pool = BackendPool(["http://good:1", "http://notready:1", "http://down:1", "http://garbage:1"])
    upstream = ScriptedUpstream({
        "http://good:1": {"node_isReady": True, "node_getBlockNumber": "1234"},
        "http://notready:1": {"node_isReady": False},
        "http://down:1": {"node_isReady": UpstreamError("connect", "refused")},
        "http://garbage:1": {"node_isReady": True, "node_getBlockNumber": {"no": "number"}},
    })
    service = health_service(pool, upstream, clock)
    service.startService()
    good, notready, down, garbage = pool.backends
    assert good.healthy and good.block_number == 1234
    assert not notready.healthy and "node_isReady" in notready.last_error
    assert not down.healthy and "refused" in down.last_error
    assert not garbage.healthy and "not a number" in garbage.last_error
    upstream.answers["http://down:1"] = {"node_isReady": True, "node_getBlockNumber": 99}
    clock.advance(30.0)
    assert down.healthy and down.block_number == 99
    assert len([c for c in upstream.calls if c == ("http://good:1", "node_isReady")]) == 2
    service.stopService()


def test_a_crashing_check_does_not_stop_the_loop():
    clock = task.Clock()
    pool = BackendPool(["http://a:1"])
    upstream = ScriptedUpstream({"http://a:1": {"node_isReady": ZeroDivisionError("bug")}})
    service = health_service(pool, upstream, clock)
    service.startService()
    upstream.answers["http://a:1"] = {"node_isReady": True, "node_getBlockNumber": 1}
    clock.advance(30.0)
    assert pool.backends[0].healthy
    assert service.running and service._loop.running
    service.stopService()


def test_stop_cancels_a_check_stuck_on_a_hanging_node():
    clock = task.Clock()
    pool = BackendPool(["http://hang:1"])
    stuck = defer.Deferred()
    service = health_service(pool, ScriptedUpstream({"http://hang:1": {"node_isReady": stuck}}), clock)
    service.startService()
    stopped = service.stopService()
    assert stopped.called, "shutdown waited for a hanging check"


def test_integrity_check_records_the_verdict_and_survives_garbage():
    clock = task.Clock()
    pool = BackendPool(["http://a:1", "http://b:1"])
    upstream = ScriptedUpstream({
        "http://a:1": {"node_getValidatorsStats": {"stats": {}, "slotWindow": 0}},
        "http://b:1": {"node_getValidatorsStats": "garbage"},
    })
    service = IntegrityService(pool, upstream, 60.0, 5.0, clock, IntegrityParams())
    service.startService()
    a, b = pool.backends
    assert a.verdict.status == "unverified" and a.node_type == ""
    assert b.verdict is None
    clock.advance(60.0)
    assert len([c for c in upstream.calls if c[0] == "http://b:1"]) == 2
    service.stopService()


@pytest.mark.parametrize("value, expected", [(0, 0), (17, 17), ("42", 42)])
def test_block_number_accepts_numbers_and_numeric_strings(value, expected):
    assert block_number_of(value) == expected


@pytest.mark.parametrize("value", [True, -1, "0x10", "", None, 1.5, [1]])
def test_block_number_refuses_the_rest(value):
    with pytest.raises(RpcCallError):
        block_number_of(value)
