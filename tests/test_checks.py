"""The check services' loops, driven by task.Clock, with an in-memory upstream."""
import json

import pytest
from twisted.internet import defer, task
from twisted.web.http_headers import Headers

from sentinel_proxy.state.backends import BackendPool
from sentinel_proxy.checks.periodic import HealthService, IntegrityService, block_number_of, chain_of, oldest_block_of
from sentinel_proxy.core.integrity import IntegrityParams
from sentinel_proxy.upstream.client import RpcCallError, UpstreamError, UpstreamResponse


class ScriptedUpstream:
    """Answers check calls from a table: node URL -> method -> value, exception, or a pending Deferred.

    A whole-request failure (the node is down) is a table entry of an exception instead of a dict.
    """

    def __init__(self, answers, headers=None):
        self.answers = answers
        self.headers = headers or Headers()
        self.calls = []

    async def _answer(self, backend, method):
        self.calls.append((backend.url, method))
        table = self.answers[backend.url]
        if isinstance(table, BaseException):
            raise table
        answer = table.get(method, RpcCallError(f"{method}: error -32601"))
        if isinstance(answer, defer.Deferred):
            return await answer
        return answer

    async def batch(self, backend, calls, timeout):
        results = []
        for method, _ in calls:
            answer = await self._answer(backend, method)
            if isinstance(answer, BaseException) and not isinstance(answer, RpcCallError):
                raise answer
            results.append(answer)
        return results, self.headers

    async def fetch(self, backend, body, timeout):
        method = json.loads(body)["method"]
        answer = await self._answer(backend, method)
        if isinstance(answer, BaseException):
            raise answer
        return UpstreamResponse(200, Headers(), json.dumps({"jsonrpc": "2.0", "id": 1, "result": answer}).encode())


def health_service(pool, upstream, clock):
    return HealthService(pool, upstream, interval=30.0, timeout=5.0, clock=clock)


def test_health_check_runs_at_start_and_every_interval():
    clock = task.Clock()
    pool = BackendPool(["http://good:1", "http://notready:1", "http://down:1", "http://garbage:1"])
    upstream = ScriptedUpstream({
        "http://good:1": {"node_isReady": True, "node_getBlockNumber": "1234"},
        "http://notready:1": {"node_isReady": False},
        "http://down:1": UpstreamError("connect", "refused"),
        "http://garbage:1": {"node_isReady": True, "node_getBlockNumber": {"no": "number"}},
    })
    service = health_service(pool, upstream, clock)
    service.startService()
    good, notready, down, garbage = pool.backends
    assert good.healthy and good.block_number == 1234
    assert not notready.healthy and "node_isReady answered False" in notready.last_error
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
    upstream = ScriptedUpstream({"http://a:1": ZeroDivisionError("bug")})
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


def test_health_round_reads_chain_and_depth_and_quarantines():
    clock = task.Clock()
    urls = ["http://a:1", "http://b:1", "http://c:1", "http://d:1"]
    pool = BackendPool(urls, max_block_lag=10)
    info = {"l1ChainId": 31337, "rollupVersion": 1}
    upstream = ScriptedUpstream({
        "http://a:1": {"node_isReady": True, "node_getBlockNumber": 100, "node_getNodeInfo": info,
                       "node_getWorldStateSyncStatus": {"oldestHistoricBlockNumber": 1}},
        "http://b:1": {"node_isReady": True, "node_getBlockNumber": 95, "node_getNodeInfo": info,
                       "node_getWorldStateSyncStatus": {"oldestHistoricBlockNumber": 40}},
        "http://c:1": {"node_isReady": True, "node_getBlockNumber": 80, "node_getNodeInfo": info},
        "http://d:1": {"node_isReady": True, "node_getBlockNumber": 500,
                       "node_getNodeInfo": {"l1ChainId": 31337, "rollupVersion": 2}},
    })
    service = health_service(pool, upstream, clock)
    service.startService()
    a, b, c, d = pool.backends
    assert (a.oldest_block, b.oldest_block, c.oldest_block) == (1, 40, None)
    assert (a.node_type, b.node_type, c.node_type) == ("archiver", "pruned", "")
    assert "rollupVersion 2" in d.quarantine["chain"] and "lag" not in d.quarantine
    assert a.lag == 0 and b.lag == 5 and not b.quarantine
    assert c.lag == 20 and "20 blocks behind" in c.quarantine["lag"]
    assert [x.routing for x in pool.backends] == ["fallback", "fallback", "quarantined", "quarantined"]
    service.stopService()


def test_chain_identity_sources():
    headers = Headers({b"x-aztec-l1ChainId": [b"1"], b"x-aztec-rollupVersion": [b"7"]})
    assert chain_of({"l1ChainId": 5, "rollupVersion": 3}, headers) == ("5", "3")
    assert chain_of(RpcCallError("no such method"), headers) == ("1", "7")
    assert chain_of(None, Headers()) is None
    assert oldest_block_of({"oldestHistoricBlockNumber": 12}) == 12
    assert oldest_block_of({"oldestHistoricBlockNumber": True}) is None
    assert oldest_block_of(RpcCallError("x")) is None
