"""End-to-end: verdicts in /health and routing that acts on them, over loopback."""
import json
import pytest
import pytest_twisted

from sentinel_proxy.core import jsonrpc
from sentinel_proxy.core.routing import BLOCK_PARAM_METHODS, block_needed
from sentinel_proxy.core.jsonrpc import parse_request
from tests.support import http, post_json, rpc, wait_for

ensure = pytest_twisted.ensureDeferred

INTEGRITY_MS = 1000
#: "Within two check intervals" of the integrity check, plus start-up time on a loaded machine.
VERDICT_BOUND = 2 * INTEGRITY_MS / 1000 + 2.0

FLEET = ("archiver", "pruned", "legacy", "missing-epochs", "lagging", "other-rollup", "sentinel-disabled")


async def fleet(cluster, scenarios=FLEET):
    nodes = {name: cluster.node(name) for name in scenarios}
    service, gateway = await cluster.gateway(list(nodes.values()), wait_healthy=0,
                                             integrity_check_interval_ms=str(INTEGRITY_MS))
    return nodes, service, gateway


async def health_by_scenario(gateway, nodes):
    health = (await http("GET", gateway + "/health")).json()
    by_url = {b["url"]: b for b in health["backends"]}
    return {name: by_url[node.url] for name, node in nodes.items()}


def all_judged(service):
    return all(b.verdict is not None and b.last_check is not None for b in service.pool.backends)


@ensure
async def test_every_node_gets_the_right_verdict_and_traffic_avoids_the_bad_ones(cluster):
    nodes, service, gateway = await fleet(cluster)
    await wait_for(lambda: all_judged(service), timeout=VERDICT_BOUND, what="a verdict for every node")
    await wait_for(lambda: any(b.quarantine for b in service.pool.backends), timeout=VERDICT_BOUND,
                   what="the first reassessment")
    health = await health_by_scenario(gateway, nodes)

    for name in ("archiver", "pruned", "legacy"):
        assert health[name]["routing"] == "preferred", (name, health[name])
        assert health[name]["integrityStats"]["integrityStatus"] == "perfect", name
    assert health["archiver"]["nodeType"] == "archiver" and health["archiver"]["oldestBlock"] == 1
    assert health["pruned"]["nodeType"] == "pruned" and health["pruned"]["oldestBlock"] > 1

    missing = health["missing-epochs"]
    assert missing["integrityStats"]["integrityStatus"] == "bad" and missing["routing"] == "fallback"
    assert missing["integrityStats"]["missingEpochs"], missing["integrityStats"]
    assert missing["integrity"]["findings"], "the verdict must be explained"
    assert any(epoch["missingSlots"] for epoch in missing["integrity"]["epochs"])

    assert health["lagging"]["routing"] == "quarantined" and "lag" in health["lagging"]["quarantine"]
    assert health["lagging"]["lag"] >= 50
    assert health["other-rollup"]["routing"] == "quarantined"
    assert "chain" in health["other-rollup"]["quarantine"]
    assert health["other-rollup"]["chain"] == {"l1ChainId": "31337", "rollupVersion": "2"}
    assert health["sentinel-disabled"]["integrityStats"]["integrityStatus"] == "unverified"
    assert health["sentinel-disabled"]["routing"] == "fallback"

    before = {name: node.node.calls["node_getProvenBlockNumber"] for name, node in nodes.items()}
    for i in range(200):
        answer = await post_json(gateway, [rpc("node_getProvenBlockNumber", id_=i)])
        assert answer.code == 200 and answer.header("x-sentinel-fallback") is None
    served = {name: node.node.calls["node_getProvenBlockNumber"] - before[name] for name, node in nodes.items()}
    assert sum(served.values()) == 200
    assert {name for name, count in served.items() if count} <= {"archiver", "pruned", "legacy"}, served
    assert min(served[name] for name in ("archiver", "pruned", "legacy")) > 0, served


