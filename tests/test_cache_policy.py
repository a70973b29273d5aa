"""The cache policy table: method classes, finality, majority tip, keys, answer-dependent rules."""
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel_proxy.core.methods import TABLE
from sentinel_proxy.core.cache_policy import (DEFAULT_VOLATILE_TTL, FOREVER, IMMUTABLE, NEVER, RULES, VOLATILE, Rule,
                                         cache_key, decide, finalized_tip, storable)

FINALIZED = 880
HASH = "0x" + "ab" * 32
ADDRESS = "0x" + "01" * 32
SLOT = "0x" + "00" * 31 + "07"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "caching.md"


def v4_tips(finalized, proposed=None):
    proposed = finalized + 40 if proposed is None else proposed
    ref = lambda n: {"number": n, "hash": "0x" + f"{n:064x}"}  # noqa: E731
    checkpoint = lambda n: {"block": ref(n), "checkpoint": {"number": n // 4, "hash": HASH}}  # noqa: E731
    return {"proposed": ref(proposed), "checkpointed": checkpoint(proposed - 2), "proven": checkpoint(finalized + 5),
            "finalized": checkpoint(finalized)}


def v2_tips(finalized):
    ref = lambda n: {"number": n, "hash": "0x" + f"{n:064x}"}  # noqa: E731
    return {"latest": ref(finalized + 40), "proven": ref(finalized + 5), "finalized": ref(finalized)}


def block(number):
    return {"number": number, "hash": HASH, "header": {"globalVariables": {"blockNumber": number}}, "body": {}}


def header(number):
    return {"lastArchive": {}, "globalVariables": {"blockNumber": number, "slotNumber": 3}}


def outcome(method, params, result=None, present=True, finalized=FINALIZED, error=False, ttl=DEFAULT_VOLATILE_TTL):
    """(decided kind, stored ttl) for one call and its answer."""
    decision = decide(method, params, finalized, ttl)
    return decision.kind, storable(decision, method, params, present, result, finalized, error=error)


# -- the finalized tip


@pytest.mark.parametrize("shape", [v4_tips, v2_tips])
def test_finalized_tip_of_agreeing_nodes(shape):
    assert finalized_tip([shape(880), shape(880), shape(880)]) == 880


@pytest.mark.parametrize("shape", [v4_tips, v2_tips])
def test_one_node_claiming_more_does_not_move_the_tip(shape):
    assert finalized_tip([shape(880), shape(880), shape(5000)]) == 880
    assert finalized_tip([shape(880), shape(5000)]) == 880


def test_two_of_three_agreeing_move_the_tip():
    assert finalized_tip([v4_tips(880), v4_tips(900), v4_tips(900)]) == 900
    # The highest height more than half have reached, though no two report the same number.
    assert finalized_tip([v4_tips(880), v4_tips(890), v4_tips(900)]) == 890


def test_mixed_shapes_and_garbage():
    assert finalized_tip([v4_tips(900), v2_tips(900), "garbage"]) == 900
    # Garbage counts as a node that vouches for nothing: one readable node of three is no majority.
    assert finalized_tip([v4_tips(900), None, {"finalized": {"block": {"number": "x"}}}]) is None
    assert finalized_tip([v4_tips(900), {}, {"finalized": []}, {"finalized": {"number": -1}}, 7]) is None
    assert finalized_tip([{"finalized": {"number": True}}, {"finalized": {"block": None}}]) is None


def test_no_majority_or_no_nodes():
    assert finalized_tip([]) is None
    assert finalized_tip([v4_tips(900), "garbage"]) is None  # 1 of 2 is not more than half


def test_a_single_node_is_its_own_majority():
    assert finalized_tip([v4_tips(900)]) == 900
    assert finalized_tip(iter([v2_tips(12)])) == 12


def test_legacy_decimal_string_heights():
    assert finalized_tip([{"finalized": {"number": "77", "hash": HASH}}]) == 77


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 10_000), st.none()), min_size=1, max_size=9))
def test_majority_tip_invariant(heights):
    reports = [v4_tips(h) if h is not None else "garbage" for h in heights]
    tip = finalized_tip(reports)
    at_least = lambda n: sum(1 for h in heights if h is not None and h >= n)  # noqa: E731
    if tip is None:
        assert all(at_least(h) * 2 <= len(heights) for h in heights if h is not None)
    else:
        assert at_least(tip) * 2 > len(heights)
        assert at_least(tip + 1) * 2 <= len(heights)


# -- method classes


