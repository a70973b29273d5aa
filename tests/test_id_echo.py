"""Every answer item carries the caller's id exactly as the caller wrote it, byte for byte, on every
path: passed through (from a node that echoes ids exactly, and from one that writes them back in
its own way, as the JavaScript Aztec node does), cache hits, coalesced followers, sub-batches put
back together, items refused by the gateway, and the gateway's own errors for a single call. A
call without an id (a notification) gets an item without one. Ids no 64-bit float holds
(``1E400``) and NaN / Infinity are refused with -32600 "invalid id".

In memory: tests/stages_support.py, a task.Clock, no sockets.
"""
from __future__ import annotations

import json
from typing import Any, Union

import msgspec
import pytest
from msgspec import UNSET, Raw, UnsetType
from twisted.internet import defer

from sentinel_proxy.core import jsonrpc
from sentinel_proxy.upstream.response import UpstreamResponse

from tests.stages_support import MemoryStore, answer, rig, settled
from tests.raw_ids import batch, call, ids_of

#: Ids as callers write them; None: no id at all.
IDS: list[bytes | None] = [
    b"7",
    b"0",
    b"123456789012345678901234567890",
    b"-42",
    b"1e2",
    b"1E2",
    b"1.0",
    b"-0",
    b"2.50e-3",
    b'"abc"',
    b'"a\\"b\\\\c\\u00e9 \\ud83d\\ude00 \xc3\xa9 \xf0\x9f\x98\x80"',
    b'""',
    b"null",
    None,
]
ID_NAMES = [repr(raw) if raw is not None else "missing" for raw in IDS]

BLOCK = {"number": 60, "hash": "0x" + "ab" * 32}
BLOCK_JSON = json.dumps(BLOCK, separators=(",", ":")).encode()


class _Request(msgspec.Struct):
    id: Union[Raw, UnsetType] = UNSET
    method: str = ""
    params: Any = []


def js_id(raw: bytes) -> bytes:
    """An id as a JavaScript node writes it back: parsed into a double (numbers) or a string, then
    JSON.stringify'd."""
    value = json.loads(raw)
    if isinstance(value, str) or value is None:
        return json.dumps(value, ensure_ascii=False).encode()
    number = float(value)
    if number.is_integer() and abs(number) < 1e21:
        return str(int(number)).encode()
    return repr(number).encode()


def echo_node(js: bool = False, reverse: bool = False):
    """A node answering node_getBlock with BLOCK and anything else with 7, writing each call's id
    back exactly (``js``: as JavaScript writes it), in request order unless ``reverse``."""
    def respond(body: bytes) -> UpstreamResponse:
        document = msgspec.json.decode(body, type=Union[list[_Request], _Request])
        calls = document if isinstance(document, list) else [document]
        items = []
        for request in calls:
            head = b'{"jsonrpc":"2.0"'
            if request.id is not UNSET:
                raw = bytes(request.id)
                head += b',"id":' + (js_id(raw) if js else raw)
            items.append(head + b',"result":' + (BLOCK_JSON if request.method == "node_getBlock" else b"7") + b"}")
        if reverse:
            items.reverse()
        return answer(batch(*items) if isinstance(document, list) else items[0])
    return respond


def gateway(cached: bool = False, **kwargs: Any):
    store = MemoryStore() if cached else None
    path = rig(cache=store, **kwargs)
    path.pool.finalized = 100  # block 60 is final: cached for ever
    return path


def refusal(reply) -> tuple[int, int, str]:
    error = json.loads(reply.body)["error"]
    return reply.status, error["code"], error["message"]


# -------------------------------------------------------------------------------- pass-through


@pytest.mark.parametrize("js", [False, True], ids=["exact node", "javascript node"])
@pytest.mark.parametrize("raw_id", IDS, ids=ID_NAMES)
def test_a_single_call_passed_through(raw_id, js):
    path = gateway(default=echo_node(js=js))
    reply = settled(path.handle(None, raw=call(raw_id, "node_isReady", b"[]")))
    assert reply.status == 200 and reply.outcome == "ok"
    assert ids_of(reply.body) == raw_id
    assert json.loads(reply.body)["result"] == 7


