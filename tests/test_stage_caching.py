"""The caching stage: look-ups, single-flight and reassembly, with the upstream replaced by a
function the test controls (no failover, no clock, no sockets)."""
import json

from twisted.internet import defer
from zope.interface.verify import verifyObject

from sentinel_proxy.core import answers, jsonrpc
from sentinel_proxy.core.answers import store_value
from sentinel_proxy.core.cache_policy import cache_key
from sentinel_proxy.interfaces import IResponseCache
from sentinel_proxy.ops.metrics import Metrics
from sentinel_proxy.proxy.caching import Caching, reassemble
from sentinel_proxy.proxy.coalesce import Entry, SingleFlight
from sentinel_proxy.proxy.guard import check, plan
from sentinel_proxy.proxy.values import Caller, Inbound, Limits, Plan, Reply, error_reply

from tests.stages_support import MemoryStore, body_of, result, rpc, sample, settled, trusted_pool

FINALIZED = 100


class Upstream:
    """Stands in for failover: records each plan and answers with a Deferred the test fires (an
    answer is matched to the plan's calls as failover matches it)."""

    def __init__(self) -> None:
        self.plans: list[Plan] = []
        self.pending: list[defer.Deferred[Reply]] = []

    async def forward(self, sent: Plan) -> Reply:
        self.plans.append(sent)
        waiting: defer.Deferred[Reply] = defer.Deferred()
        self.pending.append(waiting)
        return await waiting

    def answer(self, value, index: int = -1, headers=()) -> None:
        sent = self.plans[index].parsed
        matched = answers.match(body_of(value), sent.calls, sent.is_batch)
        body = matched.body if matched.body is not None else body_of(value)
        self.pending[index].callback(Reply(200, body, (*headers,), trusted_pool(1).backends[0], "ok", 1,
                                           items=matched.items))


def stage(store: MemoryStore | None = None, flights: SingleFlight | None = None):
    pool = trusted_pool(1)
    metrics = Metrics(pool)
    upstream = Upstream()
    caching = Caching(store if store is not None else MemoryStore(), metrics, 1.0, lambda: FINALIZED,
                      upstream.forward, flights)
    return caching, upstream, metrics


def request(value, headers: dict | None = None) -> Plan:
    inbound = Inbound("/", body_of(value), {b"content-type": b"application/json", **(headers or {})},
                      False, Caller("rid"))
    parsed = check(inbound, Limits(), None)
    assert isinstance(parsed, jsonrpc.ParsedRequest)
    return plan(inbound, parsed, Limits(), deadline=30.0)


def serve(caching: Caching, sent: Plan) -> defer.Deferred[Reply | None]:
    return defer.Deferred.fromCoroutine(caching.serve(sent))


def header(reply: Reply, name: bytes) -> bytes | None:
    return next((value for key, value in reply.headers if key == name), None)


def test_the_in_memory_store_provides_the_cache_interface():
    assert verifyObject(IResponseCache, MemoryStore())


def test_a_request_with_nothing_cacheable_is_left_to_failover():
    caching, upstream, _ = stage()
    assert settled(serve(caching, request([rpc("node_sendTx", [{}]), rpc("node_isReady")]))) is None
    assert upstream.plans == []


def test_a_miss_goes_upstream_is_stored_and_then_hits():
    store = MemoryStore()
    caching, upstream, metrics = stage(store)
    first = serve(caching, request(rpc("node_getBlock", [5], id_=1), {b"content-encoding": b"identity"}))
    sent = upstream.plans[0]
    assert sent.plain and (b"accept-encoding", b"identity") in sent.headers
    assert all(name != b"content-encoding" for name, _ in sent.headers), "the body is the gateway's own"
    assert json.loads(sent.body) == rpc("node_getBlock", [5], id_=0), "the gateway's own id: 0"
    upstream.answer(result({"number": 5}, id_=0), headers=[(b"x-aztec-chain", b"1")])
    miss = settled(first)
    assert (miss.status, header(miss, b"x-cache"), miss.attempts) == (200, b"MISS", 1)
    assert store.ttls[cache_key("node_getBlock", [5])] is None, "a finalized block is kept until evicted"
    hit = settled(serve(caching, request(rpc("node_getBlock", [5], id_="mine"))))
    assert json.loads(hit.body) == result({"number": 5}, id_="mine")
    assert (header(hit, b"x-cache"), hit.backend, header(hit, b"x-aztec-chain")) == (b"HIT", None, b"1")
    assert len(upstream.plans) == 1
    assert sample(metrics, "sentinel_proxy_cache_calls_total", result="hit") == 1.0
    assert sample(metrics, "sentinel_proxy_cache_calls_total", result="miss") == 1.0


def test_identical_calls_in_flight_share_one_upstream_call():
    caching, upstream, metrics = stage()
    leader = serve(caching, request(rpc("node_getBlockNumber", id_=1)))
    follower = serve(caching, request(rpc("node_getBlockNumber", id_=2)))
    assert len(upstream.plans) == 1
    upstream.answer(result(42, id_=0))
    assert json.loads(settled(leader).body) == result(42, id_=1)
    shared = settled(follower)
    assert json.loads(shared.body) == result(42, id_=2) and header(shared, b"x-cache") == b"COALESCED"
    assert sample(metrics, "sentinel_proxy_cache_calls_total", result="coalesced") == 1.0


