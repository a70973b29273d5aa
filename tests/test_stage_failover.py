"""The failover stage: picking, attempts, judging, hedging and breaker outcomes, against in-memory
nodes on a ``task.Clock`` (no sockets, no sleeps); and, over loopback, one caller's bad requests
against a real gateway (slow)."""
import gzip
import json
from typing import Any

import pytest
import pytest_twisted

from twisted.internet import defer, task
from zope.interface.verify import verifyObject

from sentinel_proxy.core import jsonrpc
from sentinel_proxy.core.scoring import BreakerPolicy
from sentinel_proxy.interfaces import IForwardingClient
from sentinel_proxy.ops.metrics import Metrics
from sentinel_proxy.proxy.failover import Failover, answer_reply, judge
from sentinel_proxy.proxy.guard import check, plan
from sentinel_proxy.proxy.values import Attempt, Caller, Inbound, Limits, Plan
from sentinel_proxy.upstream.response import UpstreamError, UpstreamResponse

from tests.stages_support import (JSON, TRIGGER_HAPPY, MemoryClient, answer, body_of, hang, pairs, result, rig, rpc, sample,
                                  settled, trusted_pool)

#: One failure opens a breaker: whether an outcome was charged shows in the state.


class Nodes:
    def __init__(self, count: int = 3, breaker: BreakerPolicy | None = None):
        self.clock = task.Clock()
        self.clock.advance(1000.0)
        self.pool = trusted_pool(count, breaker)
        self.client = MemoryClient(self.clock)
        self.metrics = Metrics(self.pool)
        self.failover = Failover(self.pool, self.client, self.metrics, self.clock)
        self.names = [b.name for b in self.pool.backends]

    def plan(self, value, **limits) -> Plan:
        bounds = Limits(**limits)
        inbound = Inbound("/", body_of(value), JSON, False, Caller("rid"))
        parsed = check(inbound, bounds, None)
        assert isinstance(parsed, jsonrpc.ParsedRequest)
        return plan(inbound, parsed, bounds, self.clock.seconds() + bounds.timeout)

    def forward(self, value, **limits):
        return self.failover.forward(self.plan(value, **limits))

    def asked(self) -> list[str]:
        return [sent.node for sent in self.client.sent]

    def attempts(self, node: str, kind: str) -> float:
        return sample(self.metrics, "sentinel_proxy_upstream_attempts_total", backend=node, result=kind)


def half_open_first() -> tuple[Nodes, Any]:
    """Nodes whose first one's breaker opened and has cooled down: its next call is the one probe."""
    nodes = Nodes(breaker=TRIGGER_HAPPY)
    n0 = nodes.pool.backends[0]
    n0.breaker.record(False, nodes.clock.seconds())
    nodes.clock.advance(5.0)
    assert n0.breaker.available(nodes.clock.seconds()) and n0.breaker.state == "half-open"
    return nodes, n0


def code_of(reply) -> int:
    return json.loads(reply.body)["error"]["code"]


def test_the_in_memory_client_provides_the_forwarding_interface():
    assert verifyObject(IForwardingClient, MemoryClient(task.Clock()))


def test_a_good_answer_passes_through_from_the_first_node():
    nodes = Nodes()
    nodes.client.script("n0:1", answer(result(7), headers={b"x-aztec-version": [b"4"], b"date": [b"today"]}))
    reply = settled(nodes.forward(rpc("node_getBlockNumber")))
    assert (reply.status, reply.outcome, reply.attempts, reply.backend.name) == (200, "ok", 1, "n0:1")
    assert json.loads(reply.body) == result(7)
    assert (b"x-aztec-version", b"4") in reply.headers and all(name != b"date" for name, _ in reply.headers)
    assert nodes.client.sent[0].header(b"x-request-id") == [b"rid"]


def test_connect_failure_fails_over_to_the_next_node():
    nodes = Nodes()
    nodes.client.script("n0:1", UpstreamError("connect", "cannot connect: ConnectionRefusedError"))
    nodes.client.script("n1:1", answer(result(7)))
    reply = settled(nodes.forward(rpc("node_getBlockNumber")))
    assert (reply.status, reply.attempts, reply.backend.name) == (200, 2, "n1:1")
    assert nodes.asked() == ["n0:1", "n1:1"]
    assert sample(nodes.metrics, "sentinel_proxy_failovers_total", route="/") == 1.0
    assert nodes.attempts("n0:1", "connect") == 1.0 and nodes.attempts("n1:1", "ok") == 1.0