@pytest.mark.parametrize("js", [False, True], ids=["exact node", "javascript node"])
@pytest.mark.parametrize("reverse", [False, True], ids=["in order", "reversed"])
def test_a_batch_of_every_id_form_passed_through(js, reverse):
    path = gateway(default=echo_node(js=js, reverse=reverse))
    reply = settled(path.handle(None, raw=batch(*(call(raw_id, "node_isReady", b"[]") for raw_id in IDS))))
    assert reply.status == 200 and ids_of(reply.body) == IDS
    if not js and not reverse:
        assert reply.body == echo_node()(batch(*(call(i, "node_isReady", b"[]") for i in IDS))).body, \
            "an exact answer in order is passed on untouched"


# ------------------------------------------------------------------------------------- cache


@pytest.mark.parametrize("raw_id", IDS, ids=ID_NAMES)
def test_a_cache_hit(raw_id):
    path = gateway(cached=True, default=echo_node(js=True))
    settled(path.handle(None, raw=call(b"1")))  # the miss that stores block 60
    single = settled(path.handle(None, raw=call(raw_id)))
    assert dict(single.headers)[b"x-cache"] == b"HIT" and ids_of(single.body) == raw_id
    assert json.loads(single.body)["result"] == BLOCK
    in_batch = settled(path.handle(None, raw=batch(call(raw_id), call(b"5"))))
    assert ids_of(in_batch.body) == [raw_id, b"5"] and len(path.client.sent) == 1


def test_a_cache_miss_answers_every_id_form_from_one_sub_batch():
    path = gateway(cached=True, default=echo_node(js=True, reverse=True))
    reply = settled(path.handle(None, raw=batch(*(call(raw_id, params=b"[%d]" % (60 + i))
                                                  for i, raw_id in enumerate(IDS)))))
    assert ids_of(reply.body) == IDS
    (sent,) = path.client.sent
    assert [item["id"] for item in sent.json()] == list(range(len(IDS))), "the sub-batch carries the gateway's ids"


@pytest.mark.parametrize("raw_id", IDS, ids=ID_NAMES)
def test_a_coalesced_follower(raw_id):
    path = gateway(cached=True)
    leader_answer: defer.Deferred = defer.Deferred()
    path.client.script("n0:1", leader_answer)
    leader = path.handle(None, raw=call(b"1"))
    single = path.handle(None, raw=call(raw_id))
    in_batch = path.handle(None, raw=batch(call(b'"x"'), call(raw_id)))
    leader_answer.callback(echo_node(js=True)(call(b"0")))
    assert ids_of(settled(leader).body) == b"1"
    follower = settled(single)
    assert dict(follower.headers)[b"x-cache"] == b"COALESCED" and ids_of(follower.body) == raw_id
    assert json.loads(follower.body)["result"] == BLOCK
    assert ids_of(settled(in_batch).body) == [b'"x"', raw_id]
    assert len(path.client.sent) == 1


def test_sub_batch_reassembly_with_hits_misses_refusals_and_never_cached_calls():
    path = gateway(cached=True, default=echo_node(js=True, reverse=True))
    settled(path.handle(None, raw=call(b"1")))  # block 60 is now a hit
    calls = []
    for index, raw_id in enumerate(IDS):
        kind = index % 4
        if kind == 0:
            calls.append(call(raw_id))  # a hit
        elif kind == 1:
            calls.append(call(raw_id, params=b"[%d]" % (70 + index)))  # a miss
        elif kind == 2:
            calls.append(call(raw_id, "nodeAdmin_pauseSync", b"[]"))  # refused here
        else:
            calls.append(call(raw_id, "node_isReady", b"[]"))  # never cached
    reply = settled(path.handle(None, raw=batch(*calls)))
    assert reply.status == 200 and ids_of(reply.body) == IDS
    items = json.loads(reply.body)
    assert all(item["error"]["code"] == jsonrpc.METHOD_NOT_FOUND for item in items[2::4])
    assert all(item["result"] == 7 for item in items[3::4])


# ---------------------------------------------------------------------- the gateway's own errors


