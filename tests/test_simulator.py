"""The simulated Aztec node: the pure chain model (driven by ``task.Clock``) and its wire protocol,
in both dialects (4.x ``node_*``, 5.x ``aztec_*``), in memory and over real loopback HTTP.  Nothing here
sleeps; every wait is bounded by a timeout.
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
    archive_root,
    block_hash,
    block_number_for_hash,
    chain_state,
    committee,
    initial_slot,
    public_log_tag,
    pruned_error_4,
    pruned_error_5,
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
    # The 4.x node's own wording (native world state, see docs/aztec-protocol.md), not a made-up one.
    assert answer["error"]["message"] == "Unable to find low leaf for block 10, failed to get block data."
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
    methods = ["node_getBlockNumber", "node_getBlock", "node_nope", "node_isReady"]  # node_* is an alias in 5
    batch = [call(methods[i % 4], [1 + i] if i % 4 == 1 else [], id_) for i, id_ in enumerate(ids)]
    for dialect in ("4", "5"):
        node = SimulatedNode("pruned", STILL, clock=task.Clock(), dialect=dialect)
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

    def start(scenario: str = "pruned", chain: ChainParams = STILL, **options: Any) -> tuple[SimulatedNode, str]:
        node = SimulatedNode(scenario, chain, **options)
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


# ------------------------------------------------------------------------------ dialect 5 (Aztec 5.x)

STORAGE = ["0x" + "11" * 32, "0x01"]


def node5(scenario: str = "pruned", **options: Any) -> SimulatedNode:
    return SimulatedNode(scenario, CHAIN, clock=task.Clock(), dialect="5", **options)


def error_code(node: SimulatedNode, method: str, *params: Any) -> int:
    status, answer = ask(node, call(method, list(params)))
    assert status == 400, answer
    return answer["error"]["code"]


def test_dialect_5_names_aliases_and_removed_methods() -> None:
    four, five = SimulatedNode("pruned", CHAIN, clock=task.Clock()), node5()
    for method, params in (("getBlockNumber", []), ("getChainTips", []), ("getBlock", [990]),
                           ("getNodeInfo", []), ("getWorldStateSyncStatus", []), ("isReady", [])):
        assert result(five, f"aztec_{method}", *params) == result(five, f"node_{method}", *params)
    assert result(five, "aztec_getChainTips") == result(four, "node_getL2Tips")  # same 4.x shape, new name
    for gone in ("getL2Tips", "getProvenBlockNumber", "getCheckpointedBlockNumber", "getBlockByHash",
                 "getBlockHeader", "getPublicLogs"):
        for namespace in ("aztec", "node"):
            status, answer = ask(five, call(f"{namespace}_{gone}"))
            assert (status, answer["error"]) == (
                400, {"code": -32601, "message": f"Method not found: {namespace}_{gone}"})
    for new in ("aztec_getBlockNumber", "node_getChainTips", "node_getBlockData", "node_getCheckpointNumber"):
        assert error_code(four, new) == -32601  # 4.x knows none of these
    for node in (four, five):
        assert 0 < len(result(node, "p2p_getPeers")) < 10
        assert error_code(node, "nodeAdmin_getConfig") == error_code(node, "aztecAdmin_getConfig") == -32601
    assert five.calls["aztec_getBlockNumber"] == five.calls["node_getBlockNumber"] == 1
    info = result(five, "aztec_getNodeInfo")
    assert info["nodeVersion"] == "5.2.0" and result(four, "node_getNodeInfo")["nodeVersion"] == "4.1.2"


def test_dialect_5_not_found_is_result_null() -> None:
    four, five = SimulatedNode("pruned", CHAIN, clock=task.Clock()), node5()
    unknown_tx = "0x" + "ab" * 32
    for node, method, params in ((five, "aztec_getBlock", [1001]), (five, "node_getBlock", ["5"]),
                                 (five, "aztec_getBlockData", [block_hash(1001)]),
                                 (five, "aztec_getTxEffect", [unknown_tx]), (five, "aztec_getCheckpoint", [10**6])):
        assert node.handle_body(json.dumps(call(method, params, 3)).encode()) == (
            200, b'{"jsonrpc":"2.0","id":3,"result":null}'), method
    assert four.handle_body(json.dumps(call("node_getBlock", [1001], 3)).encode()) == (200, b'{"jsonrpc":"2.0","id":3}')
    batch = [call("aztec_getBlock", [1001], 1), call("aztec_getBlockNumber", [], 2)]
    status, body = five.handle_body(json.dumps(batch).encode())
    assert status == 200 and json.loads(body) == [{"jsonrpc": "2.0", "id": 1, "result": None},
                                                 {"jsonrpc": "2.0", "id": 2, "result": 1000}]


@pytest.mark.parametrize("param, expected", [
    (990, 990), (990.0, 990), ("latest", 1000), ("proposed", 1000), ("checkpointed", 998), ("proven", 990),
    ("finalized", 980), (block_hash(990), 990), (block_hash(990).upper().replace("0X", "0x"), 990),
    ("5", None),  # a decimal string is a hash (the field element 5), as in 4.x, never block 5
    ("0x5", None), (1001, None), (0, None),
    ({"number": 990}, 990), ({"number": "990"}, 990), ({"hash": block_hash(990)}, 990),
    ({"archive": archive_root(990)}, 990), ({"tag": "proven"}, 990), ({"tag": "finalized", "extra": 1}, 980),
    ({"number": 990, "hash": block_hash(990)}, 990), ({"number": 991, "hash": block_hash(990)}, None),
    ({"archive": archive_root(5000)}, None),
])
def test_dialect_5_block_parameter_forms(param: Any, expected: int | None) -> None:
    block = result(node5(), "aztec_getBlock", param)
    assert (None if block is None else block["number"]) == expected


@pytest.mark.parametrize("param, code", [
    (-1, -32701), (1.5, -32701), (True, -32701), (None, -32701), ([990], -32701), ("pending", -32701),
    ({"tag": "latest"}, -32701), ({"number": 1, "tag": "proven"}, -32701), ({}, -32701), ({"number": -1}, -32701),
    ("abc", -32702), ("0x", -32702), ("0x" + "f" * 65, -32702),  # hex-looking but no field element: thrown
])
def test_dialect_5_bad_block_parameters(param: Any, code: int) -> None:
    assert error_code(node5(), "aztec_getBlock", param) == code


def test_dialect_5_block_numbers_by_tag() -> None:
    clock = task.Clock()
    node = SimulatedNode("pruned", CHAIN, clock=clock, dialect="5")
    clock.advance(2 * 5)
    assert [result(node, "aztec_getBlockNumber", *tag) for tag in ([], [None], ["proposed"], ["checkpointed"],
                                                                 ["proven"], ["finalized"])] == [
        1005, 1005, 1005, 1003, 995, 985]
    assert error_code(node, "aztec_getBlockNumber", "latest") == -32701  # BlockTagWithoutLatestSchema
    assert error_code(node, "aztec_getBlockNumber", 7) == -32701
    assert [result(node, "aztec_getCheckpointNumber", *tag) for tag in ([], ["checkpointed"], ["proven"],
                                                                      ["finalized"])] == [251, 251, 249, 247]
    assert error_code(node, "aztec_getCheckpointNumber", "proposed") == -32701


def test_dialect_5_block_shapes() -> None:
    four, five = SimulatedNode("pruned", CHAIN, clock=task.Clock()), node5()
    full = result(four, "node_getBlock", 990)
    bare = result(five, "aztec_getBlock", 990)
    assert "body" not in bare and bare == {k: v for k, v in full.items() if k != "body"}
    assert result(five, "aztec_getBlock", 990, {"includeTransactions": True}) == full
    rich = result(five, "aztec_getBlock", 990, {"includeL1PublishInfo": True, "includeAttestations": True})
    assert set(rich["l1"]) == {"blockNumber", "timestamp", "blockHash"} and "body" not in rich
    assert {"address", "signature"} == set(rich["attestations"][0])
    assert error_code(five, "aztec_getBlock", 990, {"includeTransactions": "yes"}) == -32701
    finalized = result(four, "node_getBlock", 980)
    assert result(five, "aztec_getBlockData", "finalized") == {
        "header": finalized["header"], "archive": finalized["archive"], "blockHash": block_hash(980),
        "checkpointNumber": 245, "indexWithinCheckpoint": 3}
    assert [b["number"] for b in result(five, "aztec_getBlocks", "998", 5)] == [998, 999, 1000]  # "998" is fine here
    assert all("body" not in b for b in result(five, "aztec_getBlocks", 1, 3))
    assert [len(b["body"]["txEffects"]) for b in result(five, "aztec_getBlocks", 1, 3, {"includeTransactions": True})] \
        == [2, 3, 1]
    for bad in ([0, 5], [1, 0], [1, 51], ["x", 5]):
        assert error_code(five, "aztec_getBlocks", *bad) == -32701
    receipt = result(five, "aztec_getTxReceipt", tx_hash(990, 0), {"includeTxEffect": True})
    assert receipt["status"] == "proven" and receipt["txEffect"] == full["body"]["txEffects"][0]
    assert "txEffect" not in result(five, "aztec_getTxReceipt", tx_hash(990, 0))


def test_dialect_5_checkpoints_and_logs() -> None:
    node = node5()
    latest = result(node, "aztec_getCheckpoint", "checkpointed")
    assert latest["number"] == 250 and latest["startBlock"] == 997 and latest["blockCount"] == 4
    assert result(node, "aztec_getCheckpoint", {"number": "240"})["startBlock"] == 957
    assert result(node, "aztec_getCheckpoint", 240) == result(node, "aztec_getCheckpoint", {"number": 240})
    assert result(node, "aztec_getCheckpoint", {"slot": CHAIN.start_slot})["number"] == 250
    with_blocks = result(node, "aztec_getCheckpoint", 240, {"includeBlocks": True})
    assert [b["number"] for b in with_blocks["blocks"]] == [957, 958, 959, 960]
    assert result(node, "aztec_getCheckpoint", 251) is None  # not checkpointed yet
    assert error_code(node, "aztec_getCheckpoint", "proposed") == -32701
    assert [c["number"] for c in result(node, "aztec_getCheckpoints", 248, 5)] == [248, 249, 250]
    data = result(node, "aztec_getCheckpointsData", {"from": 240, "limit": 3})
    assert [c["checkpointNumber"] for c in data] == [240, 241, 242]
    assert {"header", "archive", "checkpointOutHash", "startBlock", "blockCount", "attestations", "l1"} <= set(data[0])
    epoch = result(node, "aztec_getCheckpointsData", {"epoch": CHAIN.start_slot // CHAIN.slots_per_epoch})
    assert epoch[-1]["checkpointNumber"] == 250 and len(epoch) > 50
    reverse = result(node, "aztec_getCheckpointsData", {"fromSlot": CHAIN.start_slot, "limit": 2, "reverse": True})
    assert [c["checkpointNumber"] for c in reverse] == [250, 249]
    for bad in ({"from": 1}, {"epoch": 1, "limit": 2}, "x"):
        assert error_code(node, "aztec_getCheckpointsData", bad) == -32701
    query = {"contractAddress": "0x" + "22" * 32, "tags": [public_log_tag(990), {"tag": public_log_tag(995)},
                                                          "0x" + "33" * 32, public_log_tag(2000)]}
    logs = result(node, "aztec_getPublicLogsByTags", query)
    assert [len(hits) for hits in logs] == [1, 1, 0, 0]
    assert logs[0][0]["blockNumber"] == 990 and logs[0][0]["txHash"] == tx_hash(990, 0)
    assert "noteHashes" in result(node, "aztec_getPublicLogsByTags", {**query, "includeEffects": True})[0][0]
    assert result(node, "aztec_getPublicLogsByTags", {**query, "fromBlock": 991}) == [[], logs[1], [], []]
    assert error_code(node, "aztec_getPublicLogsByTags", {"tags": []}) == -32701


def test_pruned_state_errors_in_both_dialects() -> None:
    """Below the oldest historic block (936 here) both dialects fail with -32702 and their node's wording."""
    four, five = SimulatedNode("pruned", CHAIN, clock=task.Clock()), node5()
    assert result(five, "aztec_getWorldStateSyncStatus")["oldestHistoricBlockNumber"] == 936
    expected = {four: "Unable to find low leaf for block 935, failed to get block data.",
                five: "Unable to find leaf for block 935 in the archive tree: world state history has been "
                      "pruned to block 936"}
    assert (pruned_error_4(935), pruned_error_5(935, 936)) == (expected[four], expected[five])
    for node, method in ((four, "node_getPublicStorageAt"), (five, "aztec_getPublicStorageAt"),
                         (five, "node_getPublicStorageAt")):
        status, answer = ask(node, call(method, [935, *STORAGE]))
        assert status == 400 and answer["error"] == {"code": -32702, "message": expected[node]}
        assert result(node, method, 936, *STORAGE).startswith("0x")  # the oldest historic block itself is there
    for param in ({"number": 935}, {"hash": block_hash(935)}, {"archive": archive_root(935)}, block_hash(935)):
        assert ask(five, call("aztec_getPublicStorageAt", [param, *STORAGE]))[1]["error"]["message"] == expected[five]
    for param in ("latest", "proposed", {"tag": "proposed"}, "finalized", 936):
        assert result(five, "aztec_getPublicStorageAt", param, *STORAGE).startswith("0x")
    archiver = SimulatedNode("archiver", CHAIN, clock=task.Clock(), dialect="5")
    assert result(archiver, "aztec_getPublicStorageAt", 10, *STORAGE).startswith("0x")  # an archiver keeps it all
    reorg = "If the node API has been queried with anchor block hash possibly a reorg has occurred."
    five_hash = "0x" + "0" * 63 + "5"  # "5" is read as the field element 5
    for node, method, param, message in (
            (four, "node_getPublicStorageAt", 1001,
             "Queried block 1001 not yet synced by the node (node is synced upto 1000)."),
            (four, "node_getPublicStorageAt", "5",
             f"Block hash {five_hash} not found when querying world state. {reorg}"),
            (five, "aztec_getPublicStorageAt", 1001, "Block not found for number=1001 when resolving query."),
            (five, "aztec_getPublicStorageAt", "5", f"Block hash {five_hash} not found when resolving query. {reorg}"),
            (five, "aztec_getPublicStorageAt", {"archive": "0x" + "44" * 32},
             "Block with archive 0x" + "44" * 32 + " not found when resolving query.")):
        status, answer = ask(node, call(method, [param, *STORAGE]))
        assert (status, answer["error"]) == (400, {"code": -32702, "message": message})