def test_a_timeout_fails_over_once_the_attempt_timeout_passes():
    nodes = Nodes()
    nodes.client.script("n0:1", hang())
    nodes.client.script("n1:1", answer(result(7)))
    reply_now = []
    defer.Deferred.fromCoroutine(nodes.forward(rpc("node_getBlockNumber"), attempt_timeout=2.0)).addCallback(
        reply_now.append)
    nodes.clock.advance(1.9)
    assert nodes.asked() == ["n0:1"] and not reply_now
    nodes.clock.advance(0.1)
    assert nodes.asked() == ["n0:1", "n1:1"] and reply_now[0].backend.name == "n1:1"
    assert nodes.client.sent[0].timeout == 2.0 and nodes.attempts("n0:1", "timeout") == 1.0


def test_a_5xx_and_garbage_are_node_failures():
    nodes = Nodes()
    nodes.client.script("n0:1", answer(b"<html>Bad Gateway</html>", code=502))
    nodes.client.script("n1:1", answer(b"<html>oops</html>", code=200))
    nodes.client.script("n2:1", answer(result(7)))
    reply = settled(nodes.forward(rpc("node_getBlockNumber")))
    assert (reply.status, reply.attempts, reply.backend.name) == (200, 3, "n2:1")
    assert nodes.attempts("n0:1", "bad_answer") == 1.0 and nodes.attempts("n1:1", "bad_answer") == 1.0


def test_a_json_rpc_error_is_an_answer_not_a_failure():
    nodes = Nodes()
    nodes.client.script("n0:1", answer({"jsonrpc": "2.0", "id": 1, "error": {"code": -1, "message": "no"}}, code=400))
    reply = settled(nodes.forward(rpc("node_getBlockNumber")))
    assert (reply.status, reply.outcome, nodes.asked()) == (400, "rpc_error", ["n0:1"])


def test_when_every_node_fails_the_last_failure_is_reported():
    nodes = Nodes()
    for name in nodes.names:
        nodes.client.script(name, UpstreamError("transport", "connection failed: ResponseFailed"))
    reply = settled(nodes.forward(rpc("node_getBlockNumber")))
    assert (reply.status, code_of(reply), reply.outcome) == (502, jsonrpc.UPSTREAM_FAILED, "upstream_error")
    assert (reply.attempts, reply.backend.name) == (3, "n2:1")


def test_attempts_stop_at_max_attempts_and_timeouts_say_so():
    nodes = Nodes()
    for name in nodes.names:
        nodes.client.script(name, UpstreamError("timeout", "no answer within 1 s"))
    reply = settled(nodes.forward(rpc("node_getBlockNumber"), max_attempts=2))
    assert (reply.status, code_of(reply), reply.outcome, reply.attempts) == (502, jsonrpc.UPSTREAM_TIMEOUT, "timeout", 2)
    assert nodes.asked() == ["n0:1", "n1:1"]


def test_the_overall_deadline_bounds_all_attempts():
    nodes = Nodes()
    nodes.client.script("n0:1", hang())
    nodes.client.script("n1:1", hang())
    pending = defer.Deferred.fromCoroutine(nodes.forward(rpc("node_getBlockNumber"), timeout=1.5, attempt_timeout=1.0))
    nodes.clock.advance(1.0)
    assert nodes.client.sent[1].timeout == 0.5, "the second attempt only gets what is left"
    nodes.clock.advance(0.5)
    reply = settled(pending)
    assert (reply.outcome, reply.attempts) == ("timeout", 2) and nodes.asked() == ["n0:1", "n1:1"]


def test_no_node_available_is_a_503():
    nodes = Nodes(count=0)
    reply = settled(nodes.forward(rpc("node_getBlockNumber")))
    assert (reply.status, code_of(reply), reply.backend) == (503, jsonrpc.NO_BACKEND, None)


def test_unsafe_writes_are_not_repeated_after_the_node_may_have_received_them():
    for failure in (UpstreamError("timeout", "t"), UpstreamError("transport", "t"), answer(b"", code=500)):
        nodes = Nodes()
        nodes.client.script("n0:1", failure)
        nodes.client.script("n1:1", answer(result("0xtx")))
        reply = settled(nodes.forward(rpc("node_sendTx", [{}])))
        assert (reply.status, reply.attempts, nodes.asked()) == (502, 1, ["n0:1"]), failure


