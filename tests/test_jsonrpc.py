"""Request validation and method policy, without any I/O."""
import json

import pytest
from hypothesis import given, settings, strategies as st

from sentinel_proxy.core import jsonrpc
from sentinel_proxy.core.jsonrpc import RequestError, merge_batch, parse_request


def call(method="node_getBlockNumber", id_=1, **extra):
    return {"jsonrpc": "2.0", "id": id_, "method": method, "params": [], **extra}


def body(value):
    return json.dumps(value).encode()


def test_single_call():
    parsed = parse_request(body(call()), 100)
    assert not parsed.is_batch and parsed.methods == ("node_getBlockNumber",) and not parsed.refused


def test_batch_keeps_positions():
    parsed = parse_request(body([call(id_=0), call("p2p_getPeers", id_="x")]), 100)
    assert parsed.is_batch and [c.position for c in parsed.calls] == [0, 1]


@pytest.mark.parametrize("raw, code", [
    (b"{not json", jsonrpc.PARSE_ERROR),
    (b"", jsonrpc.PARSE_ERROR),
    (b"\xff\xfe", jsonrpc.PARSE_ERROR),
    (b"[" * 100000, jsonrpc.PARSE_ERROR),
    (b"[]", jsonrpc.INVALID_REQUEST),
    (b"42", jsonrpc.INVALID_REQUEST),
    (b'"node_getBlockNumber"', jsonrpc.INVALID_REQUEST),
])
def test_whole_request_errors(raw, code):
    with pytest.raises(RequestError) as caught:
        parse_request(raw, 100)
    assert caught.value.code == code and caught.value.http_status == 400
    assert json.loads(caught.value.body())["id"] is None


def test_batch_over_limit():
    with pytest.raises(RequestError, match="101 calls exceeds the limit of 100"):
        parse_request(body([call(id_=i) for i in range(101)]), 100)


@pytest.mark.parametrize("method", ["nodeAdmin_getConfig", "nodeAdmin_rollbackTo", "eth_blockNumber", "debug_x", "node"])
def test_refused_single_methods(method):
    with pytest.raises(RequestError) as caught:
        parse_request(body(call(method, id_=7)), 100)
    assert caught.value.code == jsonrpc.METHOD_NOT_FOUND and caught.value.request_id == 7
    assert b'"id":7,' in caught.value.body()


@pytest.mark.parametrize("item, code", [
    ({"jsonrpc": "1.0", "id": 1, "method": "node_x"}, jsonrpc.INVALID_REQUEST),
    ({"jsonrpc": "2.0", "id": 1}, jsonrpc.INVALID_REQUEST),
    ({"jsonrpc": "2.0", "id": 1, "method": 5}, jsonrpc.INVALID_REQUEST),
    ({"jsonrpc": "2.0", "id": 1, "method": "node_x", "params": "a"}, jsonrpc.INVALID_REQUEST),
    ({"jsonrpc": "2.0", "id": [1], "method": "node_x"}, jsonrpc.INVALID_REQUEST),
])
def test_invalid_single_calls(item, code):
    with pytest.raises(RequestError) as caught:
        parse_request(body(item), 100)
    assert caught.value.code == code


def test_batch_refuses_items_individually_and_merges_in_order():
    parsed = parse_request(body([call(id_=0), call("nodeAdmin_pauseSync", id_=1), 5, call(id_="three")]), 100)
    assert [c.position for c in parsed.calls] == [0, 3]
    refused = {position: json.loads(item) for position, item in parsed.refused.items()}
    assert refused[1]["error"]["code"] == jsonrpc.METHOD_NOT_FOUND and refused[1]["id"] == 1
    assert refused[2]["error"]["code"] == jsonrpc.INVALID_REQUEST and refused[2]["id"] is None
    merged = json.loads(merge_batch(parsed, {0: b'{"jsonrpc":"2.0","id":0,"result":1}',
                                             3: b'{"jsonrpc":"2.0","id":"three"}'}))
    assert [item.get("id") for item in merged] == [0, 1, None, "three"]
    assert "result" not in merged[3]


def test_merge_refuses_an_answer_missing_a_call():
    parsed = parse_request(body([call(id_=0), call("bad_x", id_=1)]), 100)
    with pytest.raises(ValueError):
        merge_batch(parsed, {})


