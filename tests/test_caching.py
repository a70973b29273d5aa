"""End-to-end caching and coalescing: a real gateway with its cache in front of simulated nodes."""
import json

import pytest_twisted
from twisted.internet import defer

from sentinel_proxy.core.cache_policy import cache_key
from sentinel_proxy.core.answers import entry_from_store, entry_of, item_bytes, store_value
from sentinel_proxy.proxy.coalesce import Entry
from tests.support import post_json, rpc, wait_for

ensure = pytest_twisted.ensureDeferred

#: TEST_CHAIN's tip is 1000; the simulator finalizes tip - 20 (blocks up to 980 are final) and a pruned node
#: keeps blocks from tip - 64 (936) on.
FINAL, UNFINAL = 960, 995


async def cached_gateway(cluster, nodes=1, **overrides):
    running = [cluster.node("pruned") for _ in range(nodes)]
    settings = {"cache": "memory", **overrides}
    service, url = await cluster.gateway(running, **settings)
    await wait_for(lambda: service.pool.finalized is not None, what="a majority finalized tip")
    return running, service, url


def upstream_calls(nodes, method):
    return sum(n.node.calls[method] for n in nodes)


@ensure
async def test_a_cached_answer_has_the_upstream_content_and_the_callers_id(cluster):
    nodes, service, url = await cached_gateway(cluster)
    direct = (await post_json(nodes[0].url, rpc("node_getBlock", [FINAL], id_=7))).json()
    first = await post_json(url, rpc("node_getBlock", [FINAL], id_="a"))
    second = await post_json(url, rpc("node_getBlock", [FINAL], id_=99))
    assert first.header("x-cache") == "MISS" and second.header("x-cache") == "HIT"
    assert first.json()["result"] == second.json()["result"] == direct["result"]
    assert (first.json()["id"], second.json()["id"]) == ("a", 99)
    assert second.header("x-aztec-rollupversion") == "1", "a cache hit still says which chain it is"
    assert upstream_calls(nodes, "node_getBlock") == 2  # the direct call and the one miss


@ensure
async def test_a_batch_mixes_hits_misses_not_found_and_refusals_in_order(cluster):
    nodes, service, url = await cached_gateway(cluster)
    await post_json(url, [rpc("node_getBlock", [FINAL], id_=0)])  # warm one entry
    before = upstream_calls(nodes, "node_getBlock")
    batch = [rpc("node_getBlock", [FINAL], id_="hit"), rpc("node_getBlock", [FINAL - 1], id_=1),
             rpc("nodeAdmin_getConfig", id_=2), rpc("node_getBlock", [10 ** 7], id_="missing"),
             rpc("node_isReady", id_=4), rpc("node_getBlock", [FINAL - 1], id_=5)]
    answer = await post_json(url, batch)
    items = answer.json()
    assert answer.code == 200 and [item["id"] for item in items] == ["hit", 1, 2, "missing", 4, 5]
    assert items[0]["result"]["number"] == FINAL and items[1]["result"]["number"] == FINAL - 1
    assert items[2]["error"]["code"] == -32601
    assert "result" not in items[3] and "error" not in items[3], "not found keeps no result key"
    assert items[4]["result"] is True
    assert items[5] == {**items[1], "id": 5}, "the duplicate inside the batch shares the answer"
    assert upstream_calls(nodes, "node_getBlock") - before == 2, "one miss and one not-found went upstream"
    assert answer.header("x-cache") is None, "X-Cache is for single calls"


@ensure
async def test_identical_calls_in_flight_are_coalesced_across_callers(cluster):
    nodes, service, url = await cached_gateway(cluster)
    nodes[0].node.scenario = "slow"  # 0.2 s per answer: the callers overlap
    calls = [post_json(url, [rpc("node_getBlock", [FINAL - 5], id_=i)]) for i in range(20)]
    single = [post_json(url, rpc("node_getBlock", [FINAL - 5], id_="single"))]
    answers = await defer.gatherResults([defer.Deferred.fromCoroutine(c) for c in calls + single])
    assert {a.code for a in answers} == {200}
    assert all(a.json()[0]["id"] == i for i, a in enumerate(answers[:20]))
    assert answers[20].header("x-cache") == "COALESCED"
    assert nodes[0].node.calls["node_getBlock"] == 1, "twenty-one callers, one upstream call"
    text = (await post_json(url, rpc("node_getBlock", [FINAL - 5]))).header("x-cache")
    assert text == "HIT"


@ensure
async def test_volatile_answers_expire_and_unfinalized_blocks_are_not_kept(cluster):
    nodes, service, url = await cached_gateway(cluster, cache_volatile_ttl_ms="300")
    for _ in range(3):
        assert (await post_json(url, rpc("node_getBlock", [UNFINAL]))).code == 200
    assert nodes[0].node.calls["node_getBlock"] == 1, "volatile: shared within its TTL"
    key = cache_key("node_getBlock", [UNFINAL], service.pool.chain_identity())
    assert service.cache.get(key).result, "stored under the key of the gateway's chain"
    await wait_for(lambda: not service.cache.get(key).result, timeout=3, what="the volatile entry to expire")
    await post_json(url, rpc("node_getBlock", [UNFINAL]))
    assert nodes[0].node.calls["node_getBlock"] == 2
    for _ in range(3):
        await post_json(url, rpc("node_isReady"))
    assert nodes[0].node.calls["node_isReady"] >= 3, "per-node answers are never cached"


@ensure
async def test_redis_outage_is_a_miss_never_an_error(cluster, redis_server):  # noqa: F811
    nodes, service, url = await cached_gateway(cluster, cache=redis_server.url, redis_timeout_ms="100")
    first = await post_json(url, rpc("node_getBlock", [FINAL]))
    await wait_for(lambda: service.cache.stores >= 1, what="the answer stored in Redis")
    assert (await post_json(url, rpc("node_getBlock", [FINAL]))).header("x-cache") == "HIT"
    redis_server.kill()
    codes = []
    for i in range(60):
        answer = await post_json(url, [rpc("node_getBlock", [FINAL - (i % 7)], id_=i), rpc("node_getBlockNumber")])
        codes.append(answer.code)
        assert answer.json()[0]["result"]["number"] == FINAL - (i % 7)
    assert set(codes) == {200}, "zero caller errors while Redis is down"
    assert service.cache.errors >= 1
    assert first.json()["result"]["number"] == FINAL


def test_answer_items_are_rebuilt_exactly():
    for item in ({"jsonrpc": "2.0", "id": 1, "result": {"a": [1, "x"]}}, {"jsonrpc": "2.0", "id": "s"},
                 {"jsonrpc": "2.0", "id": 3, "error": {"code": -32701, "message": "bad"}}):
        entry = entry_of(item)
        assert entry_from_store(store_value(entry)) == entry
        assert json.loads(item_bytes(json.dumps(item["id"]).encode(), entry)) == item
    assert item_bytes(None, Entry("result", b"1")) == b'{"jsonrpc":"2.0","result":1}', "a notification: no id"
    assert entry_from_store(b"?junk") is None
    assert Entry("missing").raw == b""