@pytest.mark.parametrize("raw_id", IDS, ids=ID_NAMES)
def test_refused_batch_items_and_single_calls(raw_id):
    path = gateway(default=echo_node())
    refused_batch = settled(path.handle(None, raw=batch(call(raw_id, "nodeAdmin_x", b"[]"), call(raw_id, "eth_call"))))
    assert refused_batch.status == 200 and ids_of(refused_batch.body) == [raw_id, raw_id]
    mixed = settled(path.handle(None, raw=batch(call(b"1", "node_isReady", b"[]"), call(raw_id, "nodeAdmin_x", b"[]"))))
    assert ids_of(mixed.body) == [b"1", raw_id]
    single = settled(path.handle(None, raw=call(raw_id, "nodeAdmin_x", b"[]")))
    assert refusal(single)[:2] == (400, jsonrpc.METHOD_NOT_FOUND) and ids_of(single.body) == raw_id
    invalid = settled(path.handle(None, raw=call(raw_id, "node_x", b'"not params"')))
    assert refusal(invalid)[:2] == (400, jsonrpc.INVALID_REQUEST) and ids_of(invalid.body) == raw_id


@pytest.mark.parametrize("raw_id", IDS, ids=ID_NAMES)
def test_blocks_no_node_keeps_are_refused_under_the_callers_id(raw_id):
    path = gateway(default=echo_node())  # the nodes keep blocks from 50 on
    single = settled(path.handle(None, raw=call(raw_id, params=b"[5]")))
    assert refusal(single)[:2] == (400, jsonrpc.BLOCK_UNAVAILABLE) and ids_of(single.body) == raw_id
    in_batch = settled(path.handle(None, raw=batch(call(raw_id, params=b"[5]"), call(b"2", params=b"[60]"))))
    assert ids_of(in_batch.body) == [raw_id, b"2"]
    assert json.loads(in_batch.body)[0]["error"]["code"] == jsonrpc.BLOCK_UNAVAILABLE


# ------------------------------------------------------------------------------ refused ids


@pytest.mark.parametrize("raw_id", [b"1E400", b"-1e999", b"1" + b"0" * 400, b"NaN", b"Infinity", b"-Infinity"])
def test_ids_that_are_no_finite_number_are_refused(raw_id):
    path = gateway(default=echo_node())
    single = settled(path.handle(None, raw=call(raw_id, "node_isReady", b"[]")))
    status, code, message = refusal(single)
    assert (status, code) == (400, jsonrpc.INVALID_REQUEST) and "invalid id" in message
    assert ids_of(single.body) == b"null"
    assert path.client.sent == []


@pytest.mark.parametrize("raw_id", [b"1E400", b"1" + b"0" * 400])
def test_a_batch_item_with_an_infinite_id_is_refused_alone(raw_id):
    path = gateway(default=echo_node())
    reply = settled(path.handle(None, raw=batch(call(raw_id, "node_isReady", b"[]"), call(b"2", "node_isReady", b"[]"))))
    items = json.loads(reply.body)
    assert reply.status == 200 and ids_of(reply.body) == [b"null", b"2"]
    assert items[0]["error"]["code"] == jsonrpc.INVALID_REQUEST and "invalid id" in items[0]["error"]["message"]
    assert items[1]["result"] == 7


def test_nan_elsewhere_than_the_id_is_refused_clearly():
    path = gateway(default=echo_node())
    reply = settled(path.handle(None, raw=call(b"3", "node_getBlock", b"[NaN]")))
    status, code, message = refusal(reply)
    assert (status, code) == (400, jsonrpc.INVALID_REQUEST) and "NaN, Infinity and -Infinity" in message


def test_every_gateway_answer_is_valid_json():
    path = gateway(cached=True, default=echo_node(js=True, reverse=True))
    for raw_id in IDS + [b"1E400"]:
        for body in (call(raw_id), batch(call(raw_id), call(raw_id, "nodeAdmin_x", b"[]"))):
            json.loads(settled(path.handle(None, raw=body)).body, parse_constant=_no_constants)


def _no_constants(name: str) -> Any:
    raise AssertionError(f"{name} in an answer")
