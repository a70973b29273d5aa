"""The simulated Aztec node: the pure chain model (driven by ``task.Clock``) and its wire protocol
over real loopback HTTP.  Nothing here sleeps; every wait is bounded by a timeout.
"""
from __future__ import annotations

import gzip
import json
from collections import Counter, defaultdict
from io import BytesIO
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings, strategies as st
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, reactor, task
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseNeverReceived, readBody
from twisted.web.http_headers import Headers

from sentinel_simnode import tap as simnode_tap
from sentinel_simnode.node import (
    MAX_BATCH,
    MAX_BODY,
    SCENARIOS,
    ChainParams,
    SimulatedNode,
    block_hash,
    block_number_for_hash,
    chain_state,
    committee,
    initial_slot,
    simulated_site,
    tx_hash,
    tx_location,
    validator_address,
    validators_stats,
    validators_stats_json,
)

# Twisted's own Agent response transport triggers this warning inside readBody.
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody with a transport:DeprecationWarning")

CHAIN = ChainParams()
#: A chain whose tip does not move during a loopback test.
STILL = ChainParams(block_seconds=3600.0, slot_seconds=3600.0)
JSON_CT = {b"content-type": [b"application/json"]}
AZTEC_HEADERS = ("x-aztec-l1ChainId", "x-aztec-rollupVersion", "x-aztec-l2ProtocolContractsHash",
                 "x-aztec-l2CircuitsVkTreeRoot", "x-aztec-packageVersion", "x-aztec-l1RollupAddress")


