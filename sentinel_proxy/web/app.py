"""The Klein app: routes only. Work is handed to the forwarder and the status document.

The ``Site`` here turns off what costs time on every request without serving the gateway:
form parsing of POST bodies and twisted.web's access log (design.md). Request bodies are bounded
while they arrive, so an oversized body is never held in memory.
"""
from __future__ import annotations

import json
import re
from random import getrandbits as _random_bits  # ids need to be unique, not secret: no syscall
from typing import Any

from pathlib import Path

from klein import Klein
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web import pages
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.static import File

from sentinel_proxy.ops.admin import Admin, bearer, token_matches
from sentinel_proxy.state.backends import BackendPool
from sentinel_proxy.proxy.forwarder import Caller, Forwarder, Reply
from sentinel_proxy.ops.metrics import Metrics
from sentinel_proxy.state.status import health_document
from sentinel_proxy.ops.logs import observer
from sentinel_proxy.stores.ratelimit import client_ip
from sentinel_proxy.upstream.client import no_delay

log = Logger(observer=observer)

#: Shipped inside the package: operators run this in closed networks, so no CDN, no web fonts.
STATIC_DIR = Path(__file__).resolve().parent / "static"

_CORS_PREFLIGHT = (
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-methods", b"POST, OPTIONS"),
    (b"access-control-allow-headers", b"content-type, content-encoding, accept-encoding, x-request-id"),
    (b"access-control-max-age", b"86400"),
)


#: What a caller's X-Request-ID may look like to be reused: bounded, and safe in headers and logs.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}\Z")


def request_id_of(request: Request) -> str:
    """The caller's X-Request-ID when it is safe to reuse, else a fresh random one."""
    given = request.getHeader(b"x-request-id")
    if given is not None and _REQUEST_ID.match(given):
        return given.decode("ascii")
    return f"{_random_bits(64):016x}"


def caller_of(request: Request, trusted_proxies: tuple[Any, ...] = ()) -> Caller:
    """Who is asking: the connection's address, or X-Forwarded-For's client when the connection
    comes from a trusted proxy; and the API key from ``X-API-Key`` or ``?key=``."""
    peer = getattr(request.getClientAddress(), "host", None) or "-"
    address = client_ip(peer, request.requestHeaders.getRawHeaders(b"x-forwarded-for"), trusted_proxies)
    key = request.getHeader(b"x-api-key") or (request.args.get(b"key") or [None])[0]
    return Caller(request_id_of(request), address, key.decode("utf-8", "replace") if key is not None else None)


class BoundedRequest(Request):
    """Stops buffering a body once it passes ``max_body`` bytes and remembers that it did."""

    max_body = 1 << 20
    body_too_large = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self.body_too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        if self.content.tell() + len(data) > self.max_body:
            self.body_too_large = True
            self.content.seek(0)
            self.content.truncate()
            return
        super().handleContentChunk(data)


class StaticFiles(File):
    """The dashboard's assets, without a directory listing of the package folder."""

    def directoryListing(self) -> Any:
        return pages.notFound()


class GatewaySite(Site):
    """Tracks its client connections, so shutdown can let the last answers go out before closing."""

    noisy = False

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.channels: set[Any] = set()

    def buildProtocol(self, addr: Any) -> Any:
        channel = no_delay(super().buildProtocol(addr))
        self.channels.add(channel)
        lost = channel.connectionLost

        def connection_lost(reason: Any) -> None:
            self.channels.discard(channel)
            lost(reason)

        channel.connectionLost = connection_lost
        return channel

    async def close_connections(self, clock: IReactorTime, timeout: float) -> None:
        """Close every client connection once what was written to it has been sent.

        The reactor's own shutdown drops connections with their buffers unsent, so an answer
        finished a moment before the end of a drain would never reach its caller.
        """
        for channel in list(self.channels):
            # Site's protocol is a wrapper that picks HTTP/1.1 or HTTP/2; the transport is inside.
            transport = getattr(getattr(channel, "_channel", channel), "transport", None)
            if transport is not None:
                transport.loseConnection()
        deadline = clock.seconds() + timeout
        while self.channels and clock.seconds() < deadline:
            await task.deferLater(clock, 0.01, lambda: None)

    def log(self, request: Request) -> None:
        """No twisted.web access log: it costs ~90 µs per request; requests are counted in metrics."""