@pytest.mark.parametrize("dialect, code, batch_message",
                         [("4", -32600, "Invalid Request"), ("5", -32603, "Internal error")])
def test_uncaught_server_errors(dialect: str, code: int, batch_message: str) -> None:
    node = SimulatedNode("pruned", CHAIN, clock=task.Clock(), dialect=dialect)

    def boom(params: list[Any], state: Any) -> bytes:
        raise RuntimeError("boom")

    node.handlers["node_getBlock"] = boom
    status, answer = ask(node, call("node_getBlock", [1], 4))
    assert (status, answer) == (500, {"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": "boom"}})
    status, answer = ask(node, [call("node_getBlockNumber", [], 1), call("node_getBlock", [1], 2)])
    assert status == 200 and answer[0]["result"] == 1000
    assert answer[1] == {"jsonrpc": "2.0", "error": {"code": code, "message": batch_message}, "id": None}


def test_dialect_5_validator_statuses() -> None:
    last = CHAIN.start_slot + 40
    four = by_slot(validators_stats(CHAIN, SCENARIOS["pruned"], last))
    five = by_slot(validators_stats(CHAIN, SCENARIOS["pruned"], last, "5"))
    rename = {"checkpoint-proposed": "checkpoint-valid"}
    assert five == {slot: [(a, rename.get(s, s)) for a, s in entries] for slot, entries in four.items()}
    statuses = {s for entries in five.values() for _, s in entries}
    assert "checkpoint-proposed" not in statuses and {"checkpoint-valid", "checkpoint-mined"} <= statuses
    stats = result(node5(), "aztec_getValidatorsStats")
    assert not any(h["status"] == "checkpoint-proposed" for e in stats["stats"].values() for h in e["history"])


