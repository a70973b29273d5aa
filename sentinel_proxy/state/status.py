"""The ``/health`` document: the prototype's JSON shape (names, nesting, types), plus additions.

Operators' scripts parse the prototype's fields, so those never change name or type; anything new
is an extra key beside them.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sentinel_proxy.core.agreement import parse_tips
from sentinel_proxy.state.backends import Backend, BackendPool
from sentinel_proxy.state.events import Timeline

#: What Go's zero ``time.Time`` marshals to: the prototype's ``lastCheck`` before any check.
NEVER = "0001-01-01T00:00:00Z"


@dataclass(slots=True)
class RequestTotals:
    """Gateway-wide request counts: ``requests`` and ``errors`` (any status >= 400) under ``metrics``
    in /health, as the prototype counted them; the dashboard tells the callers' errors (4xx: bad
    requests, refused keys, rate limits; and batch items refused) from the nodes' and the gateway's
    (5xx), since a caller's mistakes say nothing about the fleet."""

    requests: int = 0
    errors: int = 0
    caller_errors: int = 0
    rate_limited: int = 0
    refused_calls: int = 0
    node_errors: int = 0

    def record(self, status: int, refused_calls: int = 0) -> None:
        self.requests += 1
        self.refused_calls += refused_calls
        if status >= 400:
            self.errors += 1
            if status >= 500:
                self.node_errors += 1
            else:
                self.caller_errors += 1
                if status == 429:
                    self.rate_limited += 1

    def to_json(self) -> dict[str, int]:
        return {"requests": self.requests, "callerErrors": self.caller_errors, "rateLimited": self.rate_limited,
                "refusedCalls": self.refused_calls, "nodeErrors": self.node_errors}


def rfc3339(timestamp: float | None) -> str:
    if timestamp is None:
        return NEVER
    moment = datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def backend_document(backend: Backend) -> dict[str, Any]:
    verdict = backend.verdict
    document: dict[str, Any] = {
        "url": backend.label,
        "name": backend.name,
        "healthy": backend.healthy,
        "blockNumber": backend.block_number,
        "lastCheck": rfc3339(backend.last_check),
        "nodeType": backend.node_type,
        "integrityStats": {
            "missingEpochs": list(verdict.missing_epochs) if verdict else [],
            "inconsistentEpochs": list(verdict.inconsistent_epochs) if verdict else [],
            "integrityScore": verdict.score if verdict else 0,
            "integrityStatus": verdict.status if verdict else "",
            "priority": backend.priority,
        },
        "epochStats": {
            "currentEpoch": verdict.current_epoch if verdict else 0,
            "totalEpochs": verdict.total_epochs if verdict else 0,
            "oldestSlot": verdict.oldest_slot if verdict else 0,
            "lastProcessedSlot": verdict.last_processed_slot if verdict else 0,
        },
        "requestStats": {
            "avgLatency": round(backend.latency.average, 3),
            "maxLatency": round(backend.latency.maximum, 3),
            "minLatency": round(backend.latency.minimum, 3),
            "totalRequests": backend.total_requests,
            "totalErrors": backend.total_errors,
        },
        "lastError": backend.last_error,
        "routing": backend.routing,
        "quarantine": dict(backend.quarantine),
        "lag": backend.lag,
        "oldestBlock": backend.oldest_block,
        "breaker": {
            "state": backend.breaker.state,
            "transitions": [{"at": rfc3339(at), "state": state} for at, state in backend.breaker.transitions],
        },
        "chain": ({"l1ChainId": backend.chain[0], "rollupVersion": backend.chain[1]}
                  if backend.chain else None),
        "protocolContracts": backend.protocol_contracts,
    }
    if verdict is not None:
        document["integrity"] = verdict.to_json()
    document["tips"] = tips_document(backend)
    document["divergence"] = backend.divergence.to_json() if backend.divergence else None
    return document


