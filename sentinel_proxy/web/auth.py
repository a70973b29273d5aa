"""Who is asking, and may they: request ids, the caller's address and API key, the admin token.

The rules read the running settings through a getter at each request, so a reload rotates
ADMIN_TOKEN or METRICS_TOKEN, or changes TRUSTED_PROXIES, PROTECT_STATUS or PROTECT_METRICS,
without telling the web layer. Nothing here writes an answer: a refusal is a value the routes
turn into one.
"""
from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from random import getrandbits as _random_bits  # ids need to be unique, not secret: no syscall
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import unquote_to_bytes

from twisted.web.server import Request

from sentinel_proxy.ops.tracing import trace_context
from sentinel_proxy.proxy.values import Caller
from sentinel_proxy.settings import Settings
from sentinel_proxy.stores.ratelimit import client_ip

#: What a caller's X-Request-ID may look like to be reused: bounded, and safe in headers and logs.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}\Z")


def peer_address(host: str | None) -> str:
    """The connection's address as :func:`caller_from` takes it: normalised once per connection
    (IPv6 compressed, IPv4-mapped folded to IPv4), ``-`` when there is none (a UNIX socket)."""
    return client_ip(host, None, ()) if host else "-"


def request_id_from(given: bytes | None) -> str:
    """The caller's X-Request-ID when it is safe to reuse, else a fresh random one."""
    if given is not None and _REQUEST_ID.match(given):
        return given.decode("ascii")
    return f"{_random_bits(64):016x}"


def query_value(query: bytes, name: bytes) -> bytes | None:
    """The first value of ``name`` in a query string, read as twisted.web reads ``request.args``
    (``twisted.web.http.parse_qs(query, 1)``: fields split on ``&`` and ``;``, a field without
    ``=`` skipped, blank values kept), without parsing the other fields."""
    for part in query.split(b"&"):
        for field in part.split(b";"):
            key, equals, value = field.partition(b"=")
            if equals and unquote_to_bytes(key.replace(b"+", b" ")) == name:
                return unquote_to_bytes(value.replace(b"+", b" "))
    return None


def caller_from(peer: str, headers: Mapping[bytes, bytes], query: bytes = b"",
                trusted_proxies: Sequence[Any] = ()) -> Caller:
    """Who is asking, from plain values: ``peer`` as :func:`peer_address` gives it, ``headers`` the
    request's header names lower-cased to their values (a repeated header joined by ``", "``),
    ``query`` the raw query string (no ``?``).

    The address is the peer's, or X-Forwarded-For's client when the peer is a trusted proxy
    (:func:`~sentinel_proxy.stores.ratelimit.client_ip`); the API key is ``X-API-Key``'s, else
    ``?key=``'s; the trace context is a valid W3C ``traceparent`` (an invalid one is ignored, not
    refused). Pure, so the lean server (web/server.py) and twisted.web requests share it.
    """
    forwarded = headers.get(b"x-forwarded-for")
    address = peer if forwarded is None else client_ip(peer, [forwarded], trusted_proxies)
    key = headers.get(b"x-api-key") or (query_value(query, b"key") if query else None)
    traceparent = headers.get(b"traceparent")
    return Caller(request_id_from(headers.get(b"x-request-id")), address,
                  key.decode("utf-8", "replace") if key is not None else None,
                  None if traceparent is None else trace_context(traceparent, headers.get(b"tracestate")))


#: The headers :func:`caller_from` reads: all the twisted.web adapter copies out of a request.
_CALLER_HEADERS = (b"x-request-id", b"x-forwarded-for", b"x-api-key", b"traceparent", b"tracestate")


def caller_of(request: Request, trusted_proxies: Sequence[Any] = ()) -> Caller:
    """:func:`caller_from` for a twisted.web request (the routes the lean server hands off)."""
    headers = {}
    raw = request.requestHeaders
    for name in _CALLER_HEADERS:
        values = raw.getRawHeaders(name)
        if values:
            headers[name] = b", ".join(values)
    host = getattr(request.getClientAddress(), "host", None)
    return caller_from(peer_address(host), headers, request.uri.partition(b"?")[2], trusted_proxies)


def token_matches(given: bytes | None, token: str) -> bool:
    """Constant-time comparison, so the token cannot be guessed byte by byte from timings."""
    return given is not None and hmac.compare_digest(given, token.encode())


def bearer(authorization: bytes | None) -> bytes | None:
    if authorization is None or not authorization.lower().startswith(b"bearer "):
        return None
    return authorization[7:].strip()


@dataclass(frozen=True)
class Refusal:
    status: int
    error: str
    #: Ask for a token (``WWW-Authenticate``), as a 401 must.
    challenge: bool = False


class Access:
    def __init__(self, settings: Callable[[], Settings]):
        self._settings = settings

    def caller(self, request: Request) -> Caller:
        return caller_of(request, self._settings().trusted_proxies)

    def caller_from(self, peer: str, headers: Mapping[bytes, bytes], query: bytes) -> Caller:
        """:func:`caller_from` with the running TRUSTED_PROXIES (a reload may change them)."""
        return caller_from(peer, headers, query, self._settings().trusted_proxies)

    def refusal(self, request: Request, for_status: bool = False) -> Refusal | None:
        """None when the request may go on. Admin routes: 404 when admin is off (the routes do not
        exist then), 401 without a token, 403 with a wrong one. Status routes (``for_status``) need
        the token only with PROTECT_STATUS on and a token set."""
        settings = self._settings()
        if for_status and not settings.protect_status:
            return None
        if not settings.admin_token:
            return None if for_status else Refusal(404, "admin endpoints are disabled (ADMIN_TOKEN is not set)")
        return _checked(request, (settings.admin_token,))

    def metrics_refusal(self, request: Request) -> Refusal | None:
        """None when /metrics may be read: always, unless PROTECT_METRICS is on or METRICS_TOKEN is
        set; then with the admin token or METRICS_TOKEN (the configuration refuses PROTECT_METRICS
        with neither set, so a protected /metrics always has a key)."""
        settings = self._settings()
        if not (settings.protect_metrics or settings.metrics_token):
            return None
        return _checked(request, (settings.metrics_token, settings.admin_token))


def _checked(request: Request, tokens: Sequence[str]) -> Refusal | None:
    """401 without a token, 403 unless it is one of ``tokens`` (the empty ones open nothing)."""
    given = bearer(request.getHeader(b"authorization")) or request.getHeader(b"x-admin-token")
    if given is None:
        return Refusal(401, "a token is required (Authorization: Bearer ...)", challenge=True)
    if not any(token and token_matches(given, token) for token in tokens):
        return Refusal(403, "wrong token")
    return None