@pytest.mark.parametrize("dialect", ["4", "5"])
def test_reordered_batches_keep_ids(dialect: str) -> None:
    batch = [call("node_getBlock", [900 + i], f"id-{i}") for i in range(12)]
    expected = {f"id-{i}": 900 + i for i in range(12)}
    for order in ("reverse", "shuffle"):
        node = SimulatedNode("pruned", CHAIN, clock=task.Clock(), dialect=dialect, reorder_batches=order)
        status, answer = ask(node, batch)
        assert status == 200 and {a["id"]: a["result"]["number"] for a in answer} == expected
        ids = [a["id"] for a in answer]
        assert ids != [b["id"] for b in batch]
        if order == "reverse":
            assert ids == [b["id"] for b in reversed(batch)]
    node = SimulatedNode("pruned", CHAIN, clock=task.Clock(), dialect=dialect)
    node.reorder_batches = "shuffle"
    assert [a["id"] for a in ask(node, batch[:2])[1]] == ["id-1", "id-0"]  # never a shuffle that changes nothing
    node.reorder_batches = None
    assert [a["id"] for a in ask(node, batch)[1]] == [b["id"] for b in batch]
    with pytest.raises(ValueError, match="reorder_batches"):
        SimulatedNode("pruned", CHAIN, clock=task.Clock(), reorder_batches="sideways")