def test_unsafe_writes_are_repeated_after_a_connect_failure():
    nodes = Nodes()
    nodes.client.script("n0:1", UpstreamError("connect", "cannot connect"))
    nodes.client.script("n1:1", answer(result("0xtx")))
    reply = settled(nodes.forward(rpc("node_sendTx", [{}])))
    assert (reply.status, reply.backend.name, nodes.asked()) == (200, "n1:1", ["n0:1", "n1:1"])


def test_a_slow_first_node_gets_a_hedge_and_the_first_good_answer_wins():
    nodes = Nodes(breaker=TRIGGER_HAPPY)
    nodes.client.script("n0:1", hang())
    nodes.client.script("n1:1", answer(result(7)))
    pending = defer.Deferred.fromCoroutine(nodes.forward(rpc("node_getBlockNumber"), hedge=True, hedge_delay=0.05))
    nodes.clock.advance(0.049)
    assert nodes.asked() == ["n0:1"]
    nodes.clock.advance(0.001)
    reply = settled(pending)
    assert (reply.backend.name, reply.attempts) == ("n1:1", 2)
    assert nodes.client.cancelled == ["n0:1"], "the loser's call is cancelled"
    n0, n1 = nodes.pool.backends[:2]
    assert n0.breaker.state == "closed", "a lost race is not the node's failure"
    assert list(n1.answer_latency) == [0.0]
    assert sample(nodes.metrics, "sentinel_proxy_hedges_total", route="/") == 1.0


def test_no_hedge_when_the_first_node_answers_in_time():
    nodes = Nodes()
    nodes.client.script("n0:1", answer(result(7)))
    reply = settled(nodes.forward(rpc("node_getBlockNumber"), hedge=True, hedge_delay=0.05))
    nodes.clock.advance(1.0)
    assert reply.backend.name == "n0:1" and nodes.asked() == ["n0:1"]
    assert sample(nodes.metrics, "sentinel_proxy_hedges_total", route="/") == 0.0


def test_the_hedge_waits_for_the_fastest_nodes_p95():
    nodes = Nodes()
    for backend in nodes.pool.backends:
        backend.answer_latency.extend([200.0] * 20)
    nodes.client.script("n0:1", hang())
    nodes.client.script("n1:1", answer(result(7)))
    pending = defer.Deferred.fromCoroutine(nodes.forward(rpc("node_getBlockNumber"), hedge=True))
    nodes.clock.advance(0.1)
    assert nodes.asked() == ["n0:1"], "not before the p95 (200 ms)"
    nodes.clock.advance(0.1)
    assert settled(pending).backend.name == "n1:1"


def test_unsafe_writes_are_never_hedged():
    nodes = Nodes()
    nodes.client.script("n0:1", hang())
    pending = defer.Deferred.fromCoroutine(
        nodes.forward(rpc("node_sendTx", [{}]), hedge=True, hedge_delay=0.05, attempt_timeout=1.0))
    nodes.clock.advance(1.0)
    assert nodes.asked() == ["n0:1"] and settled(pending).outcome == "timeout"


def test_failures_are_charged_to_the_breaker_and_answers_feed_the_hedge_delay():
    nodes = Nodes(breaker=TRIGGER_HAPPY)
    nodes.client.script("n0:1", answer(b"", code=503))
    nodes.client.script("n1:1", answer(result(7)))
    settled(nodes.forward(rpc("node_getBlockNumber")))
    n0, n1 = nodes.pool.backends[:2]
    assert n0.breaker.state == "open" and n1.breaker.state == "closed"
    assert list(n0.answer_latency) == [] and len(n1.answer_latency) == 1


def test_too_large_abandons_instead_of_charging_the_breaker():
    nodes, n0 = half_open_first()
    nodes.client.script("n0:1", UpstreamError("too_large", "answer exceeds 10 bytes"))
    reply = settled(nodes.forward(rpc("node_getBlock", [60]), max_attempts=1))
    assert (reply.status, reply.attempts) == (502, 1), "too large is not retried elsewhere"
    assert n0.breaker.state == "half-open" and n0.breaker.available(nodes.clock.seconds()), \
        "no verdict, and the probe slot is free again"
    nodes.client.script("n0:1", UpstreamError("transport", "reset"))
    settled(nodes.forward(rpc("node_getBlock", [60]), max_attempts=1))
    assert n0.breaker.state == "open", "whereas a failure in half-open opens it again"


