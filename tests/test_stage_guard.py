"""The guard stage: pure checks of what a caller sent (no clock, no pool, no I/O)."""
import gzip
import json

import pytest

from sentinel_proxy.core import jsonrpc
from sentinel_proxy.proxy.guard import check, decode_body, plan
from sentinel_proxy.proxy.values import Caller, Inbound, Limits, Reply

from tests.stages_support import body_of, rpc

LIMITS = Limits(max_body=1000, max_batch=5)


def inbound(value=None, raw: bytes | None = None, content_type: bytes = b"application/json",
            encoding: bytes | None = None, too_large: bool = False, route: str = "/",
            extra: dict | None = None) -> Inbound:
    headers = {b"content-type": content_type, **(extra or {})}
    if encoding is not None:
        headers[b"content-encoding"] = encoding
    return Inbound(route, raw if raw is not None else body_of(value), headers, too_large, Caller("rid-7"))


def refusal(reply) -> tuple[int, int, str]:
    assert isinstance(reply, Reply), f"expected a refusal, got {reply!r}"
    error = json.loads(reply.body)["error"]
    return reply.status, error["code"], error["message"]


def test_a_valid_call_is_parsed_once():
    parsed = check(inbound(rpc("node_getBlockNumber")), LIMITS, None)
    assert isinstance(parsed, jsonrpc.ParsedRequest)
    assert parsed.methods == ("node_getBlockNumber",) and not parsed.is_batch


@pytest.mark.parametrize("content_type", [b"text/plain", b"application/x-www-form-urlencoded", b""])
def test_wrong_content_type_is_refused(content_type):
    status, code, message = refusal(check(inbound(rpc("node_getBlockNumber"), content_type=content_type), LIMITS, None))
    assert (status, code) == (400, jsonrpc.INVALID_REQUEST) and "Content-Type" in message


def test_content_type_parameters_are_accepted():
    parsed = check(inbound(rpc("node_getBlockNumber"), content_type=b"Application/JSON; charset=utf-8"), LIMITS, None)
    assert isinstance(parsed, jsonrpc.ParsedRequest)


def test_unsupported_encoding_is_refused():
    status, code, message = refusal(check(inbound(raw=b"xx", encoding=b"br"), LIMITS, None))
    assert (status, code, message) == (400, jsonrpc.INVALID_REQUEST,
                                       "Unsupported Content-Encoding: br (only gzip and identity are accepted)")


def test_invalid_gzip_is_a_parse_error():
    status, code, message = refusal(check(inbound(raw=b"not gzip at all", encoding=b"gzip"), LIMITS, None))
    assert (status, code) == (400, jsonrpc.PARSE_ERROR) and "gzip" in message


def test_gzip_bodies_are_decoded_for_validation():
    raw = body_of(rpc("node_getBlockNumber"))
    parsed = check(inbound(raw=gzip.compress(raw), encoding=b"gzip"), LIMITS, None)
    assert isinstance(parsed, jsonrpc.ParsedRequest) and parsed.methods == ("node_getBlockNumber",)


def test_oversized_body_is_refused_with_413():
    status, code, message = refusal(check(inbound(rpc("node_getBlockNumber"), too_large=True), LIMITS, None))
    assert (status, code, message) == (413, jsonrpc.INVALID_REQUEST, "Request body exceeds 1000 bytes")


def test_a_gzip_bomb_stops_inflating_at_the_limit():
    bomb = gzip.compress(b" " * 500_000)  # ~500 bytes that inflate to 500 KB
    assert len(bomb) < LIMITS.max_body
    status, code, _ = refusal(check(inbound(raw=bomb, encoding=b"gzip"), LIMITS, None))
    assert (status, code) == (413, jsonrpc.INVALID_REQUEST)
    with pytest.raises(jsonrpc.RequestError):
        decode_body(bomb, b"gzip", 1000)
    assert decode_body(gzip.compress(b"x" * 1000), b"gzip", 1000) == b"x" * 1000, "exactly the limit is fine"


def test_malformed_json_is_a_parse_error():
    status, code, _ = refusal(check(inbound(raw=b'{"jsonrpc": "2.0", "method":'), LIMITS, None))
    assert (status, code) == (400, jsonrpc.PARSE_ERROR)


def test_forbidden_single_call_refuses_the_request():
    status, code, message = refusal(check(inbound(rpc("nodeAdmin_pauseSync", id_=3)), LIMITS, None))
    assert (status, code) == (400, jsonrpc.METHOD_NOT_FOUND) and "nodeAdmin_pauseSync" in message
    assert json.loads(check(inbound(rpc("eth_call", id_=3)), LIMITS, None).body)["id"] == 3


def test_forbidden_batch_items_are_refused_one_by_one():
    parsed = check(inbound([rpc("node_getBlockNumber", id_=1), rpc("nodeAdmin_pauseSync", id_=2)]), LIMITS, None)
    assert isinstance(parsed, jsonrpc.ParsedRequest)
    assert parsed.methods == ("node_getBlockNumber",)
    refused = json.loads(parsed.refused[1])
    assert refused["error"]["code"] == jsonrpc.METHOD_NOT_FOUND and refused["id"] == 2