NEVER_CASES = [
    ("node_isReady", []),
    ("node_getValidatorsStats", []),
    ("node_getWorldStateSyncStatus", []),
    ("node_getPendingTxs", [10]),
    ("node_getPendingTxCount", []),
    ("node_getNodeVersion", []),
    ("node_sendTx", [{"data": "AAAA"}]),
    ("node_simulatePublicCalls", [{"data": "AAAA"}, False]),
    ("node_isValidTx", [{"data": "AAAA"}, {"isSimulation": True}]),
    ("p2p_getPeers", []),
    ("p2p_getSomethingNew", []),
    ("node_methodFromTheFuture", [1]),
    ("nodeAdmin_getConfig", []),
]


@pytest.mark.parametrize("method, params", NEVER_CASES)
def test_never_cached(method, params):
    decision = decide(method, params, FINALIZED)
    assert decision.kind == NEVER and decision.key == b""
    assert storable(decision, method, params, True, 1, FINALIZED) is None


VOLATILE_CASES = [
    ("node_getBlockNumber", [], 1000),
    ("node_getProvenBlockNumber", [], 990),
    ("node_getCheckpointedBlockNumber", [], 998),
    ("node_getL2Tips", [], v4_tips(880)),
    ("node_getCurrentMinFees", [], {"feePerDaGas": "0", "feePerL2Gas": "12000000"}),
    ("node_getCurrentBaseFees", [], {"feePerDaGas": "0", "feePerL2Gas": "12000000"}),
    ("node_getNodeInfo", [], {"nodeVersion": "4.1.2", "l1ChainId": 1}),
    ("node_getContract", [ADDRESS], {"address": ADDRESS}),
    ("node_getBlock", ["latest"], block(1000)),
    ("node_getBlockHeader", [], header(1000)),
    ("node_getBlockHeader", [None], header(1000)),
    ("node_getPublicStorageAt", ["latest", ADDRESS, SLOT], SLOT),
    ("node_getNullifierMembershipWitness", ["latest", SLOT], {"index": "3"}),
]


@pytest.mark.parametrize("method, params, result", VOLATILE_CASES)
def test_volatile(method, params, result):
    assert outcome(method, params, result) == (VOLATILE, DEFAULT_VOLATILE_TTL)
    assert outcome(method, params, result, ttl=0.25) == (VOLATILE, 0.25)


def test_latest_is_volatile_even_when_the_tip_is_final():
    # "latest" names a moving block: its answer is never kept forever, whatever its number.
    assert outcome("node_getBlock", ["latest"], block(FINALIZED), finalized=FINALIZED)[1] == DEFAULT_VOLATILE_TTL


def test_volatile_ttl_zero_stores_nothing():
    assert outcome("node_getBlockNumber", [], 1000, ttl=0.0) == (VOLATILE, None)


IMMUTABLE_CASES = [
    ("node_getBlock", [FINALIZED], block(FINALIZED)),
    ("node_getBlock", [1], block(1)),
    ("node_getBlockHeader", [FINALIZED], header(FINALIZED)),
    ("node_getPublicStorageAt", [FINALIZED, ADDRESS, SLOT], SLOT),
    ("node_getNullifierMembershipWitness", [FINALIZED, SLOT], {"index": "3"}),
    ("node_getLowNullifierMembershipWitness", [100, SLOT], {"index": "3"}),
    ("node_getPublicDataWitness", [100, SLOT], {"index": "3"}),
    ("node_getArchiveMembershipWitness", [100, HASH], {"index": "3"}),
    ("node_getNoteHashMembershipWitness", [100, HASH], {"index": "3"}),
    ("node_getL1ToL2MessageMembershipWitness", [100, HASH], ["1", []]),
    ("node_getBlockHashMembershipWitness", [100, HASH], {"index": "3"}),
    ("node_findLeavesIndexes", [100, 1, [HASH]], [None]),
    ("node_getBlocks", [FINALIZED - 9, 10], [block(n) for n in range(FINALIZED - 9, FINALIZED + 1)]),
]


@pytest.mark.parametrize("method, params, result", IMMUTABLE_CASES)
def test_immutable_by_params(method, params, result):
    assert outcome(method, params, result) == (IMMUTABLE, FOREVER)


def test_immutable_decision_has_no_ttl():
    decision = decide("node_getBlock", [1], FINALIZED)
    assert decision.ttl is None


# -- the finality boundary


