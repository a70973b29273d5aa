"""The admission stage: in-flight bound and drain, API keys, rate limit (in memory, on a Clock)."""
import hashlib
import json

from twisted.internet import task

from sentinel_proxy.core import jsonrpc
from sentinel_proxy.ops.metrics import Metrics
from sentinel_proxy.proxy.admission import InFlight, RateLimit, bucket_of
from sentinel_proxy.proxy.values import Caller, Limits
from sentinel_proxy.stores.ratelimit import MemoryRateLimiter
from sentinel_proxy.upstream.memory import AnswerMemory

from tests.stages_support import answer, hang, result, rig, rpc, sample, settled, trusted_pool

KEY = "s3cret-key"
DIGESTS = frozenset({hashlib.sha256(KEY.encode()).hexdigest()})


def error_of(reply) -> tuple[int, int]:
    return reply.status, json.loads(reply.body)["error"]["code"]


def test_in_flight_refuses_past_the_limit_and_counts_in_the_gauge():
    metrics = Metrics(trusted_pool(1))
    gate = InFlight(metrics.in_flight)
    assert gate.enter(2) is None and gate.enter(2) is None
    refused = gate.enter(2)
    assert error_of(refused) == (503, jsonrpc.OVERLOADED)
    assert (b"retry-after", b"1") in refused.headers
    assert gate.count == 2 and sample(metrics, "sentinel_proxy_in_flight_requests") == 2.0
    gate.leave()
    assert gate.enter(2) is None, "a slot freed is a slot taken"


def test_in_flight_refuses_while_node_answers_are_over_the_memory_cap():
    metrics = Metrics(trusted_pool(1))
    gate = InFlight(metrics.in_flight)
    memory = AnswerMemory(100)
    memory.take(100)
    assert gate.enter(10, memory.over_cap) is None, "at the cap: still let in"
    memory.take(1)
    refused = gate.enter(10, memory.over_cap)
    assert error_of(refused) == (503, jsonrpc.OVERLOADED) and (b"retry-after", b"1") in refused.headers
    assert "large answers in memory" in json.loads(refused.body)["error"]["message"]
    assert gate.count == 1 and sample(metrics, "sentinel_proxy_in_flight_requests") == 1.0, "a refusal is not counted"
    memory.give_back(1)
    assert gate.enter(10, memory.over_cap) is None and gate.count == 2
    assert gate.enter(10) is None, "no memory bound given: none applied"


def test_drained_fires_when_the_last_request_leaves():
    gate = InFlight(Metrics(trusted_pool(1)).in_flight)
    assert settled(gate.drained()) is None, "idle: drained at once"
    gate.enter(10)
    gate.enter(10)
    waiter = gate.drained()
    gate.leave()
    assert not waiter.called
    gate.leave()
    assert waiter.called and gate.count == 0


def test_buckets_are_per_address_or_per_valid_key():
    assert bucket_of(Caller("r", "10.0.0.1"), DIGESTS) == "ip:10.0.0.1"
    assert bucket_of(Caller("r", "10.0.0.1", KEY), DIGESTS) == f"key:{hashlib.sha256(KEY.encode()).hexdigest()[:32]}"
    assert bucket_of(Caller("r", "10.0.0.1", "guessed"), DIGESTS) is None
    assert bucket_of(Caller("r", "10.0.0.1", KEY), frozenset()) is None, "no keys configured: every key is unknown"


def test_rate_limit_answers_429_with_retry_after():
    clock = task.Clock()
    limits = Limits(rate=0.5, burst=1.0, key_rate=100.0, key_burst=100.0)
    limiter = RateLimit(MemoryRateLimiter(clock))
    assert settled(limiter.take("ip:a", ["node_getBlockNumber"], limits)) is None
    refused = settled(limiter.take("ip:a", ["node_getBlockNumber"], limits))
    assert error_of(refused) == (429, jsonrpc.RATE_LIMITED)
    assert (b"retry-after", b"2") in refused.headers and "retry in 2 s" in json.loads(refused.body)["error"]["message"]
    assert settled(limiter.take("key:k", ["node_getBlockNumber"], limits)) is None, "keys have their own rate"
    clock.advance(2.0)
    assert settled(limiter.take("ip:a", ["node_getBlockNumber"], limits)) is None


def test_no_limiter_lets_everything_through():
    limits = Limits(rate=0.001, burst=1.0)
    assert all(settled(RateLimit(None).take("ip:a", ["node_getBlock"] * 50, limits)) is None for _ in range(5))