def test_judge_tells_answers_from_garbage():
    nodes = Nodes()
    backend = nodes.pool.backends[0]
    single = nodes.plan(rpc("node_getBlockNumber"))

    def kind(body: bytes, code: int = 200, headers: dict | None = None, sent: Plan = single) -> str:
        return judge(sent, backend, UpstreamResponse(code, pairs(headers), body)).kind

    assert kind(b'{"jsonrpc":"2.0","id":1,"result":1}') == "ok"
    assert kind(b'[{"jsonrpc":"2.0","id":1,"result":1}]') == "bad_answer", "a single call gets an object"
    assert kind(b"  ") == "bad_answer" and kind(b'{"truncated') == "bad_answer"
    assert kind(b'{"error":{}}', code=500) == "bad_answer"
    assert kind(b"{}") == "bad_answer", "an object that answers no call"
    good = b'{"jsonrpc":"2.0","id":1,"result":1}'
    assert kind(gzip.compress(good), headers={b"content-encoding": [b"gzip"]}) == "ok"
    assert kind(good, headers={b"content-encoding": [b"gzip"]}) == "bad_answer"
    assert kind(gzip.compress(good)[:-6], headers={b"content-encoding": [b"gzip"]}) == "bad_answer", "cut short"
    assert kind(good, headers={b"content-encoding": [b"br"]}) == "bad_answer"
    # An empty Content-Encoding is no coding (treq's decoder leaves one behind after gunzipping).
    assert kind(good, headers={b"content-encoding": [b""]}) == "ok"
    refused = nodes.plan([rpc("nodeAdmin_x", id_=1), rpc("node_getBlockNumber", id_=2)])
    merged = judge(refused, backend, UpstreamResponse(200, (), body_of([result(5, 2)])))
    assert [item["id"] for item in json.loads(merged.body)] == [1, 2]
    assert kind(body_of([result(5, 2), result(6, 3)]), sent=refused) == "bad_answer", "cannot be merged"


def test_the_reply_names_a_fallback_node():
    nodes = Nodes()
    attempt = Attempt(nodes.pool.backends[0], "ok", answer=UpstreamResponse(
        200, ((b"connection", b"close"), (b"x-aztec-a", b"1"), (b"x-aztec-a", b"2")), b"{}"), body=b"{}")
    reply = answer_reply(attempt, "integrity", 1)
    assert reply.headers == ((b"x-aztec-a", b"1"), (b"x-aztec-a", b"2"), (b"x-sentinel-fallback", b"integrity"))


def test_node_totals_count_each_request_once_on_the_node_that_answered():
    gateway = rig()
    n0, n1, n2 = gateway.pool.backends
    gateway.client.script("n0:1", UpstreamError("connect", "refused"))
    gateway.client.script("n1:1", answer(result(7)))
    assert settled(gateway.handle(rpc("node_getBlockNumber"))).status == 200
    assert [(b.total_requests, b.total_errors) for b in (n0, n1, n2)] == [(0, 0), (1, 0), (0, 0)]
    for name in ("n0:1", "n1:1", "n2:1"):
        gateway.client.script(name, UpstreamError("transport", "reset"))
    assert settled(gateway.handle(rpc("node_getBlockNumber"))).status == 502
    assert [(b.total_requests, b.total_errors) for b in (n0, n1, n2)] == [(0, 0), (1, 0), (1, 1)]


def not_found(id_=1, method="aztec_getBlockNumber") -> dict:
    return {"jsonrpc": "2.0", "id": id_, "error": {"code": jsonrpc.METHOD_NOT_FOUND,
                                                   "message": f"Method not found: {method}"}}


