"""A node's batch answer is matched to the calls by id, never by position (JSON-RPC lets a server
answer a batch in any order): reordered answers are put back in request order, and an answer that
does not answer the request (missing, extra, duplicate or unknown ids, wrong length, garbage,
truncated or gzip-wrapped garbage) is the node failing: nothing of it reaches the caller or the
cache, its breaker is charged, and the call goes to a healthy node.

In memory (tests/stages_support.py, task.Clock), plus one loopback run against a simulated node
that answers batches reversed.
"""
from __future__ import annotations

import gzip
import json
from typing import Any, Callable

import pytest
import pytest_twisted

from sentinel_proxy.core import jsonrpc
from sentinel_proxy.core.answers import BadAnswer, match
from sentinel_proxy.core.cache_policy import cache_key
from sentinel_proxy.core.scoring import BreakerPolicy
from sentinel_proxy.proxy.values import Limits
from sentinel_proxy.upstream.response import UpstreamResponse

from tests.stages_support import CHAIN, MemoryStore, answer, result, rig, rpc, sample, settled
from tests.support import post_json, wait_for

ensure = pytest_twisted.ensureDeferred

#: One failure opens a breaker: whether an outcome was charged shows in the state.
TRIGGER_HAPPY = BreakerPolicy(consecutive_failures=1, cooldown=5.0, close_after=1)


def block(number: int) -> dict:
    return {"number": number, "hash": f"0x{number:064x}"}


def node(transform: Callable[[list[dict]], Any] = lambda items: items, code: int = 200,
         gzipped: bool = False) -> Callable[[bytes], UpstreamResponse]:
    """A node that answers each node_getBlock call with that block (under the call's id, in request
    order), then lets ``transform`` break the answer: a list of items, a value, or raw bytes."""
    def respond(body: bytes) -> UpstreamResponse:
        request = json.loads(body)
        calls = request if isinstance(request, list) else [request]
        items = []
        for call in calls:
            item: dict[str, Any] = {"jsonrpc": "2.0"}
            if "id" in call:
                item["id"] = call["id"]
            item["result"] = block(call["params"][0]) if call["method"] == "node_getBlock" else 7
            items.append(item)
        out = transform(items if isinstance(request, list) else items[0])
        raw = out if isinstance(out, bytes) else json.dumps(out, separators=(",", ":")).encode()
        headers = {b"x-aztec-rollupversion": [b"1"]}
        if gzipped:
            raw = gzip.compress(raw)
            headers[b"content-encoding"] = [b"gzip"]
        return answer(raw, code=code, headers=headers)
    return respond


def bad_answers() -> dict[str, Callable[[Any], Any]]:
    def item(id_: Any, number: int) -> dict:
        return {"jsonrpc": "2.0", "id": id_, "result": block(number)}

    return {
        "missing": lambda items: items[:1],
        "extra": lambda items: items + [item(99, 999)],
        "duplicate": lambda items: [items[0], {**items[1], "id": items[0]["id"]}],
        "unknown": lambda items: [items[0], {**items[1], "id": 99}],
        "a string for a number": lambda items: [items[0], {**items[1], "id": str(items[1]["id"])}],
        "empty": lambda items: [],
        "one null id stands for nothing": lambda items: [{**items[1], "id": None}, items[0]],
        "object for a batch": lambda items: items[0],
        "no objects": lambda items: [1, 2],
        "an id that is no id": lambda items: [items[0], {**items[1], "id": [items[1]["id"]]}],
        "garbage": lambda items: b"{not json}",
        "truncated": lambda items: json.dumps(items).encode()[:-7],
        "html": lambda items: b"<html>502 Bad Gateway</html>",
        "empty body": lambda items: b"",
    }


BATCH = [rpc("node_getBlock", [304], id_=1), rpc("node_getBlock", [305], id_=2)]
GOOD = [result(block(304), 1), result(block(305), 2)]


def gateway_with(cached: bool, **limits: Any):
    store = MemoryStore() if cached else None
    gateway = rig(cache=store, breaker=TRIGGER_HAPPY, limits=Limits(**limits))
    gateway.pool.finalized = 500  # blocks 304 and 305 are final: cached for ever
    return gateway, store