def test_the_path_refuses_past_max_in_flight_and_drains():
    gateway = rig(limits=Limits(max_in_flight=1))
    node = gateway.node(0).name
    pending = hang()
    gateway.client.script(node, pending)
    first = gateway.handle(rpc("node_getBlockNumber"))
    second = settled(gateway.handle(rpc("node_getBlockNumber")))
    assert error_of(second) == (503, jsonrpc.OVERLOADED) and (b"retry-after", b"1") in second.headers
    assert gateway.path.in_flight == 1
    drained = gateway.path.drained()
    assert not drained.called
    pending.callback(answer(result(7)))
    assert settled(first).status == 200 and drained.called and gateway.path.in_flight == 0


def test_an_unknown_api_key_is_refused_before_anything_else():
    gateway = rig(limits=Limits(key_digests=DIGESTS))
    reply = settled(gateway.handle(rpc("node_getBlockNumber"), headers={b"content-type": b"text/plain"},
                                   caller=Caller("r", "10.0.0.1", "guessed")))
    assert error_of(reply) == (401, jsonrpc.UNKNOWN_API_KEY)
    assert gateway.client.sent == []
    gateway.client.script(gateway.node(0).name, answer(result(7)))
    assert settled(gateway.handle(rpc("node_getBlockNumber"), caller=Caller("r", "10.0.0.1", KEY))).status == 200


def test_the_path_rate_limits_after_the_guard_and_before_any_node():
    gateway = rig(limits=Limits(rate=1.0, burst=1.0), limiter=MemoryRateLimiter(task.Clock()),
                  default=answer(result(7)))
    assert settled(gateway.handle(None, raw=b"{oops")).status == 400, "a refused request costs no token"
    assert settled(gateway.handle(rpc("node_getBlockNumber"))).status == 200
    limited = settled(gateway.handle(rpc("node_getBlockNumber")))
    assert error_of(limited) == (429, jsonrpc.RATE_LIMITED) and (b"retry-after", b"1") in limited.headers
    assert len(gateway.client.sent) == 1


def test_an_unknown_key_costs_a_token_of_the_address_bucket():
    clock = task.Clock()
    limits = Limits(rate=1.0, burst=2.0, key_rate=100.0, key_burst=100.0, key_digests=DIGESTS)
    limiter = RateLimit(MemoryRateLimiter(clock))
    guesser = Caller("r", "10.0.0.9", "guessed-key-0001")
    assert [error_of(settled(limiter.refuse_unknown_key(guesser, limits)))[0] for _ in range(3)] == [401, 401, 429]
    assert error_of(settled(limiter.take("ip:10.0.0.9", ["node_getBlockNumber"], limits))) == \
        (429, jsonrpc.RATE_LIMITED), "the guesses spent the address's own budget"
    assert settled(limiter.take("ip:10.0.0.8", ["node_getBlockNumber"], limits)) is None, "other addresses untouched"
    clock.advance(1.0)
    assert error_of(settled(limiter.refuse_unknown_key(guesser, limits))) == (401, jsonrpc.UNKNOWN_API_KEY)


def test_an_unknown_key_without_a_limiter_is_a_plain_401():
    limits = Limits(rate=0.001, burst=1.0, key_digests=DIGESTS)
    guesser = Caller("r", "10.0.0.9", "guessed")
    replies = [settled(RateLimit(None).refuse_unknown_key(guesser, limits)) for _ in range(5)]
    assert {error_of(reply) for reply in replies} == {(401, jsonrpc.UNKNOWN_API_KEY)}


def test_the_path_throttles_key_guesses_by_address():
    limits = Limits(rate=1.0, burst=3.0, key_digests=DIGESTS)
    gateway = rig(limits=limits, limiter=MemoryRateLimiter(task.Clock()), default=answer(result(7)))
    guesses = [settled(gateway.handle(rpc("node_getBlockNumber"), caller=Caller("r", "10.0.0.9", f"guess-{i:012d}")))
               for i in range(5)]
    assert [error_of(reply)[0] for reply in guesses] == [401, 401, 401, 429, 429]
    assert (b"retry-after", b"1") in guesses[-1].headers
    assert error_of(settled(gateway.handle(rpc("node_getBlockNumber"), caller=Caller("r", "10.0.0.9")))) == \
        (429, jsonrpc.RATE_LIMITED), "nor may the guesser call without a key"
    assert settled(gateway.handle(rpc("node_getBlockNumber"), caller=Caller("r", "10.0.0.9", KEY))).status == 200, \
        "a valid key has its own bucket"
    assert gateway.client.sent and len(gateway.client.sent) == 1