def test_a_batch_refused_entirely_is_answered_without_a_node():
    reply = check(inbound([rpc("nodeAdmin_a", id_=1), rpc("eth_b", id_=2)]), LIMITS, None)
    assert isinstance(reply, Reply) and reply.status == 200 and reply.batch == 2
    assert [item["id"] for item in json.loads(reply.body)] == [1, 2]


def test_route_policy_applies():
    limits = Limits(policies={"/archiver": jsonrpc.MethodPolicy(deny=("node_getBlock",))})
    assert isinstance(check(inbound(rpc("node_getBlock", [1])), limits, None), jsonrpc.ParsedRequest)
    assert refusal(check(inbound(rpc("node_getBlock", [1]), route="/archiver"), limits, None))[1] == \
        jsonrpc.METHOD_NOT_FOUND


def test_batch_over_the_limit_is_refused():
    reply = check(inbound([rpc("node_getBlockNumber", id_=i) for i in range(6)]), LIMITS, None)
    items = json.loads(reply.body)
    assert reply.status == 400 and [item["id"] for item in items] == list(range(6)), "one error per item"
    assert all(item["error"]["code"] == jsonrpc.INVALID_REQUEST and "exceeds the limit of 5" in item["error"]["message"]
               for item in items)


def test_blocks_no_eligible_node_keeps_are_refused():
    status, code, message = refusal(check(inbound(rpc("node_getBlock", [5], id_=9)), LIMITS, 10))
    assert (status, code) == (400, jsonrpc.BLOCK_UNAVAILABLE) and "oldest: 10" in message
    parsed = check(inbound([rpc("node_getBlock", [5], id_=1), rpc("node_getBlock", [12], id_=2)]), LIMITS, 10)
    assert parsed.methods == ("node_getBlock",) and parsed.calls[0].position == 1
    assert json.loads(parsed.refused[0]) == {"jsonrpc": "2.0", "id": 1, "error": {
        "code": jsonrpc.BLOCK_UNAVAILABLE, "message": json.loads(parsed.refused[0])["error"]["message"]}}
    for floor in (None, 0, 5):
        assert isinstance(check(inbound(rpc("node_getBlock", [5])), LIMITS, floor), jsonrpc.ParsedRequest)


def test_plan_passes_the_body_as_validated_and_only_the_headers_worth_passing_on():
    text = body_of(rpc("node_getBlock", [60]))
    request = inbound(raw=gzip.compress(text), encoding=b"gzip",
                      extra={b"cookie": b"secret", b"user-agent": b"wallet/1", b"accept-encoding": b"gzip, br",
                             b"host": b"gw"})
    parsed = check(request, LIMITS, None)
    sent = plan(request, parsed, LIMITS, deadline=30.0)
    assert sent.body == text and not sent.plain, "decoded: the node gets what the gateway read"
    assert (sent.block, sent.safe, sent.deadline, sent.request_id) == (60, True, 30.0, "rid-7")
    assert sent.headers == ((b"content-type", b"application/json"), (b"accept-encoding", b"gzip, br"),
                            (b"user-agent", b"wallet/1"), (b"x-request-id", b"rid-7"))
    plain = inbound(raw=text)
    assert plan(plain, check(plain, LIMITS, None), LIMITS, deadline=30.0).body is text, "a plain body is not copied"


def test_plan_with_refused_items_sends_only_the_allowed_ones_uncompressed():
    request = inbound(raw=gzip.compress(b'[{"jsonrpc":"2.0","id":1,"method":"nodeAdmin_x"}, '
                                        b'{ "jsonrpc": "2.0", "id": 2e0, "method": "node_sendTx" } ]'),
                      encoding=b"gzip", extra={b"accept-encoding": b"gzip"})
    sent = plan(request, check(request, LIMITS, None), LIMITS, deadline=30.0)
    assert sent.plain and sent.body == b'[{ "jsonrpc": "2.0", "id": 2e0, "method": "node_sendTx" }]', \
        "the allowed items as the caller wrote them"
    assert not sent.safe, "node_sendTx is a write"
    assert sent.headers == ((b"content-type", b"application/json"), (b"accept-encoding", b"identity"),
                            (b"x-request-id", b"rid-7"))


def test_the_twisted_web_layer_hands_on_headers_lower_cased_and_joined():
    from twisted.web.test.requesthelper import DummyRequest

    from sentinel_proxy.web.rpc import header_map

    request = DummyRequest([b""])
    request.requestHeaders.addRawHeader(b"Content-Type", b"application/json")
    request.requestHeaders.addRawHeader(b"Accept-Encoding", b"gzip")
    request.requestHeaders.addRawHeader(b"accept-encoding", b"br")
    headers = header_map(request)
    assert headers[b"content-type"] == b"application/json" and headers[b"accept-encoding"] == b"gzip, br"
    parsed = check(Inbound("/", body_of(rpc("node_getBlockNumber")), headers, False, Caller("r")), LIMITS, None)
    assert isinstance(parsed, jsonrpc.ParsedRequest)
