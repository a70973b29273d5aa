"""Readiness, tip, chain identity and world-state depth of every node, in one batch per round."""
from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from sentinel_proxy.checks.client import NODE_ERRORS, RpcCallError
from sentinel_proxy.checks.periodic import PeriodicCheck
from sentinel_proxy.ops.logs import observer
from sentinel_proxy.state.backends import Backend

log = Logger(observer=observer)


def block_number_of(result: Any) -> int:
    """node_getBlockNumber answers a number; older nodes and proxies may send a numeric string."""
    if isinstance(result, bool):
        raise RpcCallError(f"node_getBlockNumber: not a number: {result!r}")
    if isinstance(result, int) and result >= 0:
        return result
    if isinstance(result, str) and result.isdigit():
        return int(result)
    raise RpcCallError(f"node_getBlockNumber: not a number: {result!r:.80}")


def chain_of(info: Any, headers: Headers) -> tuple[str, str] | None:
    """(l1ChainId, rollupVersion) from node_getNodeInfo, else from the ``x-aztec-*`` headers."""
    if isinstance(info, dict) and info.get("l1ChainId") is not None and info.get("rollupVersion") is not None:
        return str(info["l1ChainId"]), str(info["rollupVersion"])
    chain_id = headers.getRawHeaders(b"x-aztec-l1chainid")
    version = headers.getRawHeaders(b"x-aztec-rollupversion")
    if chain_id and version:
        return chain_id[0].decode("latin-1"), version[0].decode("latin-1")
    return None


def oldest_block_of(sync_status: Any) -> int | None:
    """``oldestHistoricBlockNumber`` from node_getWorldStateSyncStatus, when the node offers it."""
    if not isinstance(sync_status, dict):
        return None
    oldest = sync_status.get("oldestHistoricBlockNumber")
    if isinstance(oldest, int) and not isinstance(oldest, bool) and oldest >= 0:
        return oldest
    return None


#: One batch per node and round: readiness and tip decide health (the prototype's check); chain
#: identity, world-state depth and the finality tips (for the cache) come in the same round trip,
#: and may be missing on old nodes.
HEALTH_CALLS: tuple[tuple[str, list[Any]], ...] = (
    ("node_isReady", []), ("node_getBlockNumber", []), ("node_getNodeInfo", []),
    ("node_getWorldStateSyncStatus", []), ("node_getL2Tips", []),
)


class HealthService(PeriodicCheck):
    """Readiness and tip of every node; after each round, lag and chain quarantines are reassessed."""

    name_of_check = "health check"
    metric_name = "health"

    def run_once(self) -> defer.Deferred[Any]:
        return super().run_once().addCallback(lambda _: self._pool.reassess())

    async def check(self, backend: Backend) -> bool:
        started = self.clock.seconds()
        try:
            (ready, block, info, sync_status, tips), headers = await self._client.batch(
                backend, HEALTH_CALLS, self._timeout)
            if ready is not True:
                raise ready if isinstance(ready, RpcCallError) else RpcCallError(f"node_isReady answered {ready!r:.40}")
            if isinstance(block, RpcCallError):
                raise block
            block = block_number_of(block)
        except NODE_ERRORS as exc:
            if backend.healthy or backend.last_check is None:
                log.warn("backend {backend} is unhealthy: {reason}", backend=backend.name, reason=str(exc))
            self._pool.record_health(backend, False, self.clock.seconds(), error=str(exc))
            return False
        now = self.clock.seconds()
        if not backend.healthy:
            log.info("backend {backend} is healthy at block {block}", backend=backend.name, block=block)
        self._pool.record_health(backend, True, now, block_number=block, latency_ms=(now - started) * 1000.0,
                                 chain=chain_of(info, headers), oldest_block=oldest_block_of(sync_status),
                                 tips=None if isinstance(tips, RpcCallError) else tips)
        return True
