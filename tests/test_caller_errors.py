"""Caller errors stay the caller's: the gateway decodes and validates every body itself (only
``identity`` and ``gzip``, read whole), answers bad input with a clear 400 (lone surrogates, NaN,
Infinity, 1E400, ``%00`` in a static path), writes its own errors under the caller's ids (an array
for a batch), refuses an oversized ``Expect: 100-continue`` without reading the body, and a leader
whose caller leaves does not fail the calls coalesced behind it.

In memory (tests/stages_support.py) first, then end to end through the lean server.
"""
from __future__ import annotations

import gzip
import json

import pytest
import pytest_twisted
from twisted.internet import defer, task

from sentinel_proxy.core import jsonrpc
from sentinel_proxy.proxy.values import Caller, Limits
from sentinel_proxy.stores.ratelimit import MemoryRateLimiter
from sentinel_proxy.upstream.response import UpstreamError
from tests.http_raw import answers, connect
from tests.stages_support import JSON, answer, hang, result, rig, settled
from tests.support import JSON as WIRE_JSON
from tests.support import http, post_json, rpc, wait_for
from tests.raw_ids import batch, call, ids_of

ensure = pytest_twisted.ensureDeferred

SINGLE = call(b'"a\\u00e9"', "node_getBlockNumber", b"[]")
GZIPPED = gzip.compress(SINGLE)


def error_of(reply) -> tuple[int, int, str]:
    error = json.loads(reply.body)["error"]
    return reply.status, error["code"], error["message"]


def with_encoding(encoding: bytes) -> dict:
    return {**JSON, b"content-encoding": encoding}


# ------------------------------------------------------------------------- Content-Encoding


@pytest.mark.parametrize("encoding", [b"deflate", b"br", b"gzip, gzip", b"gzip,identity", b"x-gzip", b"compress",
                                      b"gzip;q=1", b""])
def test_an_encoding_the_gateway_cannot_vouch_for_is_refused(encoding):
    gateway = rig(default=answer(result(7)))
    reply = settled(gateway.handle(None, raw=GZIPPED, headers=with_encoding(encoding)))
    status, code, message = error_of(reply)
    assert (status, code) == (400, jsonrpc.INVALID_REQUEST) and "Unsupported Content-Encoding" in message
    assert gateway.client.sent == []


@pytest.mark.parametrize("encoding", [b"gzip", b"GZIP", b" Gzip\t", b"identity", b"IDENTITY "])
def test_accepted_encodings_reach_the_node_decoded(encoding):
    gateway = rig(default=answer(result(7, "a\u00e9")))
    body = SINGLE if encoding.strip().lower() == b"identity" else GZIPPED
    assert settled(gateway.handle(None, raw=body, headers=with_encoding(encoding))).status == 200
    (sent,) = gateway.client.sent
    assert sent.body == SINGLE and sent.header(b"content-encoding") == [], "what the gateway read, as JSON"


@pytest.mark.parametrize("body, what", [(GZIPPED[:-8], "cut short"), (GZIPPED[:20], "cut short"),
                                        (GZIPPED + b"garbage", "after the end"), (GZIPPED + GZIPPED, "after the end"),
                                        (b"\x1f\x8bnot gzip", "not valid gzip")])
def test_broken_gzip_is_a_parse_error_that_reaches_no_node(body, what):
    gateway = rig(default=answer(result(7)))
    for _ in range(10):
        status, code, message = error_of(settled(gateway.handle(None, raw=body, headers=with_encoding(b"gzip"))))
        assert (status, code) == (400, jsonrpc.PARSE_ERROR) and what in message
    assert gateway.client.sent == [] and all(b.breaker.state == "closed" for b in gateway.pool.backends)


# ------------------------------------------------------------------- the gateway's own errors

ID_FORMS = [b'"a\\u00e9"', b"1e2", b"123456789012345678901234567890", b"-0"]


def no_backend():
    gateway = rig()
    for backend in gateway.pool.backends:
        gateway.pool.record_health(backend, False, now=0.0, error="down")
    return gateway


def upstream_failed():
    return rig(default=UpstreamError("transport", "connection reset"))


def rate_limited():
    gateway = rig(limits=Limits(rate=0.001, burst=1.0), limiter=MemoryRateLimiter(task.Clock()),
                  default=answer(result(7)))
    assert settled(gateway.handle(rpc("node_getBlockNumber"))).status == 200, "the one token"
    return gateway


def overloaded():
    return rig(limits=Limits(max_in_flight=0))


def unknown_key():
    return rig(limits=Limits(key_digests=frozenset({"0" * 64})))


