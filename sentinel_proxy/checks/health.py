"""Readiness, tip, chain identity, world-state depth and finality tips of every node, in one batch per round."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from sentinel_proxy.checks.client import NODE_ERRORS, CallError, RpcCallError
from sentinel_proxy.checks.periodic import PeriodicCheck
from sentinel_proxy.core.agreement import parse_tips
from sentinel_proxy.ops.logs import observer
from sentinel_proxy.state.backends import Backend, TipsReport

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


def protocol_contracts_of(headers: Headers) -> str | None:
    """The protocol-contracts hash of the node's ``x-aztec-l2ProtocolContractsHash`` header (every
    answer carries it; ``node_getNodeInfo`` does not), lower-cased; None when the node sends none."""
    values = headers.getRawHeaders(b"x-aztec-l2protocolcontractshash")
    value = values[0].decode("latin-1").strip().lower() if values else ""
    return value or None


def oldest_block_of(sync_status: Any) -> int | None:
    """``oldestHistoricBlockNumber`` from node_getWorldStateSyncStatus, when the node offers it."""
    if not isinstance(sync_status, dict):
        return None
    oldest = sync_status.get("oldestHistoricBlockNumber")
    if isinstance(oldest, int) and not isinstance(oldest, bool) and oldest >= 0:
        return oldest
    return None


#: The calls of every health round, in one batch per node: readiness and tip decide health (the
#: prototype's check); chain identity and world-state depth come in the same round trip, and may
#: be missing on old nodes. Both 4.x and 5.x serve these under ``node_*`` (5.x registers its
#: ``aztec_*`` handlers under the legacy ``node_`` namespace too, docs/aztec-protocol.md), so one
#: set of names fits every node and the first round needs no guess at its version.
HEALTH_CALLS: tuple[tuple[str, list[Any]], ...] = (
    ("node_isReady", []), ("node_getBlockNumber", []), ("node_getNodeInfo", []),
    ("node_getWorldStateSyncStatus", []),
)

#: Where the finality tips come from, in order of preference: 4.x (and 2.x/3.x) answer
#: ``node_getL2Tips``; 5.x renamed it ``getChainTips`` (same shape) in both namespaces, and answers
#: ``getL2Tips`` with -32601. The first that answers is remembered per node and asked alone; all of
#: them are asked (in the same batch) while none is known, and again when the remembered one
#: answers -32601 (the node was upgraded or downgraded).
TIPS_METHODS = ("node_getL2Tips", "node_getChainTips", "aztec_getChainTips", "aztec_getL2Tips")

#: JSON-RPC "method not found", what both dialects answer for a method they do not serve.
METHOD_NOT_FOUND = -32601


def missing(answer: Any) -> bool:
    """Whether an answer says the node does not serve the method at all."""
    return isinstance(answer, CallError) and answer.code == METHOD_NOT_FOUND


def archive_call(tips_method: str, height: int) -> tuple[str, list[Any]] | None:
    """The call that gives the archive root after block ``height``, in the dialect of ``tips_method``.

    4.x has no call that gives a block's hash by number (``getBlock`` and ``getBlockHeader`` carry
    the header, whose hash the gateway cannot compute), but the header of block n+1 carries the
    archive root after block n (``lastArchive``). 5.x dropped ``getBlockHeader``; its
    ``getBlockData(n)`` carries ``archive`` (the root after block n).
    """
    namespace, _, name = tips_method.partition("_")
    if tips_method == "node_getL2Tips":
        return "node_getBlockHeader", [height + 1]
    if name == "getChainTips":
        return f"{namespace}_getBlockData", [height]
    return None


def archive_of(method: str, height: int, answer: Any) -> tuple[int, str] | None:
    """(height, archive root after it) from an :func:`archive_call` answer, else None."""
    if not isinstance(answer, dict):
        return None
    if method.endswith("_getBlockHeader"):
        header, number, snapshot = answer, height + 1, answer.get("lastArchive")
    else:
        header, number, snapshot = answer.get("header"), height, answer.get("archive")
    variables = header.get("globalVariables") if isinstance(header, dict) else None
    said = variables.get("blockNumber") if isinstance(variables, dict) else None
    if said is not None and str(said) != str(number):
        return None  # the answer is about another block: no vote
    root = snapshot.get("root") if isinstance(snapshot, dict) else None
    if isinstance(root, str) and root.startswith("0x") and len(root) > 2:
        return height, root.lower()
    return None


@dataclass(frozen=True, slots=True)
class Plan:
    """One health batch: its calls, the tips methods asked, and the archive call at ``probe``."""

    calls: list[tuple[str, list[Any]]]
    tips: tuple[str, ...]
    archive: tuple[str, list[Any]] | None
    probe: int | None


class HealthService(PeriodicCheck):
    """Readiness, tip and finality tips of every node; after each round, chain, divergence and lag
    quarantines are reassessed."""

    name_of_check = "health check"
    metric_name = "health"

    def run_once(self) -> defer.Deferred[Any]:
        return super().run_once().addCallback(lambda _: self._pool.reassess())

    def _plan(self, backend: Backend) -> Plan:
        """This round's calls: the health calls, the tips method (all candidates while unknown), and
        the archive root at the pool's probe height when the nodes' finalized heights differed."""
        tips = (backend.tips_method,) if backend.tips_method else TIPS_METHODS
        probe = self._pool.agreement.probe_height
        extra = archive_call(backend.tips_method, probe) if backend.tips_method and probe is not None else None
        calls = [*HEALTH_CALLS, *((method, []) for method in tips), *([extra] if extra else [])]
        return Plan(calls, tips, extra, probe)

    async def check(self, backend: Backend) -> bool:
        """One deadline (HEALTH_CHECK_TIMEOUT_MS) for the whole check, a second batch included."""
        started = self.clock.seconds()
        deadline = started + self._timeout
        try:
            plan = self._plan(backend)
            results, headers = await self._client.batch(backend, plan.calls, self._timeout)
            remembered = backend.tips_method
            if remembered is not None and missing(results[len(HEALTH_CALLS)]):
                # Upgraded (4.x -> 5.x) or downgraded behind the same URL: one more batch, this round
                # only, so that the node's vote for the finalized tip is not lost for a round.
                log.info("backend {backend} no longer answers {method} (-32601): detecting its tips method again",
                         backend=backend.name, method=remembered)
                backend.tips_method = None
                plan = self._plan(backend)
                results, headers = await self._client.batch(backend, plan.calls, deadline - self.clock.seconds())
            ready, block, info, sync_status = results[:len(HEALTH_CALLS)]
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
        tips, report = self._tips(backend, plan.tips, results[len(HEALTH_CALLS):len(HEALTH_CALLS) + len(plan.tips)])
        archive = None
        if plan.archive is not None and plan.probe is not None:
            archive = archive_of(plan.archive[0], plan.probe, results[-1])
        self._pool.record_health(backend, True, now, block_number=block, latency_ms=(now - started) * 1000.0,
                                 chain=chain_of(info, headers), protocol_contracts=protocol_contracts_of(headers),
                                 oldest_block=oldest_block_of(sync_status),
                                 tips=tips, tips_report=report, archive=archive)
        return True

    def _tips(self, backend: Backend, methods: tuple[str, ...], answers: list[Any]) -> tuple[Any, TipsReport]:
        """The tips document and how it arrived; remembers the method that answered, and logs
        each change of state once (tips arriving, stopping, coming back, changing method)."""
        errors: list[str] = []
        found: tuple[str, Any] | None = None
        for method, answer in zip(methods, answers):
            if isinstance(answer, RpcCallError):
                errors.append(str(answer))
            elif parse_tips(answer) is None:
                errors.append(f"{method}: no readable finalized tip in {json.dumps(answer)[:120]}")
            else:
                found = method, answer
                break
        if found is not None:
            report = TipsReport(found[0], True)
            backend.tips_method = found[0]
        elif len(methods) > 1 and all(missing(answer) for answer in answers):
            report = TipsReport(None, False, f"no tips method: {', '.join(methods)} all answered -32601 (method not found)")
        else:
            report = TipsReport(backend.tips_method, False, "; ".join(errors)[:400])
        before = backend.tips_report
        if not report.ok and (before is None or before.ok):
            log.warn("backend {backend} gives no finalized tip ({method}): {error}; the finalized tip is agreed "
                     "without it", backend=backend.name, method=report.method or "no method found",
                     error=report.error)
        elif report.ok and (before is None or not before.ok):
            log.info("backend {backend} reports its tips with {method}", backend=backend.name, method=report.method)
        elif report.ok and before is not None and before.method != report.method:
            log.info("backend {backend} reports its tips with {method} now (was {previous})", backend=backend.name,
                     method=report.method, previous=before.method)
        return (found[1] if found else None), report
