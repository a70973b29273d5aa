"""Slow and greedy callers (issue 12, item 2): a request's head and body are held to deadlines that
no pace of bytes can stretch, on the lean server and on connections handed to twisted.web; and
connections are capped in total and per client address. Real loopback sockets, a ``task.Clock``
for the server's time (the ``serve`` fixture of tests/lean_support.py)."""
from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.logger import formatEvent, globalLogPublisher

from sentinel_proxy.ops.metrics import Metrics
from sentinel_proxy.state.backends import BackendPool
from sentinel_proxy.web.server import ClientLimits
from tests.http_raw import RawClient, answers
from tests.support import wait_for
from tests.lean_support import by_site, failures, get, post, serve

ensure = pytest_twisted.ensureDeferred
#: Fixtures of tests/lean_support.py, used by name.
__all__ = ["failures", "serve"]
LIMITS = ClientLimits(header_timeout=5.0, body_timeout=3.0)


def counted(metrics: Metrics, family: str, label: str) -> float:
    return getattr(metrics, family).labels(label).value


class Tally:
    """The bytes a protocol has read (so the clock moves only once they are in)."""

    def __init__(self, protocol) -> None:
        self.read = 0
        received = protocol.dataReceived

        def counting(data: bytes) -> None:
            self.read += len(data)
            received(data)

        protocol.dataReceived = counting


async def drip(served, client: RawClient, pieces: list[bytes], every: float) -> None:
    """Send ``pieces`` one at a time, ``every`` seconds of the server's clock apart, each read by
    the server before the clock moves."""
    await wait_for(lambda: len(served.connections) == 1, what="the connection")
    tally = getattr(client, "tally", None)
    if tally is None:
        (protocol,) = served.connections
        tally = client.tally = Tally(protocol)
    for piece in pieces:
        client.send(piece)
        wanted = tally.read + len(piece)
        await wait_for(lambda: tally.read >= wanted, what="the piece read by the server")
        served.clock.advance(every)


@ensure
async def test_a_head_dripped_byte_by_byte_gets_408_at_its_deadline(serve):
    metrics = Metrics(BackendPool([]))
    served = await serve(clock=task.Clock(), limits=LIMITS, metrics=metrics)
    client = await served.client()
    await wait_for(lambda: len(served.connections) == 1, what="the connection")
    served.clock.advance(50)  # idle before the request: the deadline counts from its first byte
    await drip(served, client, [b"POST / HTTP/1.1\r\n"] + [b"X-Drip: %d\r\n" % n for n in range(8)], 0.5)
    assert served.clock.seconds() == 54.5 and not client.is_closed, "every byte came, none restarts the deadline"
    served.clock.advance(0.5)
    (answer,) = answers(await client.wait_closed())
    assert answer.status == 408 and answer.headers[b"connection"] == b"close"
    assert served.path.calls == []
    assert counted(metrics, "client_timeouts", "header") == 1 and counted(metrics, "client_timeouts", "body") == 0


@ensure
async def test_a_body_dripped_gets_408_at_its_deadline_from_the_end_of_the_head(serve):
    metrics = Metrics(BackendPool([]))
    served = await serve(clock=task.Clock(), limits=LIMITS, metrics=metrics)
    client = await served.client()
    head = b"POST / HTTP/1.1\r\nHost: gateway\r\nContent-Length: 100\r\n\r\n"
    await drip(served, client, [head[:10]], 4.0)  # the head took 4 s of its 5
    await drip(served, client, [head[10:]] + [b"{"] * 5, 0.5)
    served.clock.advance(0.49)
    assert not client.is_closed, "the body has 3 s from the end of the head, not from the request's start"
    served.clock.advance(0.01)
    (answer,) = answers(await client.wait_closed())
    assert answer.status == 408 and served.path.calls == []
    assert counted(metrics, "client_timeouts", "body") == 1