SCENARIOS = {
    "no backend": (no_backend, 503, jsonrpc.NO_BACKEND, {}),
    "upstream failed": (upstream_failed, 502, jsonrpc.UPSTREAM_FAILED, {}),
    "rate limited": (rate_limited, 429, jsonrpc.RATE_LIMITED, {}),
    "overloaded": (overloaded, 503, jsonrpc.OVERLOADED, {}),
    "unknown key": (unknown_key, 401, jsonrpc.UNKNOWN_API_KEY, {"caller": Caller("r", "10.0.0.1", "not-a-key")}),
    "content type": (rig, 400, jsonrpc.INVALID_REQUEST, {"headers": {b"content-type": b"text/plain"}}),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_gateways_own_errors_carry_the_callers_ids(scenario):
    make, status, code, kwargs = SCENARIOS[scenario]
    for raw_id in ID_FORMS:
        reply = settled(make().handle(None, raw=call(raw_id, "node_getBlockNumber", b"[]"), **kwargs))
        assert (reply.status, json.loads(reply.body)["error"]["code"]) == (status, code)
        assert ids_of(reply.body) == raw_id, "the id as the caller sent it"
    reply = settled(make().handle(None, raw=batch(*[call(raw_id, "node_getBlockNumber", b"[]") for raw_id in ID_FORMS],
                                                  call(None, "node_getBlockNumber", b"[]")), **kwargs))
    assert reply.status == status and ids_of(reply.body) == ID_FORMS + [None], "an array, one error per item"
    assert {item["error"]["code"] for item in json.loads(reply.body)} == {code}


def test_a_timeout_carries_the_callers_ids():
    gateway = rig(default=hang())
    pending = gateway.handle(None, raw=batch(call(b"1e2"), call(b'"x"')))
    gateway.clock.advance(31)
    reply = settled(pending)
    assert reply.status == 502 and ids_of(reply.body) == [b"1e2", b'"x"']
    assert {item["error"]["code"] for item in json.loads(reply.body)} == {jsonrpc.UPSTREAM_TIMEOUT}


def test_items_refused_locally_keep_their_own_errors_in_a_failed_batch():
    gateway = no_backend()
    reply = settled(gateway.handle(None, raw=batch(call(b"1"), call(b"2", "nodeAdmin_x", b"[]"), b"5")))
    codes = [item["error"]["code"] for item in json.loads(reply.body)]
    assert ids_of(reply.body) == [b"1", b"2", b"null"]
    assert codes == [jsonrpc.NO_BACKEND, jsonrpc.METHOD_NOT_FOUND, jsonrpc.INVALID_REQUEST]


def test_a_batch_over_the_limit_gets_an_error_per_item_and_unreadable_bodies_one_error():
    gateway = rig(limits=Limits(max_batch=2))
    reply = settled(gateway.handle(None, raw=batch(call(b"1"), call(b'"b"'), b"[]", call(b"1E400"))))
    assert reply.status == 400 and ids_of(reply.body) == [b"1", b'"b"', b"null", b"null"]
    for body in (b"{nope", b"[]", b"7"):
        reply = settled(gateway.handle(None, raw=body))
        assert reply.status == 400 and ids_of(reply.body) == b"null", body


# ------------------------------------------------------------------------------- bad input


LONE_SURROGATES = [
    call(b'"\\ud800"', "node_getBlockNumber", b"[]"),
    b'{"jsonrpc":"2.0","id":1,"method":"node_\\ud800","params":[]}',
    b'{"jsonrpc":"2.0","id":1,"method":"node_getBlock","params":["\\udc00x"]}',
    batch(call(b"1"), b'{"jsonrpc":"2.0","id":"\\udfff","method":"node_getBlockNumber"}'),
]


@pytest.mark.parametrize("body", LONE_SURROGATES, ids=range(len(LONE_SURROGATES)))
def test_a_lone_surrogate_is_a_clear_400(body, unhandled):
    gateway = rig(default=answer(result(7)))
    status, code, message = error_of(settled(gateway.handle(None, raw=body)))
    assert (status, code) == (400, jsonrpc.INVALID_REQUEST) and "lone UTF-16 surrogate" in message
    assert gateway.client.sent == []
    assert gateway.lines()[0]["status"] == 400


# ----------------------------------------------------------------------------- end to end


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    client = await connect(port)
    client.send(data)
    return await client.wait_closed(timeout)


def post_bytes(body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nConnection: close\r\n" + extra +
            b"Content-Length: %d\r\n\r\n" % len(body) + body)


@ensure
async def test_end_to_end_bad_encodings_and_broken_gzip_never_charge_a_node(cluster):
    nodes = [cluster.node("pruned") for _ in range(3)]
    service, url = await cluster.gateway(nodes, max_attempts="3")
    refused = [(GZIPPED, b"GZIP, gzip"), (GZIPPED, b"deflate"), (GZIPPED[:-8], b"gzip"), (GZIPPED + b"xx", b"gzip"),
               (GZIPPED, b"br")]
    for _ in range(4):
        for body, encoding in refused:
            answer_ = await http("POST", url, body, {**WIRE_JSON, b"content-encoding": [encoding]})
            assert answer_.code == 400 and answer_.header("x-sentinel-backend") is None, encoding
            assert answer_.json()["error"]["code"] in (jsonrpc.INVALID_REQUEST, jsonrpc.PARSE_ERROR)
    doubled = await http("POST", url, GZIPPED, {**WIRE_JSON, b"content-encoding": [b"gzip", b"gzip"]})
    assert doubled.code == 400, "two Content-Encoding headers"
    assert all(b.breaker.state == "closed" and b.healthy for b in service.pool.backends)
    good = await http("POST", url, GZIPPED, {**WIRE_JSON, b"content-encoding": [b"GZIP"]})
    assert good.code == 200 and good.json()["id"] == "a\u00e9" and isinstance(good.json()["result"], int)


@ensure
async def test_end_to_end_bad_input_gets_clear_400s_and_the_daemon_keeps_serving(cluster, unhandled):
    node = cluster.node("pruned")
    service, url = await cluster.gateway([node])
    port = service.listener.port.getHost().port
    bodies = LONE_SURROGATES + [call(raw_id, "node_getBlockNumber", b"[]")
                                for raw_id in (b"NaN", b"Infinity", b"-Infinity", b"1E400")]
    bodies.append(call(b"1", "node_getBlock", b"[NaN]"))
    for body in bodies:
        (answer_,) = answers(await raw_exchange(port, post_bytes(body)))
        error = answer_.json()["error"]
        assert answer_.status == 400 and error["code"] == jsonrpc.INVALID_REQUEST, body
        assert ("surrogate" in error["message"]) != ("NaN" in error["message"] or "finite" in error["message"]), body
    for path in (b"/static/dashboard.js%00", b"/static/%00", b"/static/%00/x"):
        (answer_,) = answers(await raw_exchange(port, b"GET " + path + b" HTTP/1.1\r\nHost: gw\r\n"
                                                      b"Connection: close\r\n\r\n"))
        assert answer_.status == 404, path
    for path in (b"/static/%ff", b"/%c3%28", b"/health%fe"):  # not UTF-8: a 400, and no traceback logged
        (answer_,) = answers(await raw_exchange(port, b"GET " + path + b" HTTP/1.1\r\nHost: gw\r\n"
                                                      b"Connection: close\r\n\r\n"))
        assert answer_.status == 400 and answer_.body == b"Non-UTF-8 encoding in URL.\n", path
    assert (await post_json(url, rpc("node_getBlockNumber"))).code == 200


@ensure
async def test_end_to_end_the_gateways_own_errors_carry_the_callers_ids(cluster):
    node = cluster.node("pruned")
    _, url = await cluster.gateway([node])
    body = batch(call(b"1e2", "node_getBlockNumber", b"[]"), call(b'"x"', "node_getBlockNumber", b"[]"))
    answer_ = await http("POST", url + "/archiver", body)  # no archive node: the gateway answers itself
    assert answer_.code == 503 and ids_of(answer_.body) == [b"1e2", b'"x"']
    single = await http("POST", url + "/archiver", call(b"123456789012345678901234567890", "node_getBlockNumber",
                                                        b"[]"))
    assert single.code == 503 and ids_of(single.body) == b"123456789012345678901234567890"


@ensure
async def test_end_to_end_an_oversized_expect_100_continue_gets_413_unread(cluster):
    node = cluster.node("pruned")
    service, _ = await cluster.gateway([node])
    port = service.listener.port.getHost().port
    head = (b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % (50 << 20))
    client = await connect(port)
    client.send(head)
    data = await client.wait_closed()
    assert b"100 Continue" not in data and [a.status for a in answers(data)] == [413]
    assert answers(data)[0].json()["error"]["code"] == jsonrpc.INVALID_REQUEST


@ensure
async def test_end_to_end_followers_get_the_answer_when_the_leaders_caller_leaves(cluster, unhandled):
    node = cluster.node("pruned")
    service, url = await cluster.gateway([node], cache="memory")
    await wait_for(lambda: service.pool.finalized is not None, what="a majority finalized tip")
    node.node.scenario = "slow"  # 0.2 s per answer: the callers overlap
    port = service.listener.port.getHost().port
    leader = await connect(port)
    leader.send(post_bytes(call(b"1", "node_getBlock", b"[960]")))
    await wait_for(lambda: node.node.calls["node_getBlock"] == 1, what="the leading call upstream")
    followers = [defer.Deferred.fromCoroutine(post_json(url, rpc("node_getBlock", [960], id_=i))) for i in range(3)]
    await wait_for(lambda: service.forwarder._caching._flights.coalesced >= 3, what="three followers waiting")
    leader.transport.abortConnection()
    answered = await defer.gatherResults(followers)
    assert [a.code for a in answered] == [200, 200, 200]
    assert [a.json()["id"] for a in answered] == [0, 1, 2] and answered[0].json()["result"]["number"] == 960
    assert node.node.calls["node_getBlock"] == 1, "one upstream call, finished for the followers"
