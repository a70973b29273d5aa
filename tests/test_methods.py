"""The method table (core/methods.py): one source of truth for caching, routing, safety, rate
cost and metric labels, in both dialects. Pure: no reactor."""
import pytest

from sentinel_proxy.core import cache_policy, jsonrpc, methods, routing
from sentinel_proxy.core.methods import BlockRef, Rule, block_ref, meaning, metric_label
from sentinel_proxy.settings import SPECS
from sentinel_proxy.stores import ratelimit


def call(method, params):
    parsed = jsonrpc.parse_request(jsonrpc.encode({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}),
                                   100, jsonrpc.MethodPolicy(allow=("*",)))
    return parsed.calls[0]


# -- one row, both namespaces


@pytest.mark.parametrize("name", sorted(methods.TABLE))
def test_node_and_aztec_names_share_one_row(name):
    row = methods.TABLE[name]
    if not row.node:
        assert methods.lookup(f"node_{name}") is None and methods.lookup(f"aztec_{name}") is None
        return
    for attribute in ("cache_rule", "routing_class", "safe", "cost"):
        read = getattr(methods, attribute)
        assert read(f"node_{name}") == read(f"aztec_{name}")
    assert cache_policy.RULES[f"node_{name}"] == cache_policy.RULES[f"aztec_{name}"] == row.cache


def test_the_other_modules_read_the_table():
    assert cache_policy.RULES == methods.full_names()
    assert routing.BLOCK_PARAM_METHODS == {n for n in methods.full_names() if methods.routing_class(n)}
    assert jsonrpc.UNSAFE_METHODS == {"node_sendTx", "aztec_sendTx"}
    assert ratelimit.DEFAULT_COSTS["aztec_getValidatorsStats"] == ratelimit.DEFAULT_COSTS["node_getValidatorsStats"] == 20
    assert ratelimit.request_cost(["aztec_getBlocks", "aztec_sendTx", "aztec_somethingNew"]) == 5 + 2 + 1
    assert ratelimit.request_cost(["p2p_getPendingTxs", "p2p_getTxStatus"]) == 5 + 1


def test_the_node_reads_a_name_up_to_its_second_underscore():
    # JavaScript name.split('_', 2): node_sendTx_x IS sendTx to the node.
    assert methods.lookup("node_sendTx_anything").name == "sendTx"
    assert not methods.safe("aztec_sendTx_x")
    assert ratelimit.request_cost(["node_sendTx_x"]) == 2
    # ... but only exact spellings are cached or labelled.
    assert "node_getBlock_x" not in cache_policy.RULES
    assert metric_label("node_getBlock_x") == "other"


@pytest.mark.parametrize("method", ["NODE_getBlock", "Aztec_getBlock", "node_nope", "p2p_getBlock", "foo_getBlock",
                                    "aztec_getTxStatus", "nodeAdmin_getConfig", "getBlock", ""])
def test_methods_outside_the_table(method):
    assert methods.lookup(method) is None
    assert methods.cache_rule(method) is Rule.NEVER
    assert methods.safe(method) and methods.cost(method) == 1.0 and methods.routing_class(method) is None
    assert metric_label(method) == "other"


def test_sendtx_is_never_repeated_in_either_namespace():
    for name in ("node_sendTx", "aztec_sendTx"):
        assert not jsonrpc.safe_to_repeat((call(name, [{}]),))
    assert jsonrpc.safe_to_repeat((call("aztec_getBlock", [1]), call("p2p_getPeers", [])))
    assert not jsonrpc.safe_to_repeat((call("aztec_getBlock", [1]), call("aztec_sendTx", [{}])))


def test_metric_labels_are_bounded_and_keep_the_namespace():
    assert metric_label("node_getBlock") == "node_getBlock"
    assert metric_label("aztec_getBlock") == "aztec_getBlock"
    assert metric_label("aztec_getChainTips") == "aztec_getChainTips"
    assert metric_label("p2p_getPeers") == "p2p_getPeers"
    labels = methods.metric_labels()
    assert {"node_getBlock", "aztec_getBlock", "p2p_getTxStatus"} <= labels
    assert "other" not in labels and len(labels) < 300
    assert all(metric_label(label) == label for label in labels)


# -- one meaning across the dialects