def charged(gateway, index: int) -> bool:
    return gateway.pool.backends[index].breaker.state == "open"


def bad_answer_count(gateway, node_name: str) -> float:
    return sample(gateway.metrics, "sentinel_proxy_upstream_attempts_total", backend=node_name,
                  result="bad_answer")


def stored_blocks(store: MemoryStore) -> dict[bytes, Any]:
    return {key: json.loads(value[1:]) for key, value in store.values.items()}


@pytest.mark.parametrize("cached", [False, True], ids=["pass-through", "cache"])
def test_a_reversed_batch_is_answered_in_request_order(cached):
    gateway, store = gateway_with(cached)
    gateway.client.script("n0:1", node(lambda items: items[::-1]))
    reply = settled(gateway.handle(BATCH))
    assert (reply.status, reply.outcome, reply.attempts, reply.backend.name) == (200, "ok", 1, "n0:1")
    assert json.loads(reply.body) == GOOD
    assert not charged(gateway, 0) and bad_answer_count(gateway, "n0:1") == 0
    if cached:
        assert stored_blocks(store) == {cache_key("node_getBlock", [304], CHAIN): block(304),
                                        cache_key("node_getBlock", [305], CHAIN): block(305)}
        hit = settled(gateway.handle([rpc("node_getBlock", [305], id_="x"), rpc("node_getBlock", [304], id_="y")]))
        assert json.loads(hit.body) == [result(block(305), "x"), result(block(304), "y")]
        assert len(gateway.client.sent) == 1


def test_the_reordered_answer_is_the_nodes_own_item_bytes():
    gateway, _ = gateway_with(False)
    first = b'{"jsonrpc":"2.0","id":1,"result":{"number":304,  "extra":[1, 2]}}'
    second = b'{"result":{"number":305},"id":2,"jsonrpc":"2.0"}'
    gateway.client.script("n0:1", answer(b"[" + second + b" ,\n " + first + b"]"))
    reply = settled(gateway.handle(BATCH))
    assert reply.body == b"[" + first + b"," + second + b"]", "re-assembled from the node's bytes, not re-encoded"


@pytest.mark.parametrize("cached", [False, True], ids=["pass-through", "cache"])
@pytest.mark.parametrize("kind", list(bad_answers()))
def test_an_answer_that_does_not_answer_the_request_fails_over(kind, cached):
    gateway, store = gateway_with(cached)
    gateway.client.script("n0:1", node(bad_answers()[kind]))
    gateway.client.script("n1:1", node())
    reply = settled(gateway.handle(BATCH))
    assert (reply.status, reply.outcome, reply.attempts, reply.backend.name) == (200, "ok", 2, "n1:1"), reply
    assert json.loads(reply.body) == GOOD
    assert [sent.node for sent in gateway.client.sent] == ["n0:1", "n1:1"]
    assert charged(gateway, 0) and not charged(gateway, 1), "the node that answered garbage is charged"
    assert bad_answer_count(gateway, "n0:1") == 1
    assert sample(gateway.metrics, "sentinel_proxy_failovers_total", route="/") == 1
    if cached:
        assert stored_blocks(store) == {cache_key("node_getBlock", [304], CHAIN): block(304),
                                        cache_key("node_getBlock", [305], CHAIN): block(305)}, "only the good answer"


@pytest.mark.parametrize("kind", ["garbage", "truncated", "duplicate", "missing"])
def test_gzip_wrapped_garbage_is_a_bad_answer_too(kind):
    gateway, store = gateway_with(True)
    gateway.client.script("n0:1", node(bad_answers()[kind], gzipped=True))
    gateway.client.script("n1:1", node())
    reply = settled(gateway.handle(BATCH))
    assert (reply.backend.name, json.loads(reply.body)) == ("n1:1", GOOD)
    assert charged(gateway, 0) and len(store.values) == 2