def tips_document(backend: Backend) -> dict[str, Any] | None:
    """How the node's chain tips arrived last round, and the two that vote on agreement."""
    report = backend.tips_report
    if report is None:
        return None
    tips = parse_tips(backend.tips)
    return {
        "method": report.method,
        "ok": report.ok,
        "error": report.error,
        "finalized": tips.finalized.to_json() if tips else None,
        "proven": tips.proven.to_json() if tips and tips.proven else None,
    }


def agreement_document(pool: BackendPool) -> dict[str, Any]:
    """What the nodes agree on: the finalized tip the cache trusts, and the heights compared."""
    agreement = pool.agreement  # nodes by display name (BackendPool._reassess_agreement)
    return {
        "finalized": pool.finalized,
        "compared": [m.to_json() for m in agreement.majorities],
        "contested": agreement.contested.to_json() if agreement.contested else None,
        "diverged": sorted(agreement.diverged),
        "probeHeight": agreement.probe_height,
    }


def readiness(pool: BackendPool, now: float, draining: bool = False) -> tuple[bool, str]:
    """Whether the gateway can serve a call on ``/`` now, and if not why (the body of /ready's 503).

    The pool's own :meth:`~BackendPool.pick` decides, so /ready cannot drift from what the request
    path would do: no node at all (down, drained, quarantined), or only nodes whose breakers are
    open, which the request path tries as a last resort but a load balancer should route around.
    """
    if draining:
        return False, "draining: the gateway is shutting down"
    pick = pool.pick("/", now=now)
    if pick.backend is None:
        routing = sorted(Counter(b.routing for b in pool.backends).items())
        return False, "no node can take traffic on /: " + ", ".join(f"{n} {state}" for state, n in routing)
    if pick.fallback == "breaker":
        return False, "no node can take traffic on /: the circuit breaker of every eligible node is open"
    return True, "ready"


def health_document(pool: BackendPool, totals: RequestTotals, uptime: float) -> dict[str, Any]:
    return {
        "status": "healthy" if pool.any_healthy else "unhealthy",
        "uptime": round(uptime, 3),
        "backends": [backend_document(b) for b in pool.backends],
        "agreement": agreement_document(pool),
        "metrics": {
            "totalRequests": totals.requests,
            "totalErrors": totals.errors,
            "errorRate": round(totals.errors / totals.requests, 6) if totals.requests else 0.0,
        },
        **({"fleet": dict(pool.fleet)} if pool.fleet is not None else {}),
    }


_SINCE = {"drained": frozenset({"drained"}), "down": frozenset({"down"}),
          "quarantined": frozenset({"quarantined", "diverged"})}


def traffic_note(backend: Backend, timeline: Timeline) -> dict[str, Any] | None:
    """Why a node gets no traffic, or only fallback traffic, in one sentence, with since when
    (``since``: epoch seconds, None when the timeline does not reach back that far); None for a
    node that takes its share."""
    routing = backend.routing
    if routing == "drained":
        text = "no traffic: drained by an operator"
    elif routing == "down":
        text = "no traffic: down" + (f" ({backend.last_error})" if backend.last_error else "")
    elif routing == "quarantined":
        text = "no traffic: quarantined: " + "; ".join(backend.quarantine.values())
    elif backend.breaker.state == "open":
        opened = backend.breaker.transitions[-1][0] if backend.breaker.transitions else None
        return {"text": "no traffic: circuit breaker open", "since": opened}
    elif backend.breaker.state == "half-open":
        return {"text": "probing: circuit breaker half-open, a few calls test the node", "since": None}
    elif routing == "fallback":
        verdict = backend.verdict
        if verdict is None:
            why = "integrity not checked yet (no verdict yet)"
        elif verdict.status == "unverified":
            why = "integrity 'unverified'" + (f" ({verdict.findings[0]})" if verdict.findings else "")
        else:
            why = f"integrity '{verdict.status}' (score {verdict.score})"
        return {"text": f"fallback: {why}; traffic only when no trusted node can take it",
                "since": None}
    else:
        return None
    return {"text": text, "since": timeline.since(backend.name, _SINCE[routing])}
