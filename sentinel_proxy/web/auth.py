"""Who is asking, and may they: request ids, the caller's address and API key, the admin token.

The rules read the running settings through a getter at each request, so a reload rotates
ADMIN_TOKEN or changes TRUSTED_PROXIES and PROTECT_STATUS without telling the web layer. Nothing
here writes an answer: a refusal is a value the routes turn into one.
"""
from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from random import getrandbits as _random_bits  # ids need to be unique, not secret: no syscall
from typing import Any, Callable

from twisted.web.server import Request

from sentinel_proxy.proxy.values import Caller
from sentinel_proxy.settings import Settings
from sentinel_proxy.stores.ratelimit import client_ip

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

    def refusal(self, request: Request, for_status: bool = False) -> Refusal | None:
        """None when the request may go on. Admin routes: 404 when admin is off (the routes do not
        exist then), 401 without a token, 403 with a wrong one. Status routes (``for_status``) need
        the token only with PROTECT_STATUS on and a token set."""
        settings = self._settings()
        if for_status and not settings.protect_status:
            return None
        if not settings.admin_token:
            return None if for_status else Refusal(404, "admin endpoints are disabled (ADMIN_TOKEN is not set)")
        given = bearer(request.getHeader(b"authorization")) or request.getHeader(b"x-admin-token")
        if given is None:
            return Refusal(401, "a token is required (Authorization: Bearer ...)", challenge=True)
        if not token_matches(given, settings.admin_token):
            return Refusal(403, "wrong token")
        return None