def make_site(resource: Any, max_body_bytes: int, idle_timeout: float = 60.0) -> GatewaySite:
    """``idle_timeout`` closes client connections that send nothing, so idle or stalled clients
    cannot hold sockets and memory forever."""
    request_factory = type("GatewayRequest", (BoundedRequest,), {"max_body": max_body_bytes})
    return GatewaySite(resource, requestFactory=request_factory, parsePOSTFormSubmission=False,
                       timeout=idle_timeout)


#: The RPC routes: request path -> route tag.
RPC_ROUTES = {b"/": "/", b"/archiver": "/archiver", b"/pruned": "/pruned"}


class GatewayRoot(Resource):
    """``POST`` on the RPC routes goes straight to the forwarder; everything else to the Klein app.

    Klein's routing, request adaptation and extra Deferred layers cost ~35 µs per request (8 % of
    the request path, profiled with py-spy): the routes that carry all the traffic skip them.
    """

    isLeaf = True

    def __init__(self, app: GatewayApp, routes: Any):
        super().__init__()
        self._app = app
        self._routes = routes

    def render(self, request: Request) -> Any:
        route = RPC_ROUTES.get(request.path) if request.method == b"POST" else None
        if route is None:
            return self._routes.render(request)
        handling = defer.Deferred.fromCoroutine(self._app.proxy(request, route))
        gone: list[bool] = []

        def client_left(_: Any) -> None:
            gone.append(True)
            handling.cancel()  # its upstream call is cancelled too

        def answer(body: bytes) -> None:
            if not gone:
                request.write(body)
                request.finish()

        def failed(failure: Failure) -> None:
            if failure.check(defer.CancelledError) or gone:
                return
            log.failure("request on {route} failed in the web layer", failure, route=route)
            request.setResponseCode(500)
            request.finish()

        request.notifyFinish().addErrback(client_left)
        handling.addCallbacks(answer, failed)
        return NOT_DONE_YET