def call(method: str, params: list | None = None, id_: Any = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": method, "params": params or []}


def ask(node: SimulatedNode, value: Any) -> tuple[int, Any]:
    """Answer a JSON value without HTTP: (status, decoded answer)."""
    status, body = node.handle_body(json.dumps(value).encode())
    return status, json.loads(body)


def result(node: SimulatedNode, method: str, *params: Any) -> Any:
    status, answer = ask(node, call(method, list(params)))
    assert status == 200, answer
    return answer.get("result")


def by_slot(stats: dict[str, Any]) -> dict[Any, list[tuple[str, str]]]:
    """History entries grouped per slot: {slot: [(address, status), ...]}."""
    slots: dict[Any, list[tuple[str, str]]] = defaultdict(list)
    for address, entry in stats["stats"].items():
        for h in entry["history"]:
            slots[h["slot"]].append((address, h["status"]))
    return slots


# ------------------------------------------------------------------------------ chain model


def test_tip_and_slot_advance_with_the_clock() -> None:
    clock = task.Clock()
    node = SimulatedNode("pruned", CHAIN, clock=clock)
    s0 = node.chain_state()
    assert (s0.tip, s0.checkpointed, s0.proven, s0.finalized) == (1000, 998, 990, 980)
    assert s0.last_processed_slot == s0.slot - 1 == CHAIN.start_slot - 1
    assert s0.oldest_historic == 1000 - 64
    clock.advance(2 * 5 + 1)
    assert node.chain_state().tip == 1005
    assert result(node, "node_getBlockNumber") == 1005
    assert result(node, "node_getProvenBlockNumber") == 995
    assert result(node, "node_getCheckpointedBlockNumber") == 1003
    clock.advance(72 * 3)
    assert node.chain_state().slot == CHAIN.start_slot + 3


def test_lagging_and_archiver_states() -> None:
    lag = chain_state(CHAIN, SCENARIOS["lagging"], 100.0)
    ok = chain_state(CHAIN, SCENARIOS["pruned"], 100.0)
    assert ok.tip - lag.tip == 50
    assert ok.slot - lag.slot == 2 * CHAIN.slots_per_epoch
    assert chain_state(CHAIN, SCENARIOS["archiver"], 100.0).oldest_historic == 1


def test_committees_are_deterministic_and_sized() -> None:
    for epoch in (400, 401, 402):
        members = committee(CHAIN, epoch)
        assert len(set(members)) == CHAIN.committee_size == 48
        assert all(0 <= m < 96 for m in members)
        assert committee(CHAIN, epoch) == members
    assert committee(CHAIN, 400) != committee(CHAIN, 401)
    address = validator_address(0)
    assert address == address.lower() and address.startswith("0x") and len(address) == 42
    small = ChainParams(slots_per_epoch=8, committee_size=4)
    assert len(committee(small, 3)) == 4


def test_window_entries_per_slot() -> None:
    scenario = SCENARIOS["pruned"]
    last = CHAIN.start_slot + 40
    stats = validators_stats(CHAIN, scenario, last)
    window = 24 * CHAIN.slots_per_epoch
    assert stats["slotWindow"] == window
    assert stats["lastProcessedSlot"] == last
    assert stats["initialSlot"] == initial_slot(CHAIN, scenario) < last - window
    slots = by_slot(stats)
    assert sorted(slots) == list(range(last - window + 1, last + 1))  # every slot of the window
    first_epoch = min(slots) // CHAIN.slots_per_epoch
    assert min(slots) % CHAIN.slots_per_epoch != 0  # the oldest epoch of the window is partial
    assert first_epoch < last // CHAIN.slots_per_epoch
    kinds = Counter()
    for slot, entries in slots.items():
        proposer = [status for _, status in entries if not status.startswith("attestation-")]
        assert len(proposer) == 1
        kinds[proposer[0]] += 1
        if proposer[0] == "checkpoint-missed":
            assert len(entries) == 1
        else:
            assert len(entries) == CHAIN.committee_size
            assert len({address for address, _ in entries}) == CHAIN.committee_size
    assert kinds["checkpoint-mined"] > kinds["checkpoint-missed"] > 0
    entry = next(iter(stats["stats"].values()))
    assert entry["totalSlots"] == len(entry["history"])
    assert set(entry["missedAttestations"]) >= {"currentStreak", "count", "total"}
    assert entry["missedProposals"]["total"] + entry["missedAttestations"]["total"] == entry["totalSlots"]
    statuses = {h["status"] for e in stats["stats"].values() for h in e["history"]}
    assert {"attestation-sent", "attestation-missed", "checkpoint-mined", "checkpoint-missed"} <= statuses


def test_validator_counters_match_history() -> None:
    stats = validators_stats(CHAIN, SCENARIOS["pruned"], CHAIN.start_slot)
    for address, entry in stats["stats"].items():
        history = entry["history"]
        proposals = [h for h in history if not h["status"].startswith("attestation-")]
        missed = [h for h in proposals if h["status"] == "checkpoint-missed"]
        assert entry["missedProposals"]["total"] == len(proposals)
        assert entry["missedProposals"]["count"] == len(missed)
        attested = [h["slot"] for h in history if h["status"] == "attestation-sent"]
        if attested:
            assert entry["lastAttestation"]["slot"] == max(attested)
        assert [h["slot"] for h in history] == sorted(h["slot"] for h in history)
        assert entry["address"] == address


def test_missing_epochs_lack_those_slots() -> None:
    scenario = SCENARIOS["missing-epochs"]
    last = CHAIN.start_slot + 5
    spe = CHAIN.slots_per_epoch
    current = last // spe
    slots = by_slot(validators_stats(CHAIN, scenario, last))
    for back in (8, 9):
        assert not any(s // spe == current - back for s in slots)
    thinned = [s for s in slots if s // spe == current - 4]
    assert len(thinned) == spe - 3
    assert not {(current - 4) * spe + i for i in (3, 11, 20)} & set(slots)
    healthy = by_slot(validators_stats(CHAIN, SCENARIOS["pruned"], last))
    assert len(healthy) - len(slots) == 2 * spe + 3


def test_legacy_shapes() -> None:
    node = SimulatedNode("legacy", CHAIN, clock=task.Clock())
    stats = result(node, "node_getValidatorsStats")
    assert isinstance(stats["lastProcessedSlot"], str) and isinstance(stats["initialSlot"], str)
    statuses = {h["status"] for e in stats["stats"].values() for h in e["history"]}
    assert statuses <= {"block-mined", "block-proposed", "block-missed", "attestation-sent", "attestation-missed"}
    assert "block-mined" in statuses
    assert all(isinstance(h["slot"], str) for e in stats["stats"].values() for h in e["history"])
    tips = result(node, "node_getL2Tips")
    assert set(tips) == {"latest", "proven", "finalized"}
    assert tips["latest"] == {"number": 1000, "hash": block_hash(1000)}
    status, answer = ask(node, call("node_getCheckpointedBlockNumber"))
    assert status == 400 and answer["error"]["code"] == -32601


def test_l2_tips_4x_shape() -> None:
    node = SimulatedNode("pruned", CHAIN, clock=task.Clock())
    tips = result(node, "node_getL2Tips")
    assert tips["proposed"] == {"number": 1000, "hash": block_hash(1000)}
    for name, number in (("checkpointed", 998), ("proven", 990), ("finalized", 980)):
        assert tips[name]["block"] == {"number": number, "hash": block_hash(number)}
        assert set(tips[name]["checkpoint"]) == {"number", "hash"}


def test_sentinel_disabled_shape() -> None:
    node = SimulatedNode("sentinel-disabled", CHAIN, clock=task.Clock())
    assert result(node, "node_getValidatorsStats") == {"stats": {}, "slotWindow": 0}


def test_stats_built_once_per_processed_slot() -> None:
    clock = task.Clock()
    node = SimulatedNode("pruned", CHAIN, clock=clock)
    first = node.handle_body(json.dumps(call("node_getValidatorsStats")).encode())[1]
    assert node.handle_body(json.dumps(call("node_getValidatorsStats")).encode())[1] == first
    last = node.chain_state().last_processed_slot
    assert validators_stats_json(CHAIN, node.scenario, last) is validators_stats_json(CHAIN, node.scenario, last)
    clock.advance(CHAIN.slot_seconds)
    assert json.loads(node.handle_body(json.dumps(call("node_getValidatorsStats")).encode())[1])[
        "result"]["lastProcessedSlot"] == last + 1


def test_blocks_hashes_and_transactions() -> None:
    clock = task.Clock()
    node = SimulatedNode("pruned", CHAIN, clock=clock)
    block = result(node, "node_getBlock", 990)
    assert block["number"] == 990 and block["hash"] == block_hash(990)
    assert 1500 < len(json.dumps(block)) < 4000
    assert block_number_for_hash(block["hash"]) == 990
    assert block_number_for_hash("5") is None
    assert result(node, "node_getBlock", "latest")["number"] == 1000
    assert result(node, "node_getBlock", block_hash(990)) == block
    assert result(node, "node_getBlockByHash", block_hash(990)) == block
    assert result(node, "node_getBlockHeader", 990) == block["header"]
    assert result(node, "node_getBlockHeader")["globalVariables"]["blockNumber"] == 1000
    for missing in ("5", 1001, 0, block_hash(1001)):
        assert ask(node, call("node_getBlock", [missing], 3)) == (200, {"jsonrpc": "2.0", "id": 3})
    assert [b["number"] for b in result(node, "node_getBlocks", 1, 50)] == list(range(1, 51))
    assert [b["number"] for b in result(node, "node_getBlocks", 995, 50)] == list(range(995, 1001))
    assert result(node, "node_getBlocks", 2000, 5) == []
    for bad in ([0, 5], [1, 0], [1, 51], ["1", 5]):
        assert ask(node, call("node_getBlocks", bad))[1]["error"]["code"] == -32701

    h = block["body"]["txEffects"][0]["txHash"]
    assert tx_location(h) == (990, 0)
    assert result(node, "node_getTxReceipt", h)["status"] == "proven"
    effect = result(node, "node_getTxEffect", h)
    assert (effect["l2BlockNumber"], effect["l2BlockHash"], effect["txIndexInBlock"]) == (990, block_hash(990), 0)
    assert effect["data"] == block["body"]["txEffects"][0]
    fresh = tx_hash(1000, 0)
    assert result(node, "node_getTxReceipt", fresh)["status"] == "proposed"
    clock.advance(2 * 25)  # 25 blocks later block 1000 is below the finalized tip
    receipt = result(node, "node_getTxReceipt", fresh)
    assert receipt["status"] == "finalized" and receipt["blockNumber"] == 1000
    unknown = "0x" + "ab" * 32
    assert result(node, "node_getTxReceipt", unknown) == {"txHash": unknown, "status": "dropped"}
    assert ask(node, call("node_getTxEffect", [unknown], 9)) == (200, {"jsonrpc": "2.0", "id": 9})
    assert ask(node, call("node_getTxReceipt", ["0x1234"]))[1]["error"]["code"] == -32701


def test_world_state_and_pruned_storage() -> None:
    pruned = SimulatedNode("pruned", CHAIN, clock=task.Clock())
    archiver = SimulatedNode("archiver", CHAIN, clock=task.Clock())
    sync = result(pruned, "node_getWorldStateSyncStatus")
    assert sync == {"finalizedBlockNumber": 980, "latestBlockNumber": 1000, "latestBlockHash": block_hash(1000),
                    "oldestHistoricBlockNumber": 936, "treesAreSynched": True}
    assert result(archiver, "node_getWorldStateSyncStatus")["oldestHistoricBlockNumber"] == 1
    args = ["0x" + "11" * 32, "0x01"]
    status, answer = ask(pruned, call("node_getPublicStorageAt", [10, *args]))
    assert status == 400 and answer["error"]["code"] == -32702
    assert "World state not available for block 10" in answer["error"]["message"]
    value = result(archiver, "node_getPublicStorageAt", 10, *args)
    assert value.startswith("0x") and len(value) == 66
    same = [result(node, "node_getPublicStorageAt", 990, *args) for node in (pruned, archiver)]
    assert same[0] == same[1]


def test_other_methods_answer() -> None:
    node = SimulatedNode("other-rollup", CHAIN, clock=task.Clock())
    info = result(node, "node_getNodeInfo")
    assert info["rollupVersion"] == 2 and info["l1ChainId"] == 31337
    assert result(node, "node_getBlock", 990)["hash"] != block_hash(990)  # another chain
    assert result(node, "node_isReady") is True
    assert set(result(node, "node_getCurrentMinFees")) == {"feePerDaGas", "feePerL2Gas"}
    assert 0 < len(result(node, "p2p_getPeers")) < 10
    assert result(SimulatedNode("not-ready", CHAIN, clock=task.Clock()), "node_isReady") is False


def test_jsonrpc_errors_and_batches() -> None:
    node = SimulatedNode("pruned", CHAIN, clock=task.Clock())
    raw = node.handle_body
    assert json.loads(raw(b"{nope")[1])["error"]["code"] == -32700
    assert raw(b"{nope")[0] == 400 and json.loads(raw(b"{nope")[1])["id"] is None
    assert ask(node, [])[0] == 400 and ask(node, [])[1]["error"]["code"] == -32600
    status, answer = ask(node, [call("node_isReady", id_=i) for i in range(MAX_BATCH + 1)])
    assert status == 400 and answer["error"]["code"] == -32600 and answer["id"] is None
    assert ask(node, [call("node_isReady", id_=i) for i in range(MAX_BATCH)])[0] == 200
    status, answer = ask(node, call("node_nope", id_=7))
    assert status == 400 and answer == {"jsonrpc": "2.0", "id": 7,
                                        "error": {"code": -32601, "message": "Method not found: node_nope"}}
    status, answer = ask(node, [5, call("node_nope", id_="x"), call("node_getBlock", [None], 2)])
    assert status == 200
    assert answer[0] == {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Invalid Request"}}
    assert answer[1]["id"] == "x" and answer[1]["error"]["code"] == -32601
    assert answer[2]["id"] == 2 and answer[2]["error"]["code"] == -32701
    notification = {"jsonrpc": "2.0", "method": "node_getBlockNumber", "params": []}
    assert ask(node, notification) == (200, {"jsonrpc": "2.0", "result": 1000})
    assert raw(b'{"jsonrpc":"2.0","id":1,"method":"node_getBlockNumber"}') == (
        200, b'{"jsonrpc":"2.0","id":1,"result":1000}')  # compact; missing params are []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.integers(-2**53, 2**53), st.text(max_size=12)), min_size=1, max_size=20))
def test_batch_keeps_order_and_ids(ids: list[int | str]) -> None:
    node = SimulatedNode("pruned", STILL, clock=task.Clock())
    methods = ["node_getBlockNumber", "node_getBlock", "node_nope", "node_isReady"]
    batch = [call(methods[i % 4], [1 + i] if i % 4 == 1 else [], id_) for i, id_ in enumerate(ids)]
    status, answer = ask(node, batch)
    assert status == 200 and len(answer) == len(ids)
    for i, (item, id_) in enumerate(zip(answer, ids)):
        assert item["id"] == id_ and type(item["id"]) is type(id_)
        assert ("error" in item) == (i % 4 == 2)


# ------------------------------------------------------------------------------ over HTTP


async def http(url: str, body: bytes | None = None, method: str = "POST",
               headers: dict[bytes, list[bytes]] | None = None, timeout: float = 5.0) -> tuple[int, Headers, bytes]:
    """One exchange on a fresh connection, undecoded (a bare Agent: treq would gunzip for us)."""
    async def exchange() -> tuple[int, Headers, bytes]:
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        producer = None if body is None else FileBodyProducer(BytesIO(body))
        response = await agent.request(method.encode(), url.encode(),
                                       Headers(JSON_CT if headers is None else headers), producer)
        return response.code, response.headers, await readBody(response)

    return await defer.ensureDeferred(exchange()).addTimeout(timeout, reactor)


def header(headers: Headers, name: str) -> str | None:
    values = headers.getRawHeaders(name.encode())
    return values[0].decode() if values else None


@pytest_twisted.async_yield_fixture
async def serve():
    """``serve(scenario) -> (node, url)``: a node listening on loopback, stopped after the test."""
    ports = []

    def start(scenario: str = "pruned", chain: ChainParams = STILL) -> tuple[SimulatedNode, str]:
        node = SimulatedNode(scenario, chain)
        port = reactor.listenTCP(0, simulated_site(node), interface="127.0.0.1")
        ports.append(port)
        return node, f"http://127.0.0.1:{port.getHost().port}/"

    yield start
    for port in ports:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_http_single_batch_headers_and_counters(serve) -> None:
    node, url = serve()
    code, headers, body = await http(url, json.dumps(call("node_getBlockNumber", id_=0)).encode())
    assert (code, json.loads(body)) == (200, {"jsonrpc": "2.0", "id": 0, "result": 1000})
    for name in AZTEC_HEADERS:
        assert header(headers, name), name
    assert header(headers, "x-aztec-rollupVersion") == "1"
    assert header(headers, "access-control-allow-origin") == "*"
    assert header(headers, "content-type") == "application/json"

    batch = [call("node_getBlock", [999_999], 5), call("node_getBlockNumber", id_="5"),
             call("node_nope", id_=-1), call("node_getBlockNumber", id_="abc")]
    code, _, body = await http(url, json.dumps(batch).encode(),
                               headers={b"content-type": [b"application/json; charset=utf-8"]})
    assert code == 200
    answer = json.loads(body)
    assert [a["id"] for a in answer] == [5, "5", -1, "abc"]
    assert answer[0] == {"jsonrpc": "2.0", "id": 5}  # not found: no "result" key
    assert b'{"jsonrpc":"2.0","id":5}' in body
    assert answer[1]["result"] == 1000 and answer[2]["error"]["code"] == -32601
    assert node.requests == 2
    assert node.calls == Counter({"node_getBlockNumber": 3, "node_getBlock": 1, "node_nope": 1})


@pytest_twisted.ensureDeferred
async def test_http_errors_and_statuses(serve) -> None:
    node, url = serve()
    code, _, body = await http(url, b"{not json")
    assert code == 400 and json.loads(body)["error"]["code"] == -32700 and json.loads(body)["id"] is None
    code, _, body = await http(url, b"[]")
    assert code == 400 and json.loads(body)["error"]["code"] == -32600
    code, _, body = await http(url, json.dumps([call("node_isReady", id_=i) for i in range(101)]).encode())
    assert code == 400 and isinstance(json.loads(body), dict) and json.loads(body)["error"]["code"] == -32600
    code, _, body = await http(url, json.dumps(call("node_nope")).encode())
    assert code == 400 and json.loads(body)["error"]["message"] == "Method not found: node_nope"
    code, _, body = await http(url, json.dumps(call("node_getTxReceipt", ["xyz"])).encode())
    assert code == 400 and json.loads(body)["error"]["code"] == -32701
    code, _, body = await http(url, json.dumps([call("node_getTxReceipt", ["xyz"])]).encode())
    assert code == 200 and json.loads(body)[0]["error"]["code"] == -32701
    code, headers, _ = await http(url, b"{}", headers={b"content-type": [b"text/plain"]})
    assert code == 400 and header(headers, "x-aztec-l1ChainId") == "31337"
    assert (await http(url, b"{}", headers={}))[0] == 400
    assert (await http(url, b"[" + b" " * MAX_BODY + b"]"))[0] == 413
    code, _, body = await http(url + "status", method="GET", headers={})
    assert (code, body) == (200, b"OK")
    assert (await http(url + "nope", json.dumps(call("node_isReady")).encode()))[0] == 404
    assert (await http(url, method="GET", headers={}))[0] == 405
    node.scenario = SCENARIOS["not-ready"]
    assert (await http(url + "status", method="GET", headers={}))[0] == 500
    code, _, body = await http(url, json.dumps(call("node_isReady")).encode())
    assert (code, json.loads(body)["result"]) == (200, False)


@pytest_twisted.ensureDeferred
async def test_http_gzip_both_ways(serve) -> None:
    node, url = serve()
    stats_call = json.dumps([call("node_getValidatorsStats", id_=0)]).encode()
    code, headers, plain = await http(url, stats_call)
    assert code == 200 and header(headers, "content-encoding") is None and len(plain) > 1_000_000
    gz_headers = {**JSON_CT, b"accept-encoding": [b"gzip, deflate"]}
    code, headers, packed = await http(url, stats_call, headers=gz_headers)
    assert header(headers, "content-encoding") == "gzip" and header(headers, "vary") == "Accept-Encoding"
    assert len(packed) < len(plain) // 5 and gzip.decompress(packed) == plain
    code, headers, small = await http(url, json.dumps(call("node_getBlockNumber")).encode(), headers=gz_headers)
    assert header(headers, "content-encoding") is None and json.loads(small)["result"] == 1000

    zipped = gzip.compress(json.dumps([call("node_getBlockNumber", id_=3)]).encode())
    code, _, body = await http(url, zipped, headers={**JSON_CT, b"content-encoding": [b"gzip"]})
    assert (code, json.loads(body)) == (200, [{"jsonrpc": "2.0", "id": 3, "result": 1000}])
    bomb = gzip.compress(b" " * (MAX_BODY + 1))
    assert (await http(url, bomb, headers={**JSON_CT, b"content-encoding": [b"gzip"]}))[0] == 413
    assert (await http(url, b"not gzip", headers={**JSON_CT, b"content-encoding": [b"gzip"]}))[0] == 400


@pytest_twisted.ensureDeferred
async def test_http_failure_scenarios(serve) -> None:
    node, url = serve("failing-500")
    body = json.dumps([call("node_getBlockNumber")]).encode()
    code, _, text = await http(url, body)
    assert code == 500 and text and not text.startswith(b"{")

    node.scenario = SCENARIOS["failing-garbage"]
    code, _, text = await http(url, body)
    assert code == 200
    with pytest.raises(ValueError):
        json.loads(text)

    node.scenario = "failing-reset"
    with pytest.raises(Exception) as failed:
        await http(url, body)
    assert "Response" in type(failed.value).__name__ or "Connection" in type(failed.value).__name__

    node.scenario = "pruned"
    assert (await http(url, body))[0] == 200
    assert node.requests == 4 and node.calls["node_getBlockNumber"] == 1  # failures never parse


@pytest_twisted.ensureDeferred
async def test_http_hang_is_released_when_the_client_gives_up(serve) -> None:
    node, url = serve("hang")
    started = reactor.seconds()
    with pytest.raises((defer.TimeoutError, ResponseNeverReceived)):
        await http(url, json.dumps(call("node_isReady")).encode(), timeout=0.5)
    assert reactor.seconds() - started < 3
    for _ in range(200):  # the server notices the closed connection within a few reactor turns
        if node.in_flight == 0:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    assert node.in_flight == 0


@pytest_twisted.ensureDeferred
async def test_http_slow_and_other_rollup(serve) -> None:
    slow, slow_url = serve("slow")
    started = reactor.seconds()
    code, _, body = await http(slow_url, json.dumps(call("node_getBlockNumber")).encode())
    assert reactor.seconds() - started >= 0.2 and json.loads(body)["result"] == 1000
    assert slow.in_flight == 0

    _, url = serve("other-rollup")
    code, headers, body = await http(url, json.dumps(call("node_getNodeInfo")).encode())
    assert header(headers, "x-aztec-rollupVersion") == "2" and json.loads(body)["result"]["rollupVersion"] == 2


# ------------------------------------------------------------------------------ twistd plugin


def test_make_service_builds_the_node() -> None:
    options = simnode_tap.Options()
    options.parseOptions(["--scenario", "lagging", "--listen", "tcp:0:interface=127.0.0.1",
                          "--slots-per-epoch", "8", "--committee", "4", "--block-seconds", "6"])
    service = simnode_tap.makeService(options, reactor=task.Clock())
    assert isinstance(service, StreamServerEndpointService)
    node = service.factory.resource
    assert node.scenario is SCENARIOS["lagging"]
    assert (node.chain.slots_per_epoch, node.chain.committee_size, node.chain.block_seconds) == (8, 4, 6.0)
    with pytest.raises(SystemExit, match="unknown scenario 'x' \\(choose from: archiver, pruned"):
        simnode_tap.Options().parseOptions(["--scenario", "x"])