@pytest.mark.parametrize("method, extra", [
    ("node_getBlock", []), ("node_getBlockHeader", []), ("node_getPublicStorageAt", [ADDRESS, SLOT]),
    ("node_getNoteHashMembershipWitness", [HASH]),
])
def test_finality_boundary(method, extra):
    assert outcome(method, [FINALIZED, *extra], block(FINALIZED)) == (IMMUTABLE, FOREVER)
    # One block above the finalized tip: it can still be reorged, so only briefly.
    assert outcome(method, [FINALIZED + 1, *extra], block(FINALIZED + 1)) == (VOLATILE, DEFAULT_VOLATILE_TTL)
    # Without an agreed tip nothing is final.
    assert outcome(method, [1, *extra], block(1), finalized=None) == (VOLATILE, DEFAULT_VOLATILE_TTL)


def test_get_blocks_boundary_and_length():
    full = lambda start, limit: [block(n) for n in range(start, start + limit)]  # noqa: E731
    assert outcome("node_getBlocks", [FINALIZED - 9, 10], full(FINALIZED - 9, 10)) == (IMMUTABLE, FOREVER)
    # Last block one above the finalized tip.
    assert outcome("node_getBlocks", [FINALIZED - 8, 10], full(FINALIZED - 8, 10)) == (VOLATILE, DEFAULT_VOLATILE_TTL)
    # A short page for a finalized range comes from a node that is behind: not passed on.
    assert outcome("node_getBlocks", [FINALIZED - 9, 10], full(FINALIZED - 9, 9)) == (IMMUTABLE, None)
    assert outcome("node_getBlocks", [FINALIZED - 9, 10], {"not": "a list"}) == (IMMUTABLE, None)
    # Near the tip a short page is normal, and kept briefly.
    assert outcome("node_getBlocks", [FINALIZED + 30, 50], full(FINALIZED + 30, 10)) == \
        (VOLATILE, DEFAULT_VOLATILE_TTL)


@pytest.mark.parametrize("params", [[0, 10], [10, 0], [True, 5], ["x", 5], ["0x5", 5], [5], [], {"from": 1, "limit": 2}])
def test_get_blocks_odd_params_are_never_final(params):
    assert decide("node_getBlocks", params, FINALIZED).kind == VOLATILE


# -- rules that depend on the answer


@pytest.mark.parametrize("status, expected", [
    ("finalized", FOREVER), ("proven", DEFAULT_VOLATILE_TTL), ("checkpointed", DEFAULT_VOLATILE_TTL),
    ("proposed", DEFAULT_VOLATILE_TTL), ("pending", DEFAULT_VOLATILE_TTL), ("dropped", DEFAULT_VOLATILE_TTL),
    ("success", DEFAULT_VOLATILE_TTL),  # 2.x/3.x receipts say nothing about finality
])
def test_receipt_immutable_only_when_finalized(status, expected):
    receipt = {"txHash": HASH, "status": status, "blockNumber": 10}
    assert outcome("node_getTxReceipt", [HASH], receipt) == (VOLATILE, expected)


@pytest.mark.parametrize("number, expected", [
    (FINALIZED, FOREVER), (FINALIZED + 1, DEFAULT_VOLATILE_TTL), ("12", FOREVER), (None, DEFAULT_VOLATILE_TTL),
])
def test_tx_effect_by_block_number(number, expected):
    effect = {"l2BlockNumber": number, "l2BlockHash": HASH, "txIndexInBlock": 0, "data": {}}
    assert outcome("node_getTxEffect", [HASH], effect) == (VOLATILE, expected)
    assert outcome("node_getTxEffect", [HASH], effect, finalized=None) == (VOLATILE, DEFAULT_VOLATILE_TTL)


@pytest.mark.parametrize("method, result, expected", [
    ("node_getBlockByHash", block(FINALIZED), FOREVER),
    ("node_getBlockByHash", block(FINALIZED + 1), DEFAULT_VOLATILE_TTL),
    ("node_getBlockByHash", {"header": {"globalVariables": {"blockNumber": 3}}}, FOREVER),
    ("node_getBlockByHash", {"weird": True}, DEFAULT_VOLATILE_TTL),
    ("node_getBlock", block(FINALIZED), FOREVER),
    ("node_getBlock", block(FINALIZED + 1), DEFAULT_VOLATILE_TTL),
    ("node_getBlockHeader", header(FINALIZED), FOREVER),
    ("node_getBlockHeader", header(FINALIZED + 1), DEFAULT_VOLATILE_TTL),
])
def test_block_by_hash_immutable_on_a_finalized_hit(method, result, expected):
    assert outcome(method, [HASH], result) == (VOLATILE, expected)