def test_a_node_that_does_not_speak_the_dialect_hands_the_call_to_another():
    nodes = Nodes(breaker=TRIGGER_HAPPY)
    nodes.client.script("n0:1", answer(not_found(), code=400))
    nodes.client.script("n1:1", answer(result(7)))
    reply = settled(nodes.forward(rpc("aztec_getBlockNumber")))
    assert (reply.status, reply.outcome, reply.attempts, reply.backend.name) == (200, "ok", 2, "n1:1")
    assert json.loads(reply.body) == result(7) and nodes.asked() == ["n0:1", "n1:1"]
    assert nodes.attempts("n0:1", "wrong_dialect") == 1.0
    assert nodes.pool.backends[0].breaker.state == "closed", "not the node's failure"
    assert list(nodes.pool.backends[0].answer_latency) == []


def test_a_write_in_the_wrong_dialect_is_repeated_on_another_node():
    nodes = Nodes(breaker=TRIGGER_HAPPY)
    nodes.client.script("n0:1", answer(not_found(method="aztec_sendTx"), code=400))
    nodes.client.script("n1:1", answer(result("0xtx")))
    reply = settled(nodes.forward(rpc("aztec_sendTx", [{}])))
    assert (reply.status, reply.backend.name, nodes.asked()) == (200, "n1:1", ["n0:1", "n1:1"])
    assert nodes.pool.backends[0].breaker.state == "closed"


def test_a_version_only_method_and_an_all_not_found_batch_fail_over_too():
    nodes = Nodes()
    nodes.client.script("n0:1", answer(not_found(method="node_getL2Tips")))
    nodes.client.script("n1:1", answer(result({"proposed": {}})))
    assert settled(nodes.forward(rpc("node_getL2Tips"))).backend.name == "n1:1"
    nodes = Nodes()
    batch = [rpc("aztec_getBlockNumber", id_=1), rpc("aztec_getChainTips", id_=2)]
    nodes.client.script("n0:1", answer([not_found(2), not_found(1)]))
    nodes.client.script("n1:1", answer([result(7, 1), result({}, 2)]))
    reply = settled(nodes.forward(batch))
    assert reply.backend.name == "n1:1" and [item["id"] for item in json.loads(reply.body)] == [1, 2]


def test_when_no_node_speaks_the_dialect_the_last_not_found_is_the_answer():
    nodes = Nodes(breaker=TRIGGER_HAPPY)
    for name in nodes.names:
        nodes.client.script(name, answer(not_found(), code=400, headers={b"x-aztec-node": [name.encode()]}))
    reply = settled(nodes.forward(rpc("aztec_getBlockNumber")))
    assert (reply.status, reply.outcome, reply.attempts, reply.backend.name) == (400, "rpc_error", 3, "n2:1")
    assert json.loads(reply.body) == not_found() and (b"x-aztec-node", b"n2:1") in reply.headers
    assert nodes.asked() == nodes.names
    assert all(b.breaker.state == "closed" for b in nodes.pool.backends), "no breaker charged"
    # The same with the node's HTTP 200 (the status passes through as the node sent it).
    nodes = Nodes(count=2)
    for name in nodes.names:
        nodes.client.script(name, answer(not_found(method="aztec_sendTx")))
    reply = settled(nodes.forward(rpc("aztec_sendTx", [{}])))
    assert (reply.status, reply.outcome, code_of(reply), nodes.asked()) == (200, "rpc_error", -32601, nodes.names)


def test_a_later_failure_after_a_wrong_dialect_is_reported_as_a_failure():
    nodes = Nodes(count=2)
    nodes.client.script("n0:1", answer(not_found(method="aztec_sendTx")))
    nodes.client.script("n1:1", UpstreamError("timeout", "no answer within 1 s"))
    reply = settled(nodes.forward(rpc("aztec_sendTx", [{}])))
    assert (reply.status, reply.outcome) == (502, "timeout"), "the write may have reached n1: not a -32601"


def test_a_not_found_for_a_method_the_gateway_does_not_know_is_not_retried():
    nodes = Nodes()
    nodes.client.script("n0:1", answer(not_found(method="node_getNothing"), code=400))
    reply = settled(nodes.forward(rpc("node_getNothing")))
    assert (reply.status, reply.outcome, nodes.asked()) == (400, "rpc_error", ["n0:1"])
    assert nodes.attempts("n0:1", "ok") == 1.0


def test_a_batch_with_only_some_not_found_items_passes_through():
    nodes = Nodes()
    batch = [rpc("aztec_getBlockNumber", id_=1), rpc("node_getBlockNumber", id_=2)]
    nodes.client.script("n0:1", answer([not_found(1), result(7, 2)]))
    reply = settled(nodes.forward(batch))
    assert (reply.backend.name, nodes.asked()) == ("n0:1", ["n0:1"])
    assert json.loads(reply.body) == [not_found(1), result(7, 2)]