@ensure
async def test_a_slow_request_within_its_deadlines_is_served_and_the_next_gets_its_own(serve):
    served = await serve(clock=task.Clock(), limits=LIMITS)
    client = await served.client()
    request = post(b'{"slow": true}')
    await drip(served, client, [request[:5], request[5:30]], 2.0)
    await drip(served, client, [request[30:-5]], 2.5)  # the head took 4.5 s: in time
    client.send(request[-5:])
    (answer,) = await client.answer_count(1)
    assert answer.status == 200
    await drip(served, client, [request[:20]], 4.9)
    assert not client.is_closed, "the second request's deadline counts from its own first byte"
    served.clock.advance(0.1)
    assert [a.status for a in answers(await client.wait_closed())] == [200, 408]


@ensure
async def test_a_head_for_the_site_is_held_to_the_same_deadline(serve):
    """A drip to ``GET /health`` is read by the lean server until its head is in: the same 408."""
    metrics = Metrics(BackendPool([]))
    served = await serve(clock=task.Clock(), limits=LIMITS, metrics=metrics)
    client = await served.client()
    await drip(served, client, [b"GET /health HTTP/1.1\r\n", b"Host: gate"], 2.5)
    (answer,) = answers(await client.wait_closed())
    assert answer.status == 408 and not by_site(answer)
    assert counted(metrics, "client_timeouts", "header") == 1


@ensure
async def test_after_the_handoff_the_site_holds_each_request_to_a_deadline(serve):
    """Handed off, the connection's bytes go straight to twisted.web, whose own timeout restarts on
    every byte: the channel holds each request, head and body, to the sum of the two deadlines."""
    metrics = Metrics(BackendPool([]))
    served = await serve(clock=task.Clock(), limits=LIMITS, metrics=metrics)
    client = await served.client()
    client.send(get(b"/health"))
    (answer,) = await client.answer_count(1)
    assert by_site(answer)
    (channel,) = served.factory.site.connections.protocols
    tally = Tally(channel)
    for piece in [b"GET /health HTTP/1.1\r\n"] + [b"X-Drip: 1\r\n"] * 14:
        client.send(piece)
        wanted = tally.read + len(piece)
        await wait_for(lambda: tally.read >= wanted, what="the piece read by the channel")
        served.clock.advance(0.5)
    assert not client.is_closed
    served.clock.advance(0.5)  # 8 s since the request's first byte
    assert [a.status for a in answers(await client.wait_closed())] == [200, 408]
    assert counted(metrics, "client_timeouts", "header") == 1


@ensure
async def test_after_the_handoff_a_dripped_body_is_counted_as_the_body_s(serve):
    metrics = Metrics(BackendPool([]))
    served = await serve(clock=task.Clock(), limits=LIMITS, metrics=metrics)
    client = await served.client()
    client.send(get(b"/health"))
    await client.answer_count(1)
    (channel,) = served.factory.site.connections.protocols
    client.send(b"POST /elsewhere HTTP/1.1\r\nHost: gateway\r\nContent-Length: 10\r\n\r\nab")
    await wait_for(lambda: channel.requests and channel.requests[-1].head_in, what="the head read")
    served.clock.advance(8.0)
    assert [a.status for a in answers(await client.wait_closed())] == [200, 408]
    assert counted(metrics, "client_timeouts", "body") == 1


@ensure
async def test_a_request_answered_by_the_site_leaves_no_deadline_running(serve):
    served = await serve(clock=task.Clock(), limits=LIMITS)
    client = await served.client()
    client.send(get(b"/health"))
    await client.answer_count(1)
    client.send(get(b"/health"))
    await client.answer_count(2)
    served.clock.advance(30.0)
    assert not client.is_closed and [a.status for a in client.answers] == [200, 200]


# ------------------------------------------------------------------------------ connection caps


async def connect_from(port: int, source: str) -> RawClient:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
    return await connectProtocol(endpoint, RawClient())