def test_a_decimal_string_is_a_hash_not_a_height():
    # "5" is looked up as a hash by the node, so it is never final by its params,
    # and not being a real block hash either, not by its answer.
    assert outcome("node_getBlock", ["5"], block(5)) == (VOLATILE, DEFAULT_VOLATILE_TTL)
    assert decide("node_getBlock", [5], FINALIZED).kind == IMMUTABLE
    assert decide("node_getPublicStorageAt", ["5", ADDRESS, SLOT], FINALIZED).kind == VOLATILE


def test_state_at_a_hash_is_volatile():
    # The answer does not say which height the hash is, so it cannot prove itself final.
    assert outcome("node_getPublicStorageAt", [HASH, ADDRESS, SLOT], SLOT) == (VOLATILE, DEFAULT_VOLATILE_TTL)


def test_contract_class_immutable_on_a_hit():
    assert outcome("node_getContractClass", [HASH], {"id": HASH}) == (VOLATILE, FOREVER)
    assert outcome("node_getContractClass", [HASH], present=False) == (VOLATILE, DEFAULT_VOLATILE_TTL)


@pytest.mark.parametrize("method, params", [
    ("node_getBlock", [FINALIZED + 1]), ("node_getBlock", ["latest"]), ("node_getTxEffect", [HASH]),
    ("node_getTxReceipt", [HASH]), ("node_getBlockByHash", [HASH]), ("node_getBlocks", [FINALIZED + 1, 5]),
])
def test_not_found_of_a_volatile_call_is_kept_briefly(method, params):
    assert outcome(method, params, present=False) == (VOLATILE, DEFAULT_VOLATILE_TTL)
    assert outcome(method, params, present=False, ttl=0.2) == (VOLATILE, 0.2)


@pytest.mark.parametrize("method, params", [
    ("node_getBlock", [FINALIZED]), ("node_getBlockHeader", [5]), ("node_getBlocks", [1, 5]),
    ("node_getPublicStorageAt", [5, ADDRESS, SLOT]),
])
def test_not_found_of_finalized_data_is_not_stored(method, params):
    assert outcome(method, params, present=False) == (IMMUTABLE, None)


@pytest.mark.parametrize("method, params", [
    ("node_getBlock", [FINALIZED]), ("node_getBlockNumber", []), ("node_getTxReceipt", [HASH]),
    ("node_getContractClass", [HASH]), ("node_isReady", []),
])
def test_errors_are_never_stored(method, params):
    assert outcome(method, params, present=False, error=True)[1] is None


# -- keys


def test_key_format():
    assert cache_key("node_getBlock", [5]) == b"node_getBlock:[5]"
    assert decide("node_getBlock", [5], FINALIZED).key == b"node_getBlock:[5]"
    assert cache_key("node_getBlockHeader", []) == b"node_getBlockHeader:[]"


def test_keys_keep_json_types_apart():
    keys = {cache_key("node_getBlock", [p]) for p in (5, "5", 5.0, True, None, [5], {"5": 5})}
    assert len(keys) == 7


def test_keys_normalise_order_and_whitespace():
    a = json.loads('[ {"b": 1, "a": [1, 2]} ,  "x" ]')
    b = json.loads('[{"a":[1,2],"b":1},"x"]')
    assert cache_key("node_getLogsByTags", a) == cache_key("node_getLogsByTags", b)
    assert cache_key("node_getBlock", [1, 2]) != cache_key("node_getBlock", [2, 1])
    assert cache_key("node_getBlock", [5]) != cache_key("node_getBlockHeader", [5])


def test_keys_do_not_depend_on_the_id_or_the_tip():
    request = {"jsonrpc": "2.0", "id": 7, "method": "node_getBlock", "params": [700]}
    other = {"jsonrpc": "2.0", "id": "seven", "method": "node_getBlock", "params": [700]}
    assert decide(request["method"], request["params"], 800).key == decide(other["method"], other["params"], 10).key


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


def canonical(value):
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


@settings(max_examples=300, deadline=None)
@given(json_values, json_values)
def test_keys_equal_iff_canonical_params_equal(a, b):
    assert (cache_key("node_getBlock", a) == cache_key("node_getBlock", b)) == (canonical(a) == canonical(b))


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_key_survives_a_json_round_trip_with_any_formatting(value):
    reformatted = json.loads(json.dumps(value, indent=3))
    assert cache_key("node_getBlock", reformatted) == cache_key("node_getBlock", value)