def test_dialect_is_checked() -> None:
    with pytest.raises(ValueError, match="dialect must be one of 4, 5"):
        SimulatedNode("pruned", CHAIN, clock=task.Clock(), dialect="6")
    with pytest.raises(ValueError, match="needs dialect 4"):
        node5("legacy")
    node = node5()
    with pytest.raises(ValueError, match="needs dialect 4"):
        node.scenario = "legacy"
    assert node.scenario is SCENARIOS["pruned"]


@pytest_twisted.ensureDeferred
async def test_http_dialect_5(serve) -> None:
    node, url = serve(dialect="5")
    code, headers, body = await http(url, json.dumps(call("aztec_getBlock", [999_999], 5)).encode())
    assert (code, body) == (200, b'{"jsonrpc":"2.0","id":5,"result":null}')
    for name in AZTEC_HEADERS:
        assert header(headers, name), name
    assert header(headers, "x-aztec-packageVersion") == "5.2.0"
    code, headers, body = await http(url + "status", method="GET", headers={})
    assert (code, header(headers, "content-type"), json.loads(body)) == (
        200, "application/json", {"ok": True, "components": {"aztec": {"healthy": True}, "node": {"healthy": True}}})
    gz_headers = {**JSON_CT, b"accept-encoding": [b"gzip"]}
    code, headers, packed = await http(url, json.dumps([call("aztec_getValidatorsStats", id_=0)]).encode(),
                                       headers=gz_headers)
    assert header(headers, "content-encoding") == "gzip" and json.loads(gzip.decompress(packed))[0]["id"] == 0
    code, _, body = await http(url, json.dumps(call("node_getL2Tips")).encode())
    assert code == 400 and json.loads(body)["error"]["code"] == -32601
    node.scenario = "not-ready"
    code, _, body = await http(url + "status", method="GET", headers={})
    assert (code, json.loads(body)["ok"]) == (500, False)
    _, url4 = serve()
    code, headers, body = await http(url4 + "status", method="GET", headers={})
    assert (code, body) == (200, b"OK") and header(headers, "x-aztec-packageVersion") == "4.1.2"


