"""The lean HTTP/1.1 server of the RPC routes (sentinel_proxy/web/server.py), over real loopback
sockets with raw-bytes clients: framing, order, bounds, the handoff to twisted.web, timeouts and
the drain. The request path is a fake with ``RequestPath.handle``'s signature that echoes what it
got; a small real twisted.web Site (RpcResource in front of a few routes) sits behind the handoff.
"""
from __future__ import annotations

import gzip

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITCPTransport

from sentinel_proxy import twisted_private
from sentinel_proxy.config import load_settings
from sentinel_proxy.proxy.values import Caller
from sentinel_proxy.web.auth import caller_from, caller_of, peer_address, query_value
from sentinel_proxy.web.reading import MAX_HEAD_BYTES, MAX_HEADERS
from sentinel_proxy.web import server as server_module
from tests.http_raw import answers
from tests.lean_support import BIG, MAX_BODY, Served, by_site, failures, get, post, serve
from tests.support import wait_for

ensure = pytest_twisted.ensureDeferred
#: Fixtures of tests/lean_support.py, used by name.
__all__ = ["failures", "serve"]


def count_writes(served: Served, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """What the server writes on its one connection from now on, write by write (through Twisted's
    buffer, or straight to the socket with ``write_now``)."""
    transport = served.server_protocol().transport
    writes: list[bytes] = []
    original = transport.write

    def write(data: bytes) -> None:
        writes.append(data)
        original(data)

    def write_now(to: object, data: bytes) -> None:
        if to is transport:
            writes.append(data)
        twisted_private.write_now(to, data)

    transport.write = write
    monkeypatch.setattr(server_module, "write_now", write_now)
    return writes


# ------------------------------------------------------------------------------- lean answers


@ensure
async def test_a_post_is_answered_in_one_write_with_its_length(serve, monkeypatch):
    served = await serve()
    client = await served.client()
    await wait_for(lambda: len(served.connections) == 1, what="the connection")
    protocol = served.server_protocol()
    assert ITCPTransport.providedBy(protocol.transport) and protocol.transport.getTcpNoDelay()
    writes = count_writes(served, monkeypatch)
    client.send(post(b'{"id":1}', extra=b"X-Repeated: a\r\nx-repeated: b\r\n"))
    (answer,) = await client.answer_count(1)
    assert answer.status == 200 and answer.json() == {"route": "/", "body": '{"id":1}'} and not by_site(answer)
    assert int(answer.headers[b"content-length"]) == len(answer.body)
    assert answer.names[:2] == [b"date", b"content-type"] and b"connection" not in answer.headers
    assert len(writes) == 1 and writes[0] == client.received, "status line, headers and body in one write"
    (call,) = served.path.calls
    assert call.headers[b"x-repeated"] == b"a, b" and call.headers[b"content-type"] == b"application/json"
    assert call.route == "/" and not call.too_large and call.caller.address == "127.0.0.1"
    assert not client.is_closed


@ensure
async def test_keep_alive_reuses_the_connection_for_every_route(serve):
    served = await serve()
    client = await served.client()
    for number, route in enumerate((b"/", b"/archiver", b"/pruned", b"/?key=k")):
        client.send(post(b"%d" % number, route))
        answers_ = await client.answer_count(number + 1)
        assert answers_[-1].json()["body"] == str(number)
    assert [call.route for call in served.path.calls] == ["/", "/archiver", "/pruned", "/"]
    assert len(served.connections) == 1 and not client.is_closed


@ensure
async def test_http_1_0_closes_unless_asked_to_keep_alive(serve):
    served = await serve()
    client = await served.client()
    client.send(post(b"1", version=b"1.0", extra=b"Connection: keep-alive\r\n"))
    (answer,) = await client.answer_count(1)
    assert answer.headers[b"connection"] == b"keep-alive"
    client.send(post(b"2", version=b"1.0"))
    data = await client.wait_closed()
    first, second = answers(data)
    assert second.json()["body"] == "2" and second.headers[b"connection"] == b"close"


@ensure
async def test_connection_close_from_the_caller_closes_after_the_answer(serve):
    served = await serve()
    client = await served.client()
    client.send(post(b"last", extra=b"Connection: close\r\n") + post(b"ignored"))
    (answer,) = answers(await client.wait_closed())
    assert answer.json()["body"] == "last" and answer.headers[b"connection"] == b"close"
    assert [call.body for call in served.path.calls] == [b"last"]


@ensure
async def test_chunked_and_gzip_bodies_reach_the_request_path_as_they_came(serve):
    served = await serve()
    client = await served.client()
    packed = gzip.compress(b'{"jsonrpc":"2.0"}')
    client.send(post(packed, extra=b"Content-Encoding: gzip\r\n"))
    client.send(b"POST /pruned HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    await client.answer_count(2)
    gzipped, chunked = served.path.calls
    assert gzipped.body == packed and gzipped.headers[b"content-encoding"] == b"gzip"
    assert chunked.body == b"abcde" and chunked.route == "/pruned"


@ensure
async def test_pipelined_posts_are_answered_in_order_when_the_first_is_slower(serve, monkeypatch):
    served = await serve()
    client = await served.client()
    await wait_for(lambda: len(served.connections) == 1, what="the connection")
    writes = count_writes(served, monkeypatch)
    client.send(post(b"hold-1") + post(b"fast-2") + post(b"fast-3"))
    await wait_for(lambda: len(served.path.calls) == 3, what="all three requests handled concurrently")
    assert writes == [] and client.received == b"", "answers 2 and 3 wait for answer 1"
    served.path.held[0].callback(None)
    assert [a.json()["body"] for a in await client.answer_count(3)] == ["hold-1", "fast-2", "fast-3"]


@ensure
async def test_many_pipelined_posts_answered_in_order_whatever_order_they_finish(serve):
    served = await serve()
    client = await served.client()
    client.send(b"".join(post(b"hold-%d" % n) for n in range(40)))
    await wait_for(lambda: len(served.path.held) == 40, what="40 requests in flight")
    for held in reversed(served.path.held):
        held.callback(None)
    assert [a.json()["body"] for a in await client.answer_count(40)] == [f"hold-{n}" for n in range(40)]


# --------------------------------------------------------------------------------- handoff


@ensure
async def test_a_get_is_handed_to_the_site_on_a_fresh_connection(serve):
    served = await serve()
    client = await served.client()
    client.send(get(b"/health"))
    (answer,) = await client.answer_count(1)
    assert answer.status == 200 and answer.body == b"healthy" and by_site(answer)
    assert served.path.calls == []
    client.send(get(b"/health"))
    assert (await client.answer_count(2))[1].body == b"healthy", "the Site keeps the connection"


@ensure
async def test_a_get_after_a_lean_post_on_the_same_connection(serve):
    served = await serve()
    client = await served.client()
    client.send(post(b"first"))
    await client.answer_count(1)
    client.send(get(b"/health"))
    lean, health = await client.answer_count(2)
    assert not by_site(lean) and health.body == b"healthy" and by_site(health) and len(served.connections) == 1


@ensure
async def test_a_get_pipelined_behind_a_post_waits_for_its_answer(serve):
    served = await serve()
    client = await served.client()
    client.send(post(b"hold") + get(b"/health") + post(b"after"))
    await wait_for(lambda: served.path.held, what="the held POST")
    assert client.received == b""
    served.path.held[0].callback(None)
    lean, health, after = await client.answer_count(3)
    assert lean.json() == {"route": "/", "body": "hold"} and not by_site(lean) and health.body == b"healthy"
    assert after.json() == {"route": "/", "body": "after"} and by_site(after), \
        "after a handoff the connection is the Site's: POST goes through web/rpc.py"


@ensure
async def test_a_request_split_over_packets_after_a_handoff_is_rebuilt_whole(serve):
    served = await serve()
    client = await served.client()
    request = post(b"abcde", b"/archiver")
    client.send(get(b"/health") + request[:20])
    await client.answer_count(1)
    client.send(request[20:-3])
    client.send(request[-3:] + post(b"raw", b"/pruned"))
    health, split, raw = await client.answer_count(3)
    assert split.json() == {"route": "/archiver", "body": "abcde"} and by_site(split)
    assert raw.json() == {"route": "/pruned", "body": "raw"} and by_site(raw)


@ensure
async def test_an_upgrade_request_is_handed_off_with_its_body_as_it_came(serve):
    served = await serve()
    client = await served.client()
    head = (b"POST /archiver HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Content-Length: 5\r\n\r\n")
    client.send(head + b"ab")
    client.send(b"cde")
    (upgraded,) = await client.answer_count(1)
    assert upgraded.json() == {"route": "/archiver", "body": "abcde"} and by_site(upgraded), "h2c is not offered"


@ensure
async def test_an_options_preflight_is_handed_off(serve):
    served = await serve()
    client = await served.client()
    client.send(b"OPTIONS / HTTP/1.1\r\nHost: g\r\nOrigin: https://app\r\nAccess-Control-Request-Method: POST\r\n\r\n")
    (answer,) = await client.answer_count(1)
    assert answer.status == 204 and answer.headers[b"access-control-allow-methods"] == b"POST, OPTIONS"
    assert served.path.calls == []


@ensure
async def test_a_non_rpc_post_with_a_chunked_body_is_rebuilt_for_the_site(serve):
    served = await serve()
    client = await served.client()
    client.send(b"POST /elsewhere HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
    await wait_for(lambda: b"100 Continue" in client.received, what="the 100 Continue")
    client.send(b"2\r\nab\r\n0\r\n\r\n" + post(b"then", b"/pruned"))
    interim, elsewhere, then = await client.answer_count(3)
    assert interim.status == 100 and elsewhere.status == 404 and elsewhere.body.endswith(b"2 bytes: ab")
    assert then.json()["route"] == "/pruned" and by_site(then)
    assert client.received.count(b"100 Continue") == 1


# ------------------------------------------------------------------------------ correct HTTP


@pytest.mark.parametrize("request_", [
    pytest.param(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", id="CL+TE"),
    pytest.param(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", id="TE+CL"),
    pytest.param(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", id="duplicate CL"),
    pytest.param(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", id="conflicting CL"),
    pytest.param(b"POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\nabcd", id="CL list"),
    pytest.param(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", id="bad chunk size"),
    pytest.param(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n", id="bad chunk end"),
    pytest.param(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n", id="TE not chunked last"),
    pytest.param(b"POST / HTTP/1.1\r\nContent-Length : 3\r\n\r\nabc", id="space before colon"),
    pytest.param(b"POST / HTTP/1.1\r\nX: a\r\n folded\r\nContent-Length: 0\r\n\r\n", id="obsolete folding"),
    pytest.param(b"POST / HTTP/1.1\nContent-Length: 0\n\n", id="bare LF"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", id="TLS hello"),
])
@ensure
async def test_ambiguous_or_malformed_requests_get_400_and_a_close(serve, request_):
    served = await serve()
    client = await served.client()
    client.send(post(b"before") + request_)
    before, refused = answers(await client.wait_closed())
    assert before.status == 200 and refused.status == 400 and refused.headers[b"connection"] == b"close"
    assert [call.body for call in served.path.calls] == [b"before"]


@ensure
async def test_only_http_1_x_is_served(serve):
    served = await serve()
    client = await served.client()
    client.send(post(b"x", version=b"2.0"))
    (refused,) = answers(await client.wait_closed())
    assert refused.status == 505 and served.path.calls == []


@ensure
async def test_a_transfer_coding_besides_chunked_is_not_implemented(serve):
    served = await serve()
    client = await served.client()
    client.send(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    (refused,) = answers(await client.wait_closed())
    assert refused.status == 501 and served.path.calls == []


@ensure
async def test_an_oversized_content_length_gets_413_without_the_body_being_read(serve):
    served = await serve()
    client = await served.client()
    client.send(post(b"", extra=b"").replace(b"Content-Length: 0", b"Content-Length: %d" % (MAX_BODY + 1)))
    (answer,) = answers(await client.wait_closed())  # answered although not one body byte was sent
    assert answer.status == 413 and answer.headers[b"connection"] == b"close"
    (call,) = served.path.calls
    assert call.too_large and call.body == b"" and not by_site(answer), "the request path writes (and counts) it"


@ensure
async def test_an_oversized_body_sent_anyway_does_not_reset_the_answer(serve):
    served = await serve()
    client = await served.client()
    client.send(post(b"x" * (300 * MAX_BODY)))
    (answer,) = answers(await client.wait_closed())
    assert answer.status == 413 and served.path.calls[0].too_large


@ensure
async def test_a_chunked_body_past_the_limit_gets_413(serve):
    served = await serve()
    client = await served.client()
    piece = b"y" * 400
    client.send(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"".join(b"190\r\n%s\r\n" % piece for _ in range(3)) + b"0\r\n\r\n")
    (answer,) = answers(await client.wait_closed())
    assert answer.status == 413 and served.path.calls[0].too_large and served.path.calls[0].body == b""


@ensure
async def test_expect_100_continue_is_answered_when_the_length_is_acceptable(serve):
    served = await serve()
    client = await served.client()
    client.send(post(b"", extra=b"Expect: 100-continue\r\n").replace(b"Content-Length: 0", b"Content-Length: 5"))
    await wait_for(lambda: client.received == b"HTTP/1.1 100 Continue\r\n\r\n", what="the 100 Continue")
    client.send(b"hello")
    interim, answer = await client.answer_count(2)
    assert interim.status == 100 and answer.json()["body"] == "hello"


@ensure
async def test_expect_100_continue_waits_for_earlier_answers(serve):
    served = await serve()
    client = await served.client()
    client.send(post(b"hold") + post(b"", extra=b"Expect: 100-continue\r\n").replace(b"Content-Length: 0",
                                                                                       b"Content-Length: 2"))
    await wait_for(lambda: served.path.held, what="the held POST")
    assert client.received == b""
    served.path.held[0].callback(None)
    await wait_for(lambda: client.received.endswith(b"HTTP/1.1 100 Continue\r\n\r\n"), what="the 100 after answer 1")
    client.send(b"ok")
    first, interim, second = await client.answer_count(3)
    assert (first.json()["body"], interim.status, second.json()["body"]) == ("hold", 100, "ok")


@ensure
async def test_expect_100_continue_with_an_oversized_length_gets_413_and_no_100(serve):
    served = await serve()
    client = await served.client()
    client.send(post(b"", extra=b"Expect: 100-continue\r\n").replace(b"Content-Length: 0",
                                                                     b"Content-Length: %d" % (10 * MAX_BODY)))
    data = await client.wait_closed()
    assert b"100 Continue" not in data and [a.status for a in answers(data)] == [413]


@ensure
async def test_headers_too_large_get_431(serve):
    served = await serve()
    client = await served.client()
    client.send(post(b"1", extra=b"X-Big: %s\r\n" % (b"v" * MAX_HEAD_BYTES)))
    (answer,) = answers(await client.wait_closed())
    assert answer.status == 431 and served.path.calls == []

    client = await served.client()
    client.send(post(b"1", extra=b"".join(b"X-H%d: v\r\n" % n for n in range(MAX_HEADERS + 1))))
    (answer,) = answers(await client.wait_closed())
    assert answer.status == 431 and served.path.calls == []


@ensure
async def test_a_header_that_never_ends_is_bounded(serve):
    served = await serve()
    client = await served.client()
    client.send(b"POST / HTTP/1.1\r\nX-Endless: ")
    for _ in range(3 * MAX_HEAD_BYTES // 4096 + 2):
        if client.is_closed:
            break
        client.send(b"v" * 4096)
    (answer,) = answers(await client.wait_closed())
    assert answer.status == 431


@ensure
async def test_a_large_head_and_body_arriving_together_are_fine(serve):
    served = await serve()
    client = await served.client()
    request = post(b"x" * MAX_BODY, extra=b"X-Pad: %s\r\n" % (b"p" * (MAX_HEAD_BYTES - 400)))
    client.send(request[:10])
    await wait_for(lambda: served.connections, what="the connection")
    client.send(request[10:])
    (answer,) = await client.answer_count(1)
    assert answer.status == 200 and len(served.path.calls[0].body) == MAX_BODY


# ------------------------------------------------------------------------ timeouts, leaving


@ensure
async def test_the_idle_timeout_closes_only_connections_with_nothing_in_flight(serve):
    clock = task.Clock()
    served = await serve(clock=clock, idle_timeout=10.0)
    idle = await served.client()
    busy = await served.client()
    stalled = await served.client()
    await wait_for(lambda: len(served.connections) == 3, what="the connections")
    stalled.send(b"POST / HTTP/1.1\r\nHost: gate")  # and nothing more
    clock.advance(9)
    busy.send(post(b"hold"))
    await wait_for(lambda: served.path.held, what="the held request")
    clock.advance(1.5)
    await idle.wait_closed()
    clock.advance(30)  # in flight: never idle; a request that never ends is no activity
    await stalled.wait_closed()
    served.path.held[0].callback(None)
    await busy.answer_count(1)
    clock.advance(9.9)
    assert not busy.is_closed and len(served.connections) == 1
    clock.advance(0.2)
    await busy.wait_closed()


@ensure
async def test_a_client_leaving_cancels_its_requests(serve):
    served = await serve()
    client = await served.client()
    client.send(post(b"hold-1") + post(b"hold-2"))
    await wait_for(lambda: len(served.path.held) == 2, what="both requests held")
    client.transport.loseConnection()
    await wait_for(lambda: len(served.path.cancelled) == 2, what="both handlers cancelled")
    assert not served.connections


@ensure
async def test_close_all_lets_the_answers_out_first(serve):
    served = await serve()
    lean = await served.client()
    handed = await served.client()
    lean.send(post(b"big"))
    handed.send(get(b"/hold"))
    await wait_for(lambda: served.others.held and len(served.connections) == 2, what="both requests")
    request = served.others.held[0]
    request.setHeader(b"content-length", b"%d" % BIG)
    request.write(b"h" * BIG)
    request.finish()
    lean_big = defer.Deferred.fromCoroutine(lean.wait_closed(10.0))
    await served.factory.connections.close_all(reactor, 10.0)
    assert not served.connections
    (answer,) = answers(await lean_big)
    assert answer.status == 200 and len(answer.body) == BIG
    (answer,) = answers(await handed.wait_closed())
    assert answer.status == 200 and answer.body == b"h" * BIG


@ensure
async def test_close_all_gives_up_a_request_still_in_flight(serve):
    """The drain waited its grace for the requests in flight already: what is left is cancelled."""
    served = await serve()
    client = await served.client()
    client.send(post(b"hold"))
    await wait_for(lambda: served.path.held, what="the held request")
    await served.factory.connections.close_all(reactor, 10.0)
    assert await client.wait_closed() == b"" and served.path.cancelled == [b"hold"]


# ------------------------------------------------------------------------------------ caller


@ensure
async def test_forwarded_for_from_a_trusted_proxy_and_the_key_reach_the_caller(serve):
    served = await serve(trusted_proxies="127.0.0.1")
    client = await served.client()
    client.send(post(b"1", b"/?key=k%2B1&x=2", b"X-Forwarded-For: 198.51.100.1, 203.0.113.7\r\nX-Request-ID: t-1\r\n"))
    client.send(post(b"2", b"/archiver", b"X-API-Key: header-key\r\n"))
    (first, second) = await client.answer_count(2)
    one, two = served.path.calls
    assert one.caller == Caller("t-1", "203.0.113.7", "k+1") and first.headers[b"x-request-id"] == b"t-1"
    assert two.caller.address == "127.0.0.1" and two.caller.api_key == "header-key"

    untrusted = await serve()
    client = await untrusted.client()
    client.send(post(b"3", extra=b"X-Forwarded-For: 203.0.113.7\r\n"))
    await client.answer_count(1)
    assert untrusted.path.calls[0].caller.address == "127.0.0.1"


def test_caller_from_plain_values():
    trusted = load_settings(cli={"backends": "http://a:1", "trusted_proxies": "10.0.0.0/8"}, environ={},
                            dotenv_path=None).trusted_proxies
    caller = caller_from(peer_address("::ffff:10.1.2.3"), {b"x-forwarded-for": b"192.0.2.9, 10.0.0.1"}, b"key=a+b",
                         trusted)
    assert (caller.address, caller.api_key) == ("192.0.2.9", "a b")
    assert len(caller.request_id) == 16
    assert caller_from("-", {b"x-request-id": b"bad id"}, b"").request_id != "bad id"
    assert caller_from("-", {b"x-api-key": b"h"}, b"key=q").api_key == "h"
    from twisted.web.http import parse_qs

    for query in (b"a=1&key&key=2", b"a=1", b"key=&key=3", b"x=1;key=%41+b", b"k%65y=4", b"key"):
        assert query_value(query, b"key") == (parse_qs(query, 1).get(b"key") or [None])[0], query


def test_the_twisted_web_adapter_reads_the_same_values():
    from twisted.web.test.requesthelper import DummyRequest

    request = DummyRequest([b""])
    request.client = IPv4Address("TCP", "::ffff:192.0.2.50", 1234)
    request.uri = b"/?key=q1&key=q2"
    request.requestHeaders.addRawHeader(b"X-Forwarded-For", b"192.0.2.1")
    request.requestHeaders.addRawHeader(b"X-Request-ID", b"rid-1")
    caller = caller_of(request)
    assert caller == Caller("rid-1", "192.0.2.50", "q1"), "untrusted: X-Forwarded-For is ignored"
