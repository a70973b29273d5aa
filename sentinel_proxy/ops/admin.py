"""The operator's actions behind ADMIN_TOKEN: drain a node, check now, show the effective config.

Kept out of the web layer so the routes stay thin; every action reads or writes the same state the
checks and the request path use, and gets only the parts it acts on, so it can be built, and
tested, without a running gateway.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable, Protocol, Sequence

from twisted.internet import defer

from sentinel_proxy.settings import SECRET_SETTINGS, Settings
from sentinel_proxy.state.backends import Backend, BackendPool, display_url
from sentinel_proxy.stores.cache_address import parse_redis_url


class Check(Protocol):
    def run_once(self) -> defer.Deferred[Any]: ...


class Workers(Protocol):
    """The other --workers processes (ops/workers.py): they must drain what this one drained."""

    def drained(self, backend: Backend) -> None: ...


def mask_redis(url: str) -> str:
    if not url.startswith("redis://"):
        return url
    address = parse_redis_url(url)
    return str(address) if address.password is None else str(address).replace("://", "://***@", 1)


class Admin:
    """``settings`` and ``in_flight`` are getters: a reload replaces the settings, and the count
    changes with every request. ``workers`` is None in a single process."""

    def __init__(self, pool: BackendPool, checks: Sequence[Check], settings: Callable[[], Settings],
                 in_flight: Callable[[], int], workers: Workers | None = None):
        self._pool = pool
        self._checks = checks
        self._settings = settings
        self._in_flight = in_flight
        self._workers = workers

    def drain(self, name: str, drained: bool) -> dict[str, Any] | None:
        backend = self._pool.find(name)
        if backend is None:
            return None
        self._pool.drain(backend, drained)
        if self._workers is not None:
            self._workers.drained(backend)
        return {"backend": backend.name, "drained": backend.drained, "routing": backend.routing,
                "inFlight": self._in_flight()}

    async def check_now(self) -> dict[str, Any]:
        """Run the health and integrity checks now (all at once) and report the result."""
        await defer.gatherResults([check.run_once() for check in self._checks])
        return {"backends": [{"backend": b.name, "healthy": b.healthy, "blockNumber": b.block_number,
                              "integrityStatus": b.verdict.status if b.verdict else "", "routing": b.routing,
                              "lastError": b.last_error} for b in self._pool.backends]}

    def config(self) -> dict[str, Any]:
        """The effective settings, with every credential masked."""
        return {name: masked(name, value) for name, value in asdict(self._settings()).items()}


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