def test_gzip_that_is_not_gzip_or_is_cut_short_is_a_bad_answer():
    for body in (json.dumps(GOOD).encode(), gzip.compress(json.dumps(GOOD).encode())[:-9]):
        gateway, _ = gateway_with(False)
        gateway.client.script("n0:1", answer(body, headers={b"content-encoding": [b"gzip"]}))
        gateway.client.script("n1:1", node())
        reply = settled(gateway.handle(BATCH))
        assert reply.backend.name == "n1:1" and charged(gateway, 0)


def test_a_gzip_answer_inflating_past_the_response_limit_is_a_bad_answer():
    gateway, _ = gateway_with(False, max_response=1000)
    padded = [{**GOOD[0], "result": {"number": 304, "pad": " " * 5000}}, GOOD[1]]
    gateway.client.script("n0:1", answer(gzip.compress(json.dumps(padded).encode()),
                                         headers={b"content-encoding": [b"gzip"]}))
    gateway.client.script("n1:1", node())
    assert settled(gateway.handle(BATCH)).backend.name == "n1:1" and charged(gateway, 0)


def test_a_gzip_answer_in_order_passes_through_untouched():
    gateway, _ = gateway_with(False)
    gateway.client.script("n0:1", node(gzipped=True))
    reply = settled(gateway.handle(BATCH))
    assert (b"content-encoding", b"gzip") in reply.headers
    assert json.loads(gzip.decompress(reply.body)) == GOOD


def test_a_reversed_gzip_answer_is_inflated_and_put_in_order():
    gateway, _ = gateway_with(False)
    gateway.client.script("n0:1", node(lambda items: items[::-1], gzipped=True))
    reply = settled(gateway.handle(BATCH))
    assert json.loads(reply.body) == GOOD and all(name != b"content-encoding" for name, _ in reply.headers)
    assert (b"x-aztec-rollupversion", b"1") in reply.headers


@pytest.mark.parametrize("transform", [
    lambda item: {**item, "id": 2},
    lambda item: {k: v for k, v in item.items() if k != "id"},
    lambda item: [item],
    lambda item: b'{"jsonrpc":"2.0","id":1,"result":',
], ids=["another id", "no id", "an array", "truncated"])
def test_a_single_call_needs_an_object_with_its_id(transform):
    gateway, _ = gateway_with(False)
    gateway.client.script("n0:1", node(transform))
    gateway.client.script("n1:1", node())
    reply = settled(gateway.handle(rpc("node_getBlock", [304], id_=1)))
    assert (reply.backend.name, json.loads(reply.body)) == ("n1:1", result(block(304), 1))
    assert charged(gateway, 0)


def test_a_write_answered_with_garbage_is_not_sent_again():
    gateway, _ = gateway_with(False)
    gateway.client.script("n0:1", answer([result("0xtx", 5)]))
    gateway.client.script("n1:1", answer([result("0xtx", 1)]))
    reply = settled(gateway.handle([rpc("node_sendTx", [{}], id_=1)]))
    (error,) = [item["error"] for item in json.loads(reply.body)]
    assert (reply.status, error["code"]) == (502, jsonrpc.UPSTREAM_FAILED) and "was not asked" in error["message"]
    assert [sent.node for sent in gateway.client.sent] == ["n0:1"] and charged(gateway, 0)


def test_a_mismatched_answer_from_every_node_is_a_502():
    gateway, store = gateway_with(True)
    for name in ("n0:1", "n1:1", "n2:1"):
        gateway.client.script(name, node(lambda items: items[:1]))
    reply = settled(gateway.handle(BATCH))
    assert (reply.status, reply.attempts, json.loads(reply.body)[0]["error"]["code"]) == (502, 3, jsonrpc.UPSTREAM_FAILED)
    assert store.values == {}


def test_notifications_need_no_answer_item():
    batch = [rpc("node_getBlock", [304], id_=1), {"jsonrpc": "2.0", "method": "node_getBlock", "params": [305]}]
    omitted = node(lambda items: items[:1])  # the JSON-RPC specification: no item for a notification
    without_id = node(lambda items: items[::-1])  # the Aztec node: an item without an id, here out of order
    for script in (omitted, without_id):
        gateway, _ = gateway_with(False)
        gateway.client.script("n0:1", script)
        reply = settled(gateway.handle(batch))
        assert (reply.backend.name, reply.attempts) == ("n0:1", 1)
        items = json.loads(reply.body)
        assert items[0] == result(block(304), 1)
        assert items[1:] in ([], [{"jsonrpc": "2.0", "result": block(305)}])