@ensure
async def test_historical_block_goes_to_the_archiver(cluster):
    nodes, service, gateway = await fleet(cluster, ("archiver", "pruned"))
    await wait_for(lambda: all(b.routing == "preferred" for b in service.pool.backends), timeout=VERDICT_BOUND,
                   what="both nodes preferred")
    pruned_calls = nodes["pruned"].node.calls["node_getBlock"]
    for i in range(20):
        answer = await post_json(gateway, [rpc("node_getBlock", [5 + i])])
        assert answer.code == 200 and answer.json()[0]["result"]["number"] == 5 + i
    storage = await post_json(gateway, rpc("node_getPublicStorageAt", [3, "0x" + "11" * 32, "0x01"]))
    assert storage.code == 200 and "result" in storage.json(), storage.body
    assert nodes["pruned"].node.calls["node_getBlock"] == pruned_calls
    assert nodes["pruned"].node.calls["node_getPublicStorageAt"] == 0
    assert nodes["archiver"].node.calls["node_getBlock"] >= 20


@ensure
async def test_without_an_archiver_old_blocks_get_a_clear_error(cluster):
    nodes, service, gateway = await fleet(cluster, ("pruned",))
    await wait_for(lambda: service.pool.backends[0].oldest_block is not None, timeout=VERDICT_BOUND,
                   what="the node's world-state depth")
    floor = service.pool.backends[0].oldest_block
    single = await post_json(gateway, rpc("node_getBlock", [5], id_=9))
    assert single.code == 400
    assert single.json()["error"]["code"] == jsonrpc.BLOCK_UNAVAILABLE and single.json()["id"] == 9
    assert f"oldest: {floor}" in single.json()["error"]["message"]
    batch = await post_json(gateway, [rpc("node_getBlock", [5], id_=0), rpc("node_getBlock", [floor + 1], id_=1),
                                      rpc("node_getBlock", ["5"], id_=2)])
    items = batch.json()
    assert batch.code == 200 and [item["id"] for item in items] == [0, 1, 2]
    assert items[0]["error"]["code"] == jsonrpc.BLOCK_UNAVAILABLE
    assert items[1]["result"]["number"] == floor + 1
    assert "result" not in items[2] and "error" not in items[2], "a decimal string is a hash: not found"
    assert nodes["pruned"].node.calls["node_getBlock"] == 2


@ensure
async def test_untrusted_nodes_serve_as_a_labelled_fallback(cluster):
    nodes, service, gateway = await fleet(cluster, ("missing-epochs", "sentinel-disabled"))
    await wait_for(lambda: all_judged(service) and all(b.healthy for b in service.pool.backends),
                   timeout=VERDICT_BOUND, what="verdicts")
    answer = await post_json(gateway, [rpc("node_getBlockNumber")])
    assert answer.code == 200 and answer.header("x-sentinel-fallback") == "integrity"


def test_block_needed_reads_only_explicit_numbers():
    def calls(*params_list, method="node_getBlock"):
        return parse_request(__import__("json").dumps(
            [rpc(method, list(params), id_=i) for i, params in enumerate(params_list)]).encode(), 100).calls

    assert [block_needed(c) for c in calls([7], ["7"], ["latest"], ["0x" + "ab" * 32], [True], [-1], [])] == \
        [7, None, None, None, None, None, None]
    assert jsonrpc.oldest_block(calls([70], [7], ["latest"])) == 7
    assert jsonrpc.oldest_block(calls([7], method="node_getBlockNumber")) is None
    assert "node_getPublicStorageAt" in BLOCK_PARAM_METHODS and "node_getBlocks" in BLOCK_PARAM_METHODS


# -- the pruning edge, in memory (tests/stages_support.py: no sockets, task.Clock)

from sentinel_proxy.proxy.failover import pruned_block  # noqa: E402
from sentinel_simnode.node import pruned_error_4, pruned_error_5  # noqa: E402
from tests.stages_support import answer, result, rig, settled  # noqa: E402


def pruned(number, dialect="5", id_=1):
    message = pruned_error_5(number, number + 10) if dialect == "5" else pruned_error_4(number)
    return answer({"jsonrpc": "2.0", "id": id_, "error": {"code": -32702, "message": message}}, code=400)