def test_a_notification_has_no_id_and_needs_no_answer():
    parsed = parse_request(b'[{"jsonrpc":"2.0","method":"node_getBlockNumber"},'
                           b'{"jsonrpc":"2.0","method":"nodeAdmin_x"},{"jsonrpc":"2.0","id":1,"method":"node_x"}]', 100)
    assert [c.id for c in parsed.calls] == [None, b"1"]
    assert parsed.refused[1] == (b'{"jsonrpc":"2.0","error":{"code":-32601,'
                                 b'"message":"Method not allowed by this gateway: nodeAdmin_x"}}'), "no id: none written"
    assert merge_batch(parsed, {2: b"{}"}) == b'[' + parsed.refused[1] + b',{}]'


def test_calls_keep_their_raw_id_params_and_bytes():
    raw = b'[ {"id": 1e2, "jsonrpc":"2.0", "method": "node_getBlock", "params" : [ 5 ]}, {"id":2,"method":"x_y"} ]'
    parsed = parse_request(raw, 100)
    (only,) = parsed.calls
    assert (only.id, bytes(only.params_raw), only.params, only.key) == (b"1e2", b"[ 5 ]", [5], 100.0)
    assert jsonrpc.allowed_body(parsed) == b'[{"id": 1e2, "jsonrpc":"2.0", "method": "node_getBlock", "params" : [ 5 ]}]'
    assert only.request == {"jsonrpc": "2.0", "id": 100.0, "method": "node_getBlock", "params": [5]}


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_either_parse_or_give_a_json_rpc_error(raw):
    try:
        parse_request(raw, 100)
    except RequestError as refusal:
        answer = json.loads(refusal.body())
        assert answer["jsonrpc"] == "2.0" and isinstance(answer["error"]["code"], int)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["node_getBlock", "p2p_getPeers", "nodeAdmin_getConfig", "other_x"]),
                min_size=1, max_size=20))
def test_only_public_namespaces_pass(methods):
    parsed = parse_request(body([call(m, id_=i) for i, m in enumerate(methods)]), 100)
    assert all(jsonrpc.DEFAULT_POLICY.allows(c.method) for c in parsed.calls)
    assert parsed.size == len(methods)
    assert len(parsed.calls) == sum(m.startswith(("node_", "p2p_")) for m in methods)


def test_ids_in_a_refused_body_are_the_callers_bytes():
    raw = b'[{"id": 1e2, "method": "x"}, 7, {"method": "n"}, {"id": 1E400}, {"id": {"a": 1}}, {"id": "\\u00e9"}]'
    assert jsonrpc.ids_in(raw) == (True, [b"1e2", b"null", None, b"null", b"null", b'"\\u00e9"'])
    assert jsonrpc.ids_in(b'{"id": -0, "jsonrpc": "2.0"}') == (False, [b"-0"])
    for unreadable in (b"[]", b"7", b"{nope", b'"x"', b""):
        assert jsonrpc.ids_in(unreadable) is None, unreadable


def test_refusal_bodies_are_one_error_per_call_under_its_id():
    assert json.loads(jsonrpc.refusal_body(True, [b"1e2", None], -32001, "no node")) == [
        {"jsonrpc": "2.0", "id": 100.0, "error": {"code": -32001, "message": "no node"}},
        {"jsonrpc": "2.0", "error": {"code": -32001, "message": "no node"}}]
    parsed = parse_request(body([call("node_a", id_="x"), call("nodeAdmin_b", id_=2)]), 100)
    items = json.loads(jsonrpc.refusal_of(parsed, -32005, "busy"))
    assert [(item["id"], item["error"]["code"]) for item in items] == [("x", -32005), (2, jsonrpc.METHOD_NOT_FOUND)]
    assert parsed.refused_methods == ("nodeAdmin_b",)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_ids_in_any_bytes_are_none_or_valid_json_ids(raw):
    found = jsonrpc.ids_in(raw)
    if found is not None:
        is_batch, ids = found
        answer = json.loads(jsonrpc.refusal_body(is_batch, ids, -32001, "x"))
        assert isinstance(answer, list) == is_batch
