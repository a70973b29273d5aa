"""``POST`` on the RPC routes goes straight to the request path; everything else to the Klein app.

Klein's routing, request adaptation and extra Deferred layers cost ~35 µs per request (8 % of
the request path, profiled with py-spy): the routes that carry all the traffic skip them.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol
from urllib.parse import unquote_to_bytes

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from sentinel_proxy.ops.logs import observer
from sentinel_proxy.proxy.values import Caller, Reply
from sentinel_proxy.web.auth import Access

log = Logger(observer=observer)

#: The RPC routes: request path -> route tag.
RPC_ROUTES = {b"/": "/", b"/archiver": "/archiver", b"/pruned": "/pruned"}


class RequestHandler(Protocol):
    """The request path, as the web layer calls it."""

    async def handle(self, route: str, body: bytes, headers: Mapping[bytes, bytes], body_too_large: bool,
                     caller: Caller) -> Reply: ...


def header_map(request: Request) -> dict[bytes, bytes]:
    """The request's headers as the request path takes them: names lower-cased, a repeated
    header's values joined with ", "."""
    headers = {}
    for name, values in request.requestHeaders.getAllRawHeaders():
        headers[name.lower()] = values[0] if len(values) == 1 else b", ".join(values)
    return headers


def write_reply(request: Request, reply: Reply) -> bytes:
    request.setResponseCode(reply.status)
    headers = request.responseHeaders
    for name, value in reply.headers:
        headers.addRawHeader(name, value)
    # The whole body is at hand: a length instead of chunked encoding, as the node itself sends.
    headers.setRawHeaders(b"content-length", [str(len(reply.body)).encode("ascii")])
    return reply.body


def _utf8(text: bytes) -> bool:
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class RpcResource(Resource):
    isLeaf = True

    def __init__(self, handler: RequestHandler, access: Access, other_routes: IResource):
        super().__init__()
        self._handler = handler
        self._access = access
        self._other_routes = other_routes

    def render(self, request: Request) -> Any:
        route = RPC_ROUTES.get(request.path) if request.method == b"POST" else None
        if route is None:
            if not _utf8(unquote_to_bytes(request.path)) or not _utf8(request.getRequestHostname()):
                # Klein would log a traceback for each such request: a caller could fill the log.
                request.setResponseCode(400)
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return b"Non-UTF-8 encoding in URL.\n"
            return self._other_routes.render(request)
        handling = defer.Deferred.fromCoroutine(self._proxy(request, route))
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

    async def _proxy(self, request: Request, route: str) -> bytes:
        reply = await self._handler.handle(route, request.content.read(), header_map(request),
                                           getattr(request, "body_too_large", False), self._access.caller(request))
        return write_reply(request, reply)
