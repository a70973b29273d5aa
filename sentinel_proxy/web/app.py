"""The Klein app: every route but ``POST`` on the RPC routes (:mod:`sentinel_proxy.web.rpc`).

Routes only: the work is the status document's, the metrics', and :class:`~sentinel_proxy.ops.admin.Admin`'s.
Importing this module imports Klein, which installs the default reactor: import it late.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import IResource
from twisted.web.server import Request
from twisted.web.static import File

from sentinel_proxy.ops.admin import Admin
from sentinel_proxy.ops.metrics import Metrics
from sentinel_proxy.state.backends import BackendPool
from sentinel_proxy.state.history import History
from sentinel_proxy.state.status import RequestTotals, health_document, readiness
from sentinel_proxy.web.assets import STATIC_DIR, StaticFiles
from sentinel_proxy.web.auth import Access, Refusal

_CORS_PREFLIGHT = (
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-methods", b"POST, OPTIONS"),
    (b"access-control-allow-headers", b"content-type, content-encoding, accept-encoding, x-request-id, x-api-key"),
    (b"access-control-max-age", b"86400"),
)


def _json(request: Request, document: Any) -> bytes:
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
    return json.dumps(document).encode()


class GatewayApp:
    app = Klein()

    def __init__(self, pool: BackendPool, metrics: Metrics, totals: RequestTotals, clock: IReactorTime,
                 admin: Admin, access: Access, draining: Callable[[], bool], history: History | None = None):
        """``draining``: whether graceful shutdown has begun (then /ready answers 503 at once);
        ``history``: what /dashboard/history serves (None: that route answers 404)."""
        self._history = history
        self._pool = pool
        self._metrics = metrics
        self._totals = totals
        self._clock = clock
        self._started = clock.seconds()
        self._admin = admin
        self._access = access
        self._draining = draining

    def resource(self) -> IResource:
        return self.app.resource()

    def _refused(self, request: Request, for_status: bool = False) -> bytes | None:
        """None when the request may go on; else the refusal's answer."""
        return self._answer(request, self._access.refusal(request, for_status))

    def _answer(self, request: Request, refusal: Refusal | None) -> bytes | None:
        if refusal is None:
            return None
        request.setResponseCode(refusal.status)
        if refusal.challenge:
            request.setHeader(b"www-authenticate", b'Bearer realm="sentinel-proxy"')
        return _json(request, {"error": refusal.error})

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
        document = health_document(self._pool, self._totals, self._clock.seconds() - self._started)
        return json.dumps(document).encode()

    @app.route("/ready", methods=["GET"])
    def ready(self, request: Request) -> bytes:
        """Ready only while a call on ``/`` would find a node, so a load balancer in front of several
        gateways can act; never while shutting down (the load balancer moves first)."""
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
        ready, reason = readiness(self._pool, self._clock.seconds(), self._draining())
        if ready:
            return b"READY"
        request.setResponseCode(503)
        return f"NOT READY: {reason}".encode()

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: Request) -> bytes:
        refused = self._answer(request, self._access.metrics_refusal(request))
        if refused is not None:
            return refused
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain; version=0.0.4; charset=utf-8"])
        return self._metrics.render()

    @app.route("/dashboard", methods=["GET"])
    def dashboard(self, request: Request) -> bytes:
        # The page itself holds no data; behind PROTECT_STATUS it asks /health with the token the
        # operator puts in the URL fragment (#token=...), which never leaves the browser otherwise.
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/html; charset=utf-8"])
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-cache"])
        return (STATIC_DIR / "dashboard.html").read_bytes()

    @app.route("/dashboard/history", methods=["GET"])
    def history(self, request: Request) -> bytes:
        """The dashboard's charts and timeline: what this process knows (with --workers, the worker
        that answers), behind PROTECT_STATUS as /health is."""
        refused = self._refused(request, for_status=True)
        if refused is not None:
            return refused
        if self._history is None:
            request.setResponseCode(404)
            return _json(request, {"error": "no history in this gateway"})
        return _json(request, self._history.document())

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
        return _json(request, await self._admin.check_now())

    @app.route("/admin/config", methods=["GET"])
    def config(self, request: Request) -> bytes:
        refused = self._refused(request)
        if refused is not None:
            return refused
        return _json(request, self._admin.config())
