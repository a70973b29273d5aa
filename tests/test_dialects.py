"""End to end over loopback: a gateway in front of a mixed 4.x/5.x fleet of simulated nodes.

``aztec_*`` and ``node_*`` names, finalized-block cache hits in every block-parameter form, a
``null`` not-found that turns into a block, two chains in one cache key space, and the pruning edge.

The request path does not hand the pool's chain to the cache stage yet (``proxy/path.py``: see
docs/caching.md); :func:`chain_safe` wires it the way that one-line change will.
"""
import pytest_twisted

from sentinel_proxy.core import jsonrpc
from tests.stages_support import MemoryStore
from tests.support import post_json, rpc, wait_for

ensure = pytest_twisted.ensureDeferred

#: TEST_CHAIN's tip is 1000; finalized up to 980; a pruned node keeps blocks from 936 on.
FINAL, OLD = 960, 900


def chain_safe(service, store=None):
    caching = service.forwarder._caching
    caching._chain = service.pool.chain_identity
    if store is not None:
        caching._cache = store
    return caching


async def cached(cluster, nodes, store=None, **overrides):
    service, url = await cluster.gateway(nodes, cache="memory", **overrides)
    await wait_for(lambda: service.pool.finalized is not None and service.pool.chain_identity() is not None,
                   what="a finalized tip and a chain")
    chain_safe(service, store)
    return service, url


@ensure
async def test_aztec_and_node_names_through_a_mixed_fleet(cluster):
    v5 = cluster.node("archiver", dialect="5")
    v4 = cluster.node("pruned", dialect="4")
    service, url = await cluster.gateway([v5, v4])
    # Both names pass the default policy; node_* is served by both dialects.
    answer = await post_json(url, rpc("node_getBlockNumber"))
    assert answer.code == 200 and isinstance(answer.json()["result"], int)
    for name in ("aztecAdmin_getConfig", "NODEADMIN_getConfig", "aztecDebug_x"):
        refused = (await post_json(url, rpc(name))).json()
        assert refused["error"]["code"] == jsonrpc.METHOD_NOT_FOUND
    assert sum(n.node.calls.get("aztecAdmin_getConfig", 0) for n in (v5, v4)) == 0


@ensure
async def test_aztec_names_and_finalized_block_hits_in_every_form(cluster):
    node = cluster.node("archiver", dialect="5")
    service, url = await cached(cluster, [node])
    for param in (FINAL, {"number": FINAL}, {"number": str(FINAL)}):
        first = await post_json(url, rpc("aztec_getBlock", [param], id_="a"))
        second = await post_json(url, rpc("aztec_getBlock", [param], id_=2))
        assert (first.header("x-cache"), second.header("x-cache")) == ("MISS", "HIT"), param
        assert first.json()["result"] == second.json()["result"] and first.json()["result"]["number"] == FINAL
        assert second.json()["id"] == 2
    tips = await post_json(url, rpc("aztec_getBlockNumber", ["proven"]))
    assert isinstance(tips.json()["result"], int)
    # A tag names a moving block: never kept past the volatile TTL, even when it is finalized.
    assert service.forwarder._caching is not None
    tag = await post_json(url, rpc("aztec_getBlock", ["finalized"]))
    assert tag.header("x-cache") == "MISS"


@ensure
async def test_a_null_not_found_turns_into_a_block(cluster):
    node = cluster.node("archiver", dialect="5")
    original = node.node.handlers["aztec_getBlock"]
    missing = {"left": 1}

    def flaky(params, state):
        if missing["left"]:
            missing["left"] -= 1
            return None
        return original(params, state)

    node.node.handlers["aztec_getBlock"] = flaky
    service, url = await cached(cluster, [node])
    first = await post_json(url, rpc("aztec_getBlock", [FINAL]))
    assert first.json()["result"] is None
    second = await post_json(url, rpc("aztec_getBlock", [FINAL]))
    assert second.header("x-cache") == "MISS", "a null at a finalized height is not passed on"
    assert second.json()["result"]["number"] == FINAL
    third = await post_json(url, rpc("aztec_getBlock", [FINAL]))
    assert third.header("x-cache") == "HIT" and third.json()["result"] == second.json()["result"]


