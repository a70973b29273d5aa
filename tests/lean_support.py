"""The lean HTTP/1.1 server on loopback for tests (tests/test_http_server.py, test_slow_clients.py,
test_drain.py): a fake request path with ``RequestPath.handle``'s signature that echoes what it got,
a small real twisted.web Site (RpcResource in front of a few routes) behind the handoff, the
``serve`` and ``failures`` fixtures, and raw request builders."""
from __future__ import annotations

import gc
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from sentinel_proxy.config import load_settings
from sentinel_proxy.proxy.values import JSON_HEADERS, Caller, Reply
from sentinel_proxy.web.auth import Access
from sentinel_proxy.web.rpc import RpcResource
from sentinel_proxy.web.server import ClientLimits, LeanServerFactory
from sentinel_proxy.web.site import make_site
from tests.http_raw import Answer, RawClient, connect

MAX_BODY = 1000
BIG = 8 << 20  # more than the kernel takes at once: most of an answer this big waits in Twisted's buffer


@dataclass
class Call:
    route: str
    body: bytes
    headers: dict[bytes, bytes]
    too_large: bool
    caller: Caller


class EchoPath:
    """``RequestPath.handle``'s signature. A body starting with ``hold`` waits for the test; ``big``
    gets an answer of BIG bytes."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.held: list[defer.Deferred[None]] = []
        self.cancelled: list[bytes] = []

    async def handle(self, route: str, body: bytes, headers: Mapping[bytes, bytes], body_too_large: bool,
                     caller: Caller) -> Reply:
        self.calls.append(Call(route, body, dict(headers), body_too_large, caller))
        if body.startswith(b"hold"):
            held: defer.Deferred[None] = defer.Deferred()
            self.held.append(held)
            try:
                await held
            except defer.CancelledError:
                self.cancelled.append(body)
                raise
        if body_too_large:
            return Reply(413, b'{"error":"too large"}')
        if body.startswith(b"big"):
            return Reply(200, b"b" * BIG)
        echo = {"route": route, "body": body.decode("latin-1")}
        return Reply(200, json.dumps(echo).encode(), JSON_HEADERS + ((b"x-request-id", caller.request_id.encode()),))


class Others(Resource):
    """What the Site serves besides the RPC routes: /health, /hold (waits for the test), preflights."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Request] = []

    def render_GET(self, request: Request) -> Any:
        if request.path == b"/hold":
            self.held.append(request)
            return NOT_DONE_YET
        if request.path == b"/health":
            return b"healthy"
        request.setResponseCode(404)
        return b"no such route"

    def render_POST(self, request: Request) -> bytes:
        request.setResponseCode(404)
        return b"no such route; %d bytes: %s" % (len(request.content.getvalue()), request.content.getvalue())

    def render_OPTIONS(self, request: Request) -> bytes:
        request.setResponseCode(204)
        request.setHeader(b"access-control-allow-origin", b"*")
        request.setHeader(b"access-control-allow-methods", b"POST, OPTIONS")
        return b""


@dataclass
class Served:
    factory: LeanServerFactory
    path: EchoPath
    others: Others
    port: Any
    clock: Any
    clients: list[RawClient] = field(default_factory=list)

    async def client(self) -> RawClient:
        client = await connect(self.port.getHost().port)
        self.clients.append(client)
        return client

    @property
    def connections(self) -> set:
        return self.factory.connections.protocols

    def server_protocol(self) -> Any:
        (protocol,) = self.connections
        return protocol


@pytest.fixture
def failures():
    """Every failure logged while the test runs (there must be none)."""
    logged: list[dict] = []

    def observe(event: dict) -> None:
        if "log_failure" in event:
            logged.append(event)

    globalLogPublisher.addObserver(observe)
    yield logged
    globalLogPublisher.removeObserver(observe)


@pytest_twisted.async_yield_fixture
async def serve(failures):
    """``await serve(**options)`` starts a server: ``clock`` (default the reactor), ``idle_timeout``,
    ``trusted_proxies``, ``limits``, ``metrics``."""
    started: list[Served] = []

    async def start(clock: Any = reactor, idle_timeout: float = 60.0, trusted_proxies: str = "",
                    limits: ClientLimits = ClientLimits(), metrics: Any = None) -> Served:
        settings = load_settings(cli={"backends": "http://a:1", "trusted_proxies": trusted_proxies}, environ={},
                                 dotenv_path=None)
        access = Access(lambda: settings)
        path, others = EchoPath(), Others()
        site = make_site(RpcResource(path, access, others), MAX_BODY, idle_timeout, metrics, clock)
        factory = LeanServerFactory(path, access, site, clock, MAX_BODY, idle_timeout, limits, metrics)
        served = Served(factory, path, others, reactor.listenTCP(0, factory, interface="127.0.0.1"), clock)
        started.append(served)
        return served

    yield start
    for served in started:
        for client in served.clients:
            if client.transport is not None and not client.is_closed:
                client.transport.abortConnection()
        await served.factory.connections.close_all(reactor, 2.0)
        await defer.maybeDeferred(served.port.stopListening)  # a test may have stopped it already
    gc.collect()  # an unhandled error in a Deferred is logged when the Deferred is collected
    assert not failures, [event.get("log_format") for event in failures]


def post(body: bytes, path: bytes = b"/", extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return (b"POST %s HTTP/%s\r\nHost: gateway\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path, version, len(body), extra, body))


def get(path: bytes, extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: gateway\r\n%s\r\n" % (path, extra)


def by_site(answer: Answer) -> bool:
    """twisted.web names itself in every answer; the lean server does not."""
    return answer.headers.get(b"server", b"").startswith(b"TwistedWeb")