class GatewayApp:
    app = Klein()

    def __init__(self, forwarder: Forwarder, pool: BackendPool, metrics: Metrics, clock: IReactorTime,
                 admin: Admin | None = None):
        self._forwarder = forwarder
        self._pool = pool
        self._metrics = metrics
        self._clock = clock
        self._started = clock.seconds()
        self._admin = admin
        self._token = ""
        self._protect_status = False
        self._trusted_proxies: tuple[Any, ...] = ()

    def configure_access(self, admin_token: str, protect_status: bool, trusted_proxies: tuple[Any, ...] = ()) -> None:
        """ADMIN_TOKEN, PROTECT_STATUS and TRUSTED_PROXIES (at start, and again on SIGHUP: tokens
        rotate live)."""
        self._token = admin_token
        self._protect_status = protect_status
        self._trusted_proxies = trusted_proxies

    def _refused(self, request: Request, for_status: bool = False) -> bytes | None:
        """None when the request may go on; else the answer: 404 when admin is off (the routes do
        not exist then), 401 without a token, 403 with a wrong one."""
        if for_status and not self._protect_status:
            return None
        if not self._token:
            if for_status:
                return None
            request.setResponseCode(404)
            return _json(request, {"error": "admin endpoints are disabled (ADMIN_TOKEN is not set)"})
        given = bearer(request.getHeader(b"authorization")) or request.getHeader(b"x-admin-token")
        if given is None:
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Bearer realm="sentinel-proxy"')
            return _json(request, {"error": "a token is required (Authorization: Bearer ...)"})
        if not token_matches(given, self._token):
            request.setResponseCode(403)
            return _json(request, {"error": "wrong token"})
        return None

    def resource(self) -> Resource:
        return GatewayRoot(self, self.app.resource())

    @staticmethod
    def _write(request: Request, reply: Reply) -> bytes:
        request.setResponseCode(reply.status)
        headers = request.responseHeaders
        for name, value in reply.headers:
            headers.addRawHeader(name, value)
        # The whole body is at hand: a length instead of chunked encoding, as the node itself sends.
        headers.setRawHeaders(b"content-length", [str(len(reply.body)).encode("ascii")])
        return reply.body

    async def proxy(self, request: Request, route: str) -> bytes:
        reply = await self._forwarder.handle(route, request.content.read(), request.requestHeaders,
                                             getattr(request, "body_too_large", False),
                                             caller_of(request, self._trusted_proxies))
        return self._write(request, reply)

    @app.route("/", methods=["OPTIONS"])
    @app.route("/archiver", methods=["OPTIONS"])
    @app.route("/pruned", methods=["OPTIONS"])
    def preflight(self, request: Request) -> bytes:
        """Browser wallets call nodes cross-origin; the nodes allow it (CORS ``*``), so do we."""
        request.setResponseCode(204)
        for name, value in _CORS_PREFLIGHT:
            request.responseHeaders.addRawHeader(name, value)
        return b""

    @app.route("/health", methods=["GET"])
    def health(self, request: Request) -> bytes:
        refused = self._refused(request, for_status=True)
        if refused is not None:
            return refused
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        document = health_document(self._pool, self._forwarder.totals, self._clock.seconds() - self._started)
        return json.dumps(document).encode()

    @app.route("/ready", methods=["GET"])
    def ready(self, request: Request) -> bytes:
        """Ready only with a healthy node, so a load balancer in front of several gateways can act."""
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
        if self._pool.any_healthy:
            return b"READY"
        request.setResponseCode(503)
        return b"NOT READY: no healthy backend"

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: Request) -> bytes:
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain; version=0.0.4; charset=utf-8"])
        return self._metrics.render()

    @app.route("/dashboard", methods=["GET"])
    def dashboard(self, request: Request) -> bytes:
        # The page itself holds no data; behind PROTECT_STATUS it asks /health with the token the
        # operator puts in the URL fragment (#token=...), which never leaves the browser otherwise.
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/html; charset=utf-8"])
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-cache"])
        return (STATIC_DIR / "dashboard.html").read_bytes()

    @app.route("/static/", branch=True, methods=["GET"])
    def static(self, request: Request) -> File:
        return StaticFiles(str(STATIC_DIR))

    @app.route("/admin/drain/<name>", methods=["POST"])
    def drain(self, request: Request, name: str) -> bytes:
        return self._drain(request, name, True)

    @app.route("/admin/undrain/<name>", methods=["POST"])
    def undrain(self, request: Request, name: str) -> bytes:
        return self._drain(request, name, False)

    def _drain(self, request: Request, name: str, drained: bool) -> bytes:
        refused = self._refused(request)
        if refused is not None:
            return refused
        assert self._admin is not None
        result = self._admin.drain(name, drained)
        if result is None:
            request.setResponseCode(404)
            return _json(request, {"error": f"no backend named {name!r}"})
        return _json(request, result)

    @app.route("/admin/check", methods=["POST"])
    async def check(self, request: Request) -> bytes:
        refused = self._refused(request)
        if refused is not None:
            return refused
        assert self._admin is not None
        return _json(request, await self._admin.check_now())

    @app.route("/admin/config", methods=["GET"])
    def config(self, request: Request) -> bytes:
        refused = self._refused(request)
        if refused is not None:
            return refused
        assert self._admin is not None
        return _json(request, self._admin.config())


def _json(request: Request, document: Any) -> bytes:
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
    return json.dumps(document).encode()