@pytest_twisted.ensureDeferred
async def test_http_reordered_batch(serve) -> None:
    node, url = serve(dialect="5", reorder_batches="reverse")
    batch = [call("aztec_getBlockNumber", id_=0), call("aztec_getBlock", [990], 1), call("aztec_nope", id_=2)]
    code, _, body = await http(url, json.dumps(batch).encode())
    answer = json.loads(body)
    assert code == 200 and [a["id"] for a in answer] == [2, 1, 0]
    assert answer[0]["error"]["code"] == -32601 and answer[1]["result"]["number"] == 990 and answer[2]["result"] == 1000


def test_make_service_dialect_options() -> None:
    options = simnode_tap.Options()
    options.parseOptions(["--dialect", "5", "--reorder-batches", "shuffle", "--listen", "tcp:0:interface=127.0.0.1"])
    node = simnode_tap.makeService(options, reactor=task.Clock()).factory.resource
    assert (node.dialect, node.reorder_batches) == ("5", "shuffle")
    default = simnode_tap.Options()
    default.parseOptions([])
    node = simnode_tap.makeService(default, reactor=task.Clock()).factory.resource
    assert (node.dialect, node.reorder_batches) == ("4", None)
    with pytest.raises(SystemExit, match=r"^sentinel-simnode: unknown dialect '6' \(choose from: 4, 5\)$"):
        simnode_tap.Options().parseOptions(["--dialect", "6"])
    with pytest.raises(SystemExit, match="unknown batch order 'x'"):
        simnode_tap.Options().parseOptions(["--reorder-batches", "x"])
    with pytest.raises(SystemExit, match="scenario 'legacy' has 2.x/3.x shapes: use --dialect 4"):
        simnode_tap.Options().parseOptions(["--scenario", "legacy", "--dialect", "5"])