def test_pruned_block_reads_both_wordings():
    assert pruned_block({"code": -32702, "message": pruned_error_5(60, 70)}) == 60
    assert pruned_block({"code": -32702, "message": pruned_error_4(61)}) == 61
    assert pruned_block({"code": -32702, "message": "Unable to get leaf at index 3 for block 62, failed to get "
                                                    "block data."}) == 62
    assert pruned_block({"code": -32702, "message": "World state not available for block 5 (oldest is 9)"}) is None
    assert pruned_block({"code": -32000, "message": pruned_error_4(61)}) is None
    assert pruned_block({"code": -32702, "message": "Queried block 5 not yet synced by the node"}) is None


@pytest.mark.parametrize("dialect, method, param", [
    ("5", "aztec_getPublicStorageAt", {"number": 60}), ("5", "aztec_getPublicStorageAt", "0x" + "ab" * 32),
    ("4", "node_getPublicStorageAt", 60),
])
def test_a_pruned_answer_fails_over_and_lowers_the_nodes_history(dialect, method, param):
    r = rig(3)
    r.client.script("n0:1", pruned(60, dialect))
    r.client.script("n1:1", answer(result("0x2a")))
    reply = settled(r.handle(rpc_call(method, [param, "0x1", "0x2"])))
    assert reply.status == 200 and json.loads(reply.body)["result"] == "0x2a"
    assert [s.node for s in r.client.sent] == ["n0:1", "n1:1"]
    assert r.node(0).oldest_block == 61 and not r.node(0).keeps(60) and r.node(0).keeps(61)
    assert r.node(0).breaker.state == "closed"  # an answer, not a failure
    # The next call about block 60 goes straight to a node that keeps it.
    r.client.script("n1:1", answer(result("0x2b")))
    settled(r.handle(rpc_call(method, [{"number": 60} if dialect == "5" else 60, "0x1", "0x2"])))
    assert [s.node for s in r.client.sent][2:] == ["n1:1"]


def test_when_no_node_keeps_the_block_the_answer_is_block_unavailable():
    r = rig(2)
    r.client.script("n0:1", pruned(60))
    r.client.script("n1:1", pruned(60, "4"))
    reply = settled(r.handle(rpc_call("aztec_getPublicStorageAt", [{"archive": "0x01"}, "0x1", "0x2"])))
    body = json.loads(reply.body)
    assert reply.status == 400 and body["error"]["code"] == jsonrpc.BLOCK_UNAVAILABLE and body["id"] == 1
    assert all(b.oldest_block == 61 for b in r.pool.backends)
    # Now the guard knows: no node is asked again.
    reply = settled(r.handle(rpc_call("node_getPublicStorageAt", [60, "0x1", "0x2"])))
    assert json.loads(reply.body)["error"]["code"] == jsonrpc.BLOCK_UNAVAILABLE
    assert len(r.client.sent) == 2


def test_a_batch_with_a_pruned_item_is_repeated_at_a_keeper_unless_it_has_effects():
    r = rig(2)
    batch = [rpc_call("aztec_getBlockNumber", [], 1), rpc_call("aztec_getPublicStorageAt", [60, "0x1", "0x2"], 2)]
    node0 = json.dumps([{"jsonrpc": "2.0", "id": 1, "result": 100},
                        {"jsonrpc": "2.0", "id": 2, "error": {"code": -32702, "message": pruned_error_5(60, 70)}}])
    r.client.script("n0:1", answer(node0.encode()))
    r.client.script("n1:1", answer([{"jsonrpc": "2.0", "id": 1, "result": 100}, {"jsonrpc": "2.0", "id": 2, "result": "0x2"}]))
    body = json.loads(settled(r.handle(batch)).body)
    assert body[1]["result"] == "0x2"
    # With a sendTx in it, the batch is not repeated: the caller gets the node's answer.
    r = rig(2)
    r.client.script("n0:1", answer([{"jsonrpc": "2.0", "id": 1, "result": "0xtx"},
                                  {"jsonrpc": "2.0", "id": 2, "error": {"code": -32702,
                                                                        "message": pruned_error_5(60, 70)}}]))
    body = json.loads(settled(r.handle([rpc_call("aztec_sendTx", [{}], 1), batch[1]])).body)
    assert body[1]["error"]["code"] == -32702 and [s.node for s in r.client.sent] == ["n0:1"]


def rpc_call(method, params, id_=1):
    return {"jsonrpc": "2.0", "id": id_, "method": method, "params": params}