# -- the table and its documentation


def test_every_rule_is_used_and_names_are_unambiguous():
    assert set(RULES.values()) == set(Rule)
    assert all(":" not in method for method in RULES)


def test_docs_mirror_the_table():
    rows = dict(re.findall(r"^\|\s*`([A-Za-z0-9_]+)`\s*\|\s*`([a-z-]+)`\s*\|", DOCS.read_text(), re.MULTILINE))
    assert rows == {name: row.cache.value for name, row in TABLE.items()}
    namespaces = dict(re.findall(r"^\|\s*`([A-Za-z0-9_]+)`\s*\|.*\|\s*(`[a-z0-9_]+`(?:, `[a-z0-9_]+`)*)\s*\|$",
                                 DOCS.read_text(), re.MULTILINE))
    assert RULES == {f"{ns.strip('`')}{name}": TABLE[name].cache for name, spelled in namespaces.items()
                     for ns in spelled.split(", ")}


# -- 5.x: null not-found, block parameters in every form, chain identity in keys


@pytest.mark.parametrize("method", ["node_getBlock", "aztec_getBlock", "aztec_getBlockData", "aztec_getTxReceipt",
                                    "aztec_getPublicStorageAt", "node_getContractClass"])
@pytest.mark.parametrize("params", [[FINALIZED], [{"number": FINALIZED}], ["0x" + "ab" * 32], [FINALIZED + 5]])
def test_a_null_result_is_not_found_and_never_kept_long(method, params):
    kind, ttl = outcome(method, params, None, present=True)
    assert ttl is None or ttl == DEFAULT_VOLATILE_TTL
    if kind == IMMUTABLE:  # at or below the finalized tip: a node that is behind, not passed on
        assert ttl is None
    assert (kind, ttl) == outcome(method, params, None, present=False)


@pytest.mark.parametrize("param", [FINALIZED, {"number": FINALIZED}, {"number": str(FINALIZED)},
                                   {"number": FINALIZED, "hash": "0x01"}])
def test_a_finalized_number_in_any_form_is_immutable(param):
    assert outcome("aztec_getBlock", [param], block(FINALIZED)) == (IMMUTABLE, FOREVER)
    assert outcome("aztec_getPublicStorageAt", [param, "0x1", "0x2"], "0x0") == (IMMUTABLE, FOREVER)


@pytest.mark.parametrize("param", ["latest", "proposed", "checkpointed", "proven", "finalized", {"tag": "finalized"},
                                   {"tag": "proven"}, str(FINALIZED), {"number": FINALIZED + 1}, {"hash": "0x01"}])
def test_tags_and_unproven_forms_are_volatile(param):
    assert outcome("aztec_getBlock", [param], block(FINALIZED - 10)) == (VOLATILE, DEFAULT_VOLATILE_TTL)


@pytest.mark.parametrize("param", ["0x" + "ab" * 32, {"hash": "0x" + "ab" * 32}, {"archive": "0x" + "cd" * 32}])
def test_a_hash_in_any_form_is_immutable_once_its_block_is_final(param):
    assert outcome("aztec_getBlock", [param], block(FINALIZED)) == (VOLATILE, FOREVER)
    assert outcome("aztec_getBlock", [param], block(FINALIZED + 1)) == (VOLATILE, DEFAULT_VOLATILE_TTL)


def test_5_and_its_string_and_object_forms_are_three_keys():
    keys = {cache_key("aztec_getBlock", [p]) for p in (5, "5", {"number": 5}, {"number": "5"})}
    assert len(keys) == 4
    assert cache_key("node_getBlock", [5]) != cache_key("aztec_getBlock", [5])


def test_keys_carry_the_chain():
    plain = cache_key("node_getBlock", [5])
    one = decide("node_getBlock", [5], FINALIZED, chain=("1337", "1")).key
    other_rollup = decide("node_getBlock", [5], FINALIZED, chain=("1337", "2")).key
    other_l1 = decide("node_getBlock", [5], FINALIZED, chain=("1", "1")).key
    assert len({plain, one, other_rollup, other_l1}) == 4
    assert one == b'["1337","1"]node_getBlock:[5]'
    assert one.endswith(plain)
    # The chain prefix is a JSON array: no chain can end where another's method begins.
    assert cache_key("node_getBlock", [5], ("1", "1]node")) != cache_key("node_getBlock", [5], ("1", "1"))
