"""The operator's actions behind ADMIN_TOKEN: drain a node, check now, show the effective config.

Kept out of web.py so the routes stay thin; every action reads or writes the same state the
checks and the request path use.
"""
from __future__ import annotations

import hmac
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from twisted.internet import defer

from sentinel_proxy.state.backends import display_url
from sentinel_proxy.stores.cache_address import parse_redis_url

if TYPE_CHECKING:
    from sentinel_proxy.tap import GatewayService

#: Settings whose values are secrets: shown as "***" (set) or "" (unset).
SECRET_SETTINGS = frozenset({"admin_token", "api_keys"})


def token_matches(given: bytes | None, token: str) -> bool:
    """Constant-time comparison, so the token cannot be guessed byte by byte from timings."""
    return given is not None and hmac.compare_digest(given, token.encode())


def bearer(authorization: bytes | None) -> bytes | None:
    if authorization is None or not authorization.lower().startswith(b"bearer "):
        return None
    return authorization[7:].strip()


def mask_redis(url: str) -> str:
    if not url.startswith("redis://"):
        return url
    address = parse_redis_url(url)
    return str(address) if address.password is None else str(address).replace("://", "://***@", 1)


class Admin:
    def __init__(self, service: GatewayService):
        self._service = service

    def drain(self, name: str, drained: bool) -> dict[str, Any] | None:
        backend = self._service.pool.find(name)
        if backend is None:
            return None
        self._service.pool.drain(backend, drained)
        return {"backend": backend.name, "drained": backend.drained, "routing": backend.routing,
                "inFlight": self._service.forwarder.in_flight}

    async def check_now(self) -> dict[str, Any]:
        """Run the health and integrity checks now (both, concurrently) and report the result."""
        service = self._service
        await defer.gatherResults([service.health.run_once(), service.integrity.run_once()])
        return {"backends": [{"backend": b.name, "healthy": b.healthy, "blockNumber": b.block_number,
                              "integrityStatus": b.verdict.status if b.verdict else "", "routing": b.routing,
                              "lastError": b.last_error} for b in service.pool.backends]}

    def config(self) -> dict[str, Any]:
        """The effective settings, with every credential masked."""
        return {name: masked(name, value) for name, value in asdict(self._service.settings).items()}


def masked(name: str, value: Any) -> Any:
    """A setting's value as it may be shown (in /admin/config and in reload log lines)."""
    if name in SECRET_SETTINGS:
        return "***" if value else ""
    if name == "backends":
        return [{"name": entry, "url": display_url(url)} for entry, url in value]
    if name in ("cache", "rate_limit"):
        return mask_redis(value)
    if name == "trusted_proxies":
        return [str(network) for network in value]
    return value