# ------------------------------------------------------------------------------ the caller's faults


def test_judge_tells_the_caller_s_faults_from_the_node_s():
    nodes = Nodes()
    backend = nodes.pool.backends[0]
    single = nodes.plan(rpc("node_getBlockNumber"))

    def kind(body: bytes, code: int = 200, headers: dict | None = None) -> str:
        return judge(single, backend, UpstreamResponse(code, pairs(headers), body)).kind

    for code in (400, 411, 413, 415, 422, 431):
        assert kind(b"Unsupported Content-Encoding", code) == "caller_error", code
    assert kind(b"<html><h1>413 Request Entity Too Large</h1></html>", 413) == "caller_error"
    assert kind(b"not gzip", 400, {b"content-encoding": [b"gzip"]}) == "caller_error"
    assert kind(b'{"jsonrpc":"2.0","id":99,"error":{"code":-32600,"message":"Invalid Request"}}') == "caller_error", \
        "-32600 under another id"
    assert kind(b'{"jsonrpc":"2.0","id":"x","error":{"code":-32700,"message":"Parse error"}}', 400) == "caller_error"
    assert kind(b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}', 400) == "ok", \
        "a refusal of the whole request was an answer already"
    # The node's own faults stay the node's.
    assert kind(b'{"jsonrpc":"2.0","id":99,"error":{"code":-32603,"message":"Internal error"}}') == "bad_answer"
    for code in (401, 403, 404, 405, 408, 429, 500, 502, 503):
        assert kind(b"nope", code) == "bad_answer", code
    assert kind(b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Invalid Request"}}', 500) \
        == "bad_answer", "HTTP 500: 4.x's uncaught server error"
    assert kind(b'{"jsonrpc":"2.0","id":99,"error":{"code":-32700,"message":"x"}}', 502) == "bad_answer"


def test_a_caller_s_fault_is_passed_on_not_retried_and_not_charged():
    nodes = Nodes(breaker=TRIGGER_HAPPY)
    n0 = nodes.pool.backends[0]
    nodes.client.script(n0.name, answer(b"Unsupported Content-Encoding", code=415, headers={b"x-node": b"1"}))
    reply = settled(nodes.forward(rpc("node_getBlockNumber")))
    assert (reply.status, reply.body, reply.outcome, reply.attempts) == \
        (415, b"Unsupported Content-Encoding", "rpc_error", 1)
    assert (b"x-node", b"1") in reply.headers and reply.backend is n0
    assert nodes.asked() == [n0.name], "another node would refuse it too"
    assert all(b.breaker.state == "closed" for b in nodes.pool.backends)
    assert sample(nodes.metrics, "sentinel_proxy_upstream_attempts_total", backend=n0.label,
                  result="caller_error") == 1.0
    assert list(n0.answer_latency) == [], "no latency sample"


def test_a_caller_s_fault_on_a_half_open_probe_is_no_verdict():
    nodes, n0 = half_open_first()
    nodes.client.script(n0.name, answer(b"<html>413</html>", code=413))
    assert settled(nodes.forward(rpc("node_getBlockNumber"), max_attempts=1)).status == 413
    assert n0.breaker.state == "half-open" and n0.breaker.available(nodes.clock.seconds())


def test_a_hedged_call_refused_as_the_caller_s_fault_ends_there():
    nodes = Nodes(breaker=TRIGGER_HAPPY)
    n0 = nodes.pool.backends[0]
    nodes.client.script(n0.name, answer(b"bad request", code=400))
    reply = settled(nodes.forward(rpc("node_getBlockNumber"), hedge=True, hedge_delay=0.05))
    nodes.clock.advance(1.0)
    assert reply.status == 400 and nodes.asked() == [n0.name]


def test_one_caller_s_bad_requests_open_no_breaker_in_memory():
    """Every kind of answer a node gives to a caller's bad request, 20 times each, with breakers
    that open at the first charged failure."""
    faults = [answer(b"Unsupported Content-Encoding", code=415), answer(b"<html>413</html>", code=413),
              answer(b"Bad Request", code=400), answer(b"", code=422),
              answer(b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}', code=400),
              answer(b'{"jsonrpc":"2.0","id":0,"error":{"code":-32600,"message":"Invalid Request"}}'),
              answer({"jsonrpc": "2.0", "id": 1, "error": {"code": -32602, "message": "Invalid params"}}, code=400)]
    nodes = Nodes(breaker=TRIGGER_HAPPY)
    for _ in range(20):
        for fault in faults:
            for name in nodes.names:
                nodes.client.script(name, fault)
            assert settled(nodes.forward(rpc("node_getBlock", ["x"]), hedge=True, hedge_delay=0.05)).status < 500
            nodes.clock.advance(0.1)
    assert [b.breaker.state for b in nodes.pool.backends] == ["closed"] * 3
    assert not any(b.breaker.transitions for b in nodes.pool.backends)


#: What a reverse proxy in front of a node (nginx's client_max_body_size) answers a body too large
#: for it, though not for the gateway: HTML, no JSON-RPC.
FRONT_LIMIT = 4096


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_one_caller_cannot_open_a_healthy_node_s_breaker(cluster):
    """Loopback, a real gateway whose breakers open at the first charged failure, three healthy
    simulated nodes behind a proxy with a small body limit. One caller sends every kind of bad
    request, 10 rounds: malformed, oversized, odd encodings, invalid params (JSON-RPC errors), a
    batch too large for the nodes' proxy. Every breaker stays closed, and the fleet still serves."""
    from twisted.internet import reactor
    from twisted.web.resource import Resource

    from sentinel_simnode.node import SimulatedNode, simulated_site
    from tests.support import TEST_CHAIN, RunningNode, http, post_json

    class Fronted(Resource):
        isLeaf = True

        def __init__(self, node: SimulatedNode):
            super().__init__()
            self.node = node
            self.refused = 0

        def render(self, request):
            if request.content.seek(0, 2) > FRONT_LIMIT:
                self.refused += 1
                request.setResponseCode(413)
                request.setHeader(b"content-type", b"text/html")
                return b"<html><body><h1>413 Request Entity Too Large</h1></body></html>"
            request.content.seek(0)
            return self.node.render(request)

    fronts = []
    for _ in range(3):
        node = SimulatedNode("pruned", TEST_CHAIN, clock=reactor)
        site = simulated_site(node)
        site.resource = Fronted(node)
        fronts.append(site.resource)
        cluster.nodes.append(RunningNode(node, reactor.listenTCP(0, site, interface="127.0.0.1")))
    service, url = await cluster.gateway(cluster.nodes, breaker_consecutive_failures="1",
                                         breaker_window_failures="1", max_attempts="3")
    call = json.dumps(rpc("node_getBlockNumber")).encode()
    packed = gzip.compress(call)
    plain = {b"content-type": [b"application/json"]}
    gz = {**plain, b"content-encoding": [b"gzip"]}
    bad: list[tuple[bytes, dict]] = [
        (b'{"jsonrpc":"2.0","id":1,"method":', plain),
        (b"[" + b",".join([call] * 2) + b"]" + b" " * (1 << 20), plain),
        (packed, {**gz, b"content-encoding": [b"GZIP"]}),
        (packed, {**gz, b"content-encoding": [b"gzip", b"gzip"]}),
        (packed[:-8], gz),
        (packed + b"garbage", gz),
        (call, {**gz, b"content-encoding": [b"br"]}),
        (json.dumps(rpc("node_getBlock", ["not a block"])).encode(), plain),
        (json.dumps(rpc("node_getBlockHeader", [{"odd": True}])).encode(), plain),
        (json.dumps([rpc("node_getBlockNumber", id_=i) for i in range(100)]).encode(), plain),
        (call, {b"content-type": [b"text/plain"]}),
    ]
    statuses: set[int] = set()
    for _ in range(10):
        for body, headers in bad:
            statuses.add((await http("POST", url, body, headers)).code)
    assert sum(front.refused for front in fronts) == 10, "the batch too large for the nodes' proxy: asked once each"
    assert all(code < 500 for code in statuses), statuses
    assert [b.breaker.state for b in service.pool.backends] == ["closed"] * 3
    assert not any(b.breaker.transitions for b in service.pool.backends)
    assert (await post_json(url, rpc("node_getBlockNumber"))).code == 200