@pytest.mark.parametrize("method, params, expected", [
    ("node_getL2Tips", [], ("getChainTips", None)),
    ("aztec_getChainTips", [], ("getChainTips", None)),
    ("node_getProvenBlockNumber", [], ("getBlockNumber", "proven")),
    ("aztec_getBlockNumber", ["proven"], ("getBlockNumber", "proven")),
    ("node_getCheckpointedBlockNumber", [], ("getBlockNumber", "checkpointed")),
    ("aztec_getBlockNumber", ["checkpointed"], ("getBlockNumber", "checkpointed")),
    ("node_getBlockNumber", [], ("getBlockNumber", "proposed")),
    ("aztec_getBlockNumber", ["proposed"], ("getBlockNumber", "proposed")),
    ("aztec_getBlockNumber", ["latest"], ("getBlockNumber", "proposed")),
    ("aztec_getBlock", [5], ("getBlock", None)),
    ("aztec_nope", [], None),
])
def test_meaning(method, params, expected):
    assert meaning(method, params) == expected


# -- the method policy


def test_default_policy_and_setting_cover_both_dialects():
    spec = next(spec for spec in SPECS if spec.env == "METHOD_ALLOW")
    allow = spec.parse(spec.default)
    assert allow == ("node_*", "aztec_*", "p2p_*")
    for policy in (jsonrpc.DEFAULT_POLICY, jsonrpc.MethodPolicy(allow)):
        assert policy.allows("node_getBlock") and policy.allows("aztec_getBlock") and policy.allows("p2p_getPeers")


@pytest.mark.parametrize("method", ["nodeAdmin_getConfig", "aztecAdmin_getConfig", "nodeDebug_x", "aztecDebug_x",
                                    "NODEADMIN_x", "aztecadmin_x", "NodeDebug_x", "AZTECDEBUG_x", "nodeadmin"])
def test_admin_and_debug_namespaces_are_refused_whatever_the_policy(method):
    for policy in (jsonrpc.DEFAULT_POLICY, jsonrpc.MethodPolicy(allow=("*",)), jsonrpc.MethodPolicy(allow=(method,)),
                   jsonrpc.MethodPolicy(allow=(method.split("_")[0] + "_*",))):
        assert not policy.allows(method)


# -- block parameters


@pytest.mark.parametrize("param, expected", [
    (990, BlockRef("number", 990)),
    ("latest", BlockRef("tag", value="proposed")),
    ("proven", BlockRef("tag", value="proven")),
    ("finalized", BlockRef("tag", value="finalized")),
    ("5", BlockRef("hash", value="5")),  # the field element 5: a hash, never block 5
    ("0x" + "ab" * 32, BlockRef("hash", value="0x" + "ab" * 32)),
    ({"number": 990}, BlockRef("number", 990)),
    ({"number": "990"}, BlockRef("number", 990)),
    ({"number": 990, "hash": "0x01"}, BlockRef("number", 990)),
    ({"hash": "0x01"}, BlockRef("hash", value="0x01")),
    ({"archive": "0x02"}, BlockRef("archive", value="0x02")),
    ({"tag": "proven"}, BlockRef("tag", value="proven")),
    ({"number": 5, "extra": 1}, BlockRef("number", 5)),
    ({"tag": "latest"}, methods.INVALID),
    ({"hash": "0x01", "archive": "0x02"}, methods.INVALID),
    ({"number": -1}, methods.INVALID),
    ({"number": "0x10"}, methods.INVALID),
    ({}, methods.INVALID),
    (-3, methods.INVALID),
    (True, methods.INVALID),
    ("abc!", methods.INVALID),
    (None, methods.INVALID),
    ([5], methods.INVALID),
])
def test_block_ref(param, expected):
    assert block_ref(param) == expected


@pytest.mark.parametrize("method, params, expected", [
    ("aztec_getBlock", [990], 990),
    ("aztec_getBlock", [{"number": 990}], 990),
    ("aztec_getBlock", [{"number": "990"}], 990),
    ("aztec_getBlock", [{"number": 990, "hash": "0x01"}], 990),
    ("aztec_getBlock", ["990"], None),
    ("aztec_getBlock", [{"hash": "0x01"}], None),
    ("aztec_getBlock", ["finalized"], None),
    ("aztec_getBlock", [{"tag": "proven"}], None),
    ("aztec_getBlockData", [{"number": 7}], 7),
    ("aztec_getPublicStorageAt", [{"number": 12}, "0x1", "0x2"], 12),
    ("node_getPublicStorageAt", [12, "0x1", "0x2"], 12),
    ("aztec_getBlocks", ["998", 2], 998),
    ("node_getBlocks", [998, 2], 998),
    ("aztec_getBlockNumber", [5], None),
    ("aztec_getTxReceipt", [5], None),
])
def test_block_needed_in_every_form(method, params, expected):
    assert routing.block_needed(call(method, params)) == expected