def test_a_null_id_error_stands_for_the_call_the_node_failed():
    gateway, _ = gateway_with(False)
    fault = {"jsonrpc": "2.0", "error": {"code": -32603, "message": "Internal error"}, "id": None}
    gateway.client.script("n0:1", node(lambda items: [fault, items[0]]))
    reply = settled(gateway.handle(BATCH))
    assert (reply.backend.name, reply.outcome) == ("n0:1", "rpc_error")
    assert json.loads(reply.body) == [GOOD[0], {"jsonrpc": "2.0", "id": 2, "error": fault["error"]}]


def test_a_refusal_of_the_whole_batch_is_passed_on():
    refusal = {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Batch too large"}}
    for cached in (False, True):
        gateway, _ = gateway_with(cached)
        gateway.client.script("n0:1", answer(refusal, code=400))
        reply = settled(gateway.handle(BATCH))
        assert (reply.status, reply.outcome, json.loads(reply.body)) == (400, "rpc_error", refusal)
        assert not charged(gateway, 0) and len(gateway.client.sent) == 1


def test_refused_items_are_merged_with_a_reordered_answer():
    gateway, _ = gateway_with(False)
    gateway.client.script("n0:1", node(lambda items: items[::-1]))
    reply = settled(gateway.handle([BATCH[0], rpc("nodeAdmin_x", id_="r"), BATCH[1]]))
    items = json.loads(reply.body)
    assert [items[0], items[2]] == GOOD and items[1]["id"] == "r"
    assert items[1]["error"]["code"] == jsonrpc.METHOD_NOT_FOUND


def test_match_rules_directly():
    calls = jsonrpc.parse_request(json.dumps(BATCH).encode(), 100).calls
    ok = json.dumps(GOOD).encode()
    assert match(ok, calls, True).body is None, "in order and exact: the node's bytes as they are"
    with pytest.raises(BadAnswer, match="answered twice"):
        match(json.dumps([GOOD[0], GOOD[0]]).encode(), calls, True)
    with pytest.raises(BadAnswer, match="without an answer"):
        match(json.dumps(GOOD[:1]).encode(), calls, True)
    with pytest.raises(BadAnswer, match="was not asked"):
        match(json.dumps([GOOD[0], result(1, 3)]).encode(), calls, True)
    with pytest.raises(BadAnswer, match="not JSON"):
        match(b"{not json}", calls, True)
    duplicated = jsonrpc.parse_request(json.dumps([rpc("node_a", id_=1), rpc("node_b", id_=1)]).encode(), 100).calls
    assert match(json.dumps([result("a", 1), result("b", 1)]).encode(), duplicated, True).body is None, \
        "a caller's duplicate ids: answered in order, as asked"


@ensure
async def test_a_node_that_reverses_batches_end_to_end(cluster):
    running = cluster.node("pruned")
    running.node.reorder_batches = "reverse"
    service, url = await cluster.gateway([running], cache="memory")
    await wait_for(lambda: service.pool.finalized is not None, what="a majority finalized tip")
    final = service.pool.finalized
    batch = [rpc("node_getBlock", [final - 1], id_=0), rpc("node_getBlock", [final - 2], id_="one"),
             rpc("node_isReady", id_=2)]
    for _ in range(2):  # a miss, then hits (and the never-cached call again)
        answer_ = await post_json(url, batch)
        items = answer_.json()
        assert answer_.code == 200 and [item["id"] for item in items] == [0, "one", 2]
        assert [items[0]["result"]["number"], items[1]["result"]["number"], items[2]["result"]] == \
            [final - 1, final - 2, True]
    assert running.node.calls["node_getBlock"] == 2
    plain = await post_json(url, batch[:1] + [rpc("node_getBlockNumber", id_="n")], headers={
        b"content-type": [b"application/json"], b"accept-encoding": [b"gzip"]})
    assert [item["id"] for item in plain.json()] == [0, "n"]