def test_a_failed_leader_fails_its_followers_with_502():
    caching, upstream, _ = stage()
    leader = serve(caching, request(rpc("node_getBlockNumber", id_=1)))
    follower = serve(caching, request(rpc("node_getBlockNumber", id_=2)))
    upstream.pending[0].callback(error_reply(502, jsonrpc.UPSTREAM_FAILED, "down", "upstream_error"))
    led = settled(leader)
    assert (led.outcome, led.cache) == ("upstream_error", "miss"), "the access log says miss, not none"
    failed = settled(follower)
    assert (failed.status, json.loads(failed.body)["error"]["code"], failed.cache) == (502, jsonrpc.UPSTREAM_FAILED,
                                                                                       "miss")
    assert "shared call" in json.loads(failed.body)["error"]["message"]


def test_followers_get_the_answer_when_the_leaders_caller_leaves():
    flights = SingleFlight()
    caching, upstream, _ = stage(flights=flights)
    leader = serve(caching, request(rpc("node_getBlockNumber", id_=1)))
    follower = serve(caching, request(rpc("node_getBlockNumber", id_=2)))
    leader.addErrback(lambda f: f.trap(defer.CancelledError))
    leader.cancel()
    assert not upstream.pending[0].called, "the shared call goes on for the follower"
    upstream.answer(result(42, id_=0))
    assert json.loads(settled(follower).body) == result(42, id_=2) and len(flights) == 0


def test_the_shared_call_is_cancelled_once_nobody_waits():
    flights = SingleFlight()
    caching, upstream, _ = stage(flights=flights)
    leader = serve(caching, request(rpc("node_getBlockNumber", id_=1)))
    follower = serve(caching, request([rpc("node_getBlockNumber", id_=2), rpc("node_getBlockNumber", id_=3)]))
    for gone in (follower, leader):
        gone.addErrback(lambda f: f.trap(defer.CancelledError))
    follower.cancel()
    assert not upstream.pending[0].called, "the leader still waits"
    leader.cancel()
    assert upstream.pending[0].called and len(flights) == 0, "nobody waits: cancelled"
    assert leader.called and follower.called


def test_batches_are_reassembled_in_the_callers_order():
    store = MemoryStore()
    store.set(cache_key("node_getBlock", [5]), store_value(Entry("result", b'{"number":5}')), None)
    caching, upstream, _ = stage(store)
    batch = [rpc("node_getBlockNumber", id_="a"), rpc("node_getBlock", [5], id_="b"), rpc("nodeAdmin_x", id_="c"),
             rpc("node_isReady", id_="d"), rpc("node_getBlockNumber", id_="e")]
    pending = serve(caching, request(batch))
    sent = upstream.plans[0]
    assert json.loads(sent.body) == [rpc("node_getBlockNumber", id_=0), rpc("node_isReady", id_=1)], \
        "only the misses, once each, and the never-cached call go upstream, under the gateway's ids"
    assert [c.position for c in sent.parsed.calls] == [0, 1]
    upstream.answer([{"jsonrpc": "2.0", "id": 1, "error": {"code": -1, "message": "no"}}, result(42, 0)])
    reply = settled(pending)
    items = json.loads(reply.body)
    assert [item["id"] for item in items] == ["a", "b", "c", "d", "e"]
    assert (items[0]["result"], items[1]["result"], items[4]["result"]) == (42, {"number": 5}, 42)
    assert items[2]["error"]["code"] == jsonrpc.METHOD_NOT_FOUND and items[3]["error"]["message"] == "no"
    assert (reply.status, reply.outcome, header(reply, b"x-cache")) == (200, "rpc_error", None)


def test_a_single_call_answered_with_an_error_is_a_400():
    caching, upstream, _ = stage()
    pending = serve(caching, request(rpc("node_getBlockNumber", id_=1)))
    upstream.answer({"jsonrpc": "2.0", "id": 0, "error": {"code": -32000, "message": "boom"}})
    reply = settled(pending)
    assert (reply.status, reply.outcome) == (400, "rpc_error")
    assert json.loads(reply.body)["id"] == 1


def test_a_refusal_of_the_whole_sub_batch_is_passed_on_and_stores_nothing():
    store = MemoryStore()
    caching, upstream, _ = stage(store)
    pending = serve(caching, request([rpc("node_getBlockNumber", id_=1), rpc("node_getChainId", id_=2)]))
    refusal = {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Batch too large"}}
    upstream.answer(refusal)
    reply = settled(pending)
    assert (reply.status, json.loads(reply.body)) == (200, refusal) and store.values == {}


def test_reassemble_puts_each_entry_under_the_callers_id():
    parsed = jsonrpc.ParsedRequest(True, (jsonrpc.Call(0, "m", b"7"), jsonrpc.Call(2, "m", b'"x"'),
                                          jsonrpc.Call(3, "m", None)),
                                   {1: jsonrpc.error_bytes(b"3", -1, "refused")})
    body = reassemble(parsed, {0: Entry("result", b"1"), 2: Entry("missing"), 3: Entry("result", b"2")})
    assert body == (b'[{"jsonrpc":"2.0","id":7,"result":1},{"jsonrpc":"2.0","id":3,"error":{"code":-1,'
                    b'"message":"refused"}},{"jsonrpc":"2.0","id":"x"},{"jsonrpc":"2.0","result":2}]')