@ensure
async def test_two_chains_share_one_store_without_reading_each_others_entries(cluster):
    store = MemoryStore()
    one = cluster.node("archiver", dialect="5")
    other = cluster.node("other-rollup", dialect="5")
    service1, url1 = await cached(cluster, [one], store)
    service2, url2 = await cached(cluster, [other], store)
    assert service1.pool.chain_identity() != service2.pool.chain_identity()
    first = await post_json(url1, rpc("node_getBlock", [FINAL]))
    second = await post_json(url2, rpc("node_getBlock", [FINAL]))
    assert first.header("x-cache") == second.header("x-cache") == "MISS"
    direct = (await post_json(other.url, rpc("node_getBlock", [FINAL]))).json()
    assert second.json()["result"] == direct["result"] != first.json()["result"]
    assert (await post_json(url2, rpc("node_getBlock", [FINAL]))).header("x-cache") == "HIT"
    assert len({key.split(b"]", 1)[0] for key in store.values}) == 2


@ensure
async def test_nothing_is_cached_until_the_chain_is_known(cluster):
    node = cluster.node("archiver", dialect="5")
    service, url = await cached(cluster, [node])
    service.forwarder._caching._chain = lambda: None
    for _ in range(2):
        assert (await post_json(url, rpc("aztec_getBlock", [FINAL]))).header("x-cache") is None


@ensure
async def test_the_pruning_edge_fails_over_to_a_node_that_keeps_the_block(cluster):
    pruned = cluster.node("pruned", dialect="5")
    archiver = cluster.node("archiver", dialect="4")
    service, url = await cluster.gateway([pruned, archiver], health_check_interval_ms="60000")
    backend = next(b for b in service.pool.backends if b.url == pruned.url)
    expected = (await post_json(archiver.url, rpc("node_getPublicStorageAt", [OLD, "0x01", "0x02"]))).json()
    learned = 0
    for _ in range(30):  # the gateway believes the pruned node keeps everything; it learns otherwise
        backend.oldest_block = 1
        service.pool.reassess()
        asked = pruned.node.calls.get("node_getPublicStorageAt", 0)
        # (a plain number: the 4.x archiver refuses {"number": n} with -32701)
        answer = await post_json(url, rpc("node_getPublicStorageAt", [OLD, "0x01", "0x02"]))
        assert answer.code == 200 and answer.json()["result"] == expected["result"]
        if pruned.node.calls.get("node_getPublicStorageAt", 0) > asked:  # it went to the pruned node first
            assert backend.oldest_block == OLD + 1 and not backend.keeps(OLD)
            assert backend.breaker.state == "closed"
            learned += 1
            if learned == 2:
                break
    assert learned, "the pruned node was never picked first"


@ensure
async def test_the_pruning_edge_without_a_keeper_is_block_unavailable(cluster):
    pruned = cluster.node("pruned", dialect="4")
    service, url = await cluster.gateway([pruned], health_check_interval_ms="60000")
    backend = service.pool.backends[0]
    backend.oldest_block = 1
    service.pool.reassess()
    answer = await post_json(url, rpc("node_getPublicStorageAt", [OLD, "0x01", "0x02"]))
    assert answer.code == 400 and answer.json()["error"]["code"] == jsonrpc.BLOCK_UNAVAILABLE
    assert backend.oldest_block == OLD + 1


@ensure
async def test_aztec_names_reach_a_node_that_speaks_them_in_a_mixed_fleet(cluster):
    v4 = cluster.node("archiver", dialect="4")
    v5 = cluster.node("archiver", dialect="5")
    direct = (await post_json(v4.url, rpc("aztec_getBlockNumber"))).json()
    assert direct["error"]["code"] == jsonrpc.METHOD_NOT_FOUND, "the 4.x node does not know aztec_*"
    service, url = await cluster.gateway([v4, v5])
    for index in range(20):  # whichever node is picked first, the caller gets the 5.x answer
        answer = await post_json(url, rpc("aztec_getBlockNumber", id_=index))
        assert answer.code == 200 and isinstance(answer.json()["result"], int), answer.json()
        assert answer.json()["id"] == index
    assert v4.node.calls.get("aztec_getBlockNumber", 0) > 0, "the 4.x node was never picked first"
    assert all(b.breaker.state == "closed" for b in service.pool.backends)