@ensure
async def test_connections_are_capped_per_client_address_and_in_total(serve):
    metrics = Metrics(BackendPool([]))
    served = await serve(limits=ClientLimits(max_connections=3, max_per_client=2), metrics=metrics)
    port = served.port.getHost().port
    first = [await connect_from(port, "127.0.0.1") for _ in range(2)]
    await wait_for(lambda: len(served.connections) == 2, what="two connections")
    third = await connect_from(port, "127.0.0.1")
    assert await third.wait_closed() == b"", "past the per-client cap: closed at once, nothing read"
    other = await connect_from(port, "127.0.0.2")
    await wait_for(lambda: len(served.connections) == 3, what="the other address's connection")
    fourth = await connect_from(port, "127.0.0.3")
    assert await fourth.wait_closed() == b"", "past the total cap"
    assert counted(metrics, "connections_refused", "per_client") == 1
    assert counted(metrics, "connections_refused", "total") == 1
    first[0].send(post(b"x"))
    (answer,) = await first[0].answer_count(1)
    assert answer.status == 200, "the connections held are served as before"
    first[1].transport.loseConnection()
    await wait_for(lambda: len(served.connections) == 2, what="a place freed")
    again = await connect_from(port, "127.0.0.1")
    again.send(post(b"y"))
    assert (await again.answer_count(1))[0].status == 200
    assert served.factory.clients == {"127.0.0.1": 2, "127.0.0.2": 1}
    for client in first + [other, again]:
        client.transport.loseConnection()
    await wait_for(lambda: not served.connections, what="every connection closed")
    assert served.factory.clients == {}, "nothing is kept for addresses with no connection"


@ensure
async def test_new_caps_apply_to_the_next_connection(serve):
    served = await serve(limits=ClientLimits(max_per_client=1))
    port = served.port.getHost().port
    held = await connect_from(port, "127.0.0.1")
    await wait_for(lambda: len(served.connections) == 1, what="the connection")
    refused = await connect_from(port, "127.0.0.1")
    await refused.wait_closed()
    served.factory.configure(ClientLimits(max_per_client=2))
    accepted = await connect_from(port, "127.0.0.1")
    accepted.send(post(b"z"))
    assert (await accepted.answer_count(1))[0].status == 200
    served.factory.configure(ClientLimits(max_per_client=1))
    assert not held.is_closed and not accepted.is_closed, "a lower cap closes nothing already held"
    for client in (held, accepted):
        client.transport.loseConnection()


@ensure
async def test_refusals_are_logged_at_most_once_a_second(serve):
    lines: list[str] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "sentinel_proxy.web.server" and "refused" in event.get("log_format", ""):
            lines.append(formatEvent(event))

    clock = task.Clock()
    served = await serve(clock=clock, limits=ClientLimits(max_connections=1))
    port = served.port.getHost().port
    held = await connect_from(port, "127.0.0.1")
    globalLogPublisher.addObserver(observe)
    try:
        for _ in range(3):
            await (await connect_from(port, "127.0.0.1")).wait_closed()
        clock.advance(1.0)
        for _ in range(2):
            await (await connect_from(port, "127.0.0.1")).wait_closed()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert len(lines) == 2, lines
    assert lines[0].startswith("refused 1 caller connections since the last such line (last: 127.0.0.1, over "
                               "MAX_CONNECTIONS)")
    assert lines[1].startswith("refused 3 caller connections"), "the ones not logged are counted into the next line"
    held.transport.loseConnection()



@ensure
async def test_a_reload_hands_the_new_limits_to_the_server_and_the_site(cluster):
    from dataclasses import replace

    from sentinel_proxy.service import reconfigure

    service, _ = await cluster.gateway([cluster.node("pruned")])
    assert service.server.limits == ClientLimits(10.0, 30.0, 4096, 256), "the settings' defaults"
    reconfigure(service, replace(service.settings, client_header_timeout_ms=2500, client_body_timeout_ms=4000,
                                 max_connections=7, max_connections_per_client=3))
    assert service.server.limits == ClientLimits(2.5, 4.0, 7, 3)
    assert service.server.tick == 2.5 and service.site.request_deadline == 6.5
