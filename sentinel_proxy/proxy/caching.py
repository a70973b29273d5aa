"""Answering from the cache: look calls up, share identical calls in flight, fetch the rest as one
sub-batch, and reassemble the answer in the caller's order with the caller's ids."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Awaitable, Callable, Mapping

from twisted.internet import defer

from sentinel_proxy.core import answers, jsonrpc
from sentinel_proxy.core.answers import entry_from_store, item_bytes, store_value
from sentinel_proxy.core.cache_policy import FOREVER, NEVER, Decision, decide, storable
from sentinel_proxy.interfaces import IResponseCache
from sentinel_proxy.ops.metrics import Metrics
from sentinel_proxy.proxy.coalesce import Entry, Flight, SingleFlight
from sentinel_proxy.proxy.failover import answer_items
from sentinel_proxy.proxy.values import JSON_HEADERS, HeaderPairs, Plan, Reply, error_reply
from sentinel_proxy.upstream.client import UpstreamError


@dataclass(frozen=True, slots=True)
class Miss:
    """A call that goes upstream: ``flight`` is set when others may wait for its answer (and it is
    stored), None for a call that is never cached."""

    call: jsonrpc.Call
    decision: Decision
    flight: Flight | None


@dataclass(slots=True)
class Lookup:
    """What the cache and the calls in flight give for one request, and what is left to fetch."""

    found: dict[int, Entry] = field(default_factory=dict)
    misses: list[Miss] = field(default_factory=list)
    shared: list[tuple[jsonrpc.Call, defer.Deferred[Entry]]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"hit": 0, "miss": 0, "coalesced": 0})

    def release(self) -> None:
        """Never leave followers waiting (failure, cancellation): a flight already answered ignores this."""
        for miss in self.misses:
            if miss.flight is not None:
                miss.flight.fail(UpstreamError("transport", "the leading call did not complete"))


@dataclass(frozen=True, slots=True)
class Fetched:
    """The node's reply to the sub-batch, and each call's answer by the caller's position."""

    reply: Reply
    entries: dict[int, Entry]


def reassemble(parsed: jsonrpc.ParsedRequest, entries: Mapping[int, Entry]) -> bytes:
    """The caller's answer: every call's entry under the caller's id, refused items in place."""
    parts = {position: jsonrpc.encode(item) for position, item in parsed.refused.items()}
    for call in parsed.calls:
        parts[call.position] = item_bytes(call.request.get("id"), entries[call.position])
    return answers.assemble((parts[i] for i in range(parsed.size)), parsed.is_batch)


def narrowed(plan: Plan, misses: list[Miss]) -> Plan:
    """The plan for the calls the cache could not answer, as a sub-batch of their own.

    The answer is taken apart here, so it goes without compression, with a new body.
    """
    calls = tuple(jsonrpc.Call(i, miss.call.method, miss.call.request) for i, miss in enumerate(misses))
    batch = plan.parsed.is_batch or len(calls) > 1
    body = jsonrpc.encode([c.request for c in calls]) if batch else jsonrpc.encode(calls[0].request)
    return replace(plan, parsed=jsonrpc.ParsedRequest(batch, calls, {}), body=body, plain=True)


class Caching:
    """Between the guard and failover when a cache is configured: a call answered here, or by a
    call already in flight, costs no node anything."""

    def __init__(self, cache: IResponseCache, metrics: Metrics, volatile_ttl: float,
                 finalized: Callable[[], int | None], forward: Callable[[Plan], Awaitable[Reply]],
                 flights: SingleFlight | None = None):
        self._cache = cache
        self._metrics = metrics
        self._volatile_ttl = volatile_ttl
        #: The finalized tip, read when deciding and again when storing: it may move while a call is out.
        self._finalized = finalized
        self._forward = forward
        self._flights = flights if flights is not None else SingleFlight()
        #: x-aztec-* headers of the latest answer from a node: a full cache hit still carries them,
        #: since clients check the chain and versions in them.
        self._aztec_headers: HeaderPairs = ()

    async def serve(self, plan: Plan) -> Reply | None:
        """Answer what the cache has, wait for identical calls already in flight, send the rest
        upstream as one sub-batch, and reassemble in the caller's order with the caller's ids.

        None when no call of the request is cacheable: it then passes through untouched (gzip and
        all), which costs less than taking it apart.
        """
        parsed = plan.parsed
        finalized = self._finalized()
        decisions = [decide(c.method, c.request.get("params", []), finalized, self._volatile_ttl)
                     for c in parsed.calls]
        if all(d.kind == NEVER for d in decisions):
            return None
        lookup = await self._look_up(parsed.calls, decisions)
        try:
            self._metrics.observe_cache(lookup.counts)
            fetched = None
            if lookup.misses:
                fetched = await self._fetch(plan, lookup.misses)
                if isinstance(fetched, Reply):
                    return fetched
            entries = dict(lookup.found)
            if fetched is not None:
                entries.update(fetched.entries)
            for call, waiter in lookup.shared:
                try:
                    entries[call.position] = await waiter
                except Exception:  # the leading call failed at every node it tried
                    return error_reply(502, jsonrpc.UPSTREAM_FAILED, "Upstream node failed for a shared call",
                                       "upstream_error")
        finally:
            lookup.release()
        return self._reply(parsed, entries, lookup.counts, None if fetched is None else fetched.reply)

    async def _look_up(self, calls: tuple[jsonrpc.Call, ...], decisions: list[Decision]) -> Lookup:
        """Classify each call: found in the cache, waiting for an identical call in flight, or a
        miss this request leads (others asking meanwhile wait for it)."""
        lookup = Lookup()
        leading: dict[bytes, Flight] = {}
        try:
            for call, decision in zip(calls, decisions):
                if decision.kind == NEVER:
                    lookup.misses.append(Miss(call, decision, None))
                    continue
                stored = await self._cache.get(decision.key)
                entry = entry_from_store(stored) if stored is not None else None
                if entry is not None:
                    lookup.found[call.position] = entry
                    lookup.counts["hit"] += 1
                    continue
                flight = leading.get(decision.key)
                waiter = flight.wait() if flight is not None else self._flights.join(decision.key)
                if waiter is not None:
                    lookup.shared.append((call, waiter))
                    lookup.counts["coalesced"] += 1
                    continue
                leading[decision.key] = flight = self._flights.lead(decision.key)
                lookup.misses.append(Miss(call, decision, flight))
                lookup.counts["miss"] += 1
        except BaseException:
            lookup.release()
            raise
        return lookup

    async def _fetch(self, plan: Plan, misses: list[Miss]) -> Fetched | Reply:
        """Send the calls the cache could not answer; store and share what comes back.

        A Reply is the failure the caller gets instead.
        """
        sub = narrowed(plan, misses)
        reply = await self._forward(sub)
        if reply.outcome not in ("ok", "rpc_error"):
            return reply
        items = answer_items(reply.body, sub.parsed.is_batch, len(misses))
        if items is None:
            return error_reply(502, jsonrpc.UPSTREAM_FAILED, "Upstream node answered a batch with the wrong shape",
                               "upstream_error", reply.backend)
        aztec = tuple((name, value) for name, value in reply.headers if name.lower().startswith(b"x-aztec-"))
        if aztec:
            self._aztec_headers = aztec
        finalized = self._finalized()
        entries: dict[int, Entry] = {}
        for miss, item in zip(misses, items):
            call = miss.call
            entry = entries[call.position] = answers.entry_of(item)
            if miss.flight is None:
                continue
            miss.flight.resolve(entry)
            result = item.get("result") if isinstance(item, dict) else None
            ttl = storable(miss.decision, call.method, call.request.get("params", []), entry.kind == "result",
                           result, finalized, error=entry.kind == "error")
            if ttl is not None:
                self._cache.set(miss.decision.key, store_value(entry), None if ttl == FOREVER else ttl)
        return Fetched(reply, entries)

    def _reply(self, parsed: jsonrpc.ParsedRequest, entries: dict[int, Entry], counts: dict[str, int],
               upstream: Reply | None) -> Reply:
        body = reassemble(parsed, entries)
        errors = any(entry.kind == "error" for entry in entries.values()) or bool(parsed.refused)
        first = entries.get(0)
        status = 400 if not parsed.is_batch and first is not None and first.kind == "error" else 200
        headers = JSON_HEADERS + self._aztec_headers
        if not parsed.is_batch:
            headers += ((b"x-cache", b"HIT" if counts["hit"] else b"COALESCED" if counts["coalesced"] else b"MISS"),)
        outcome = "rpc_error" if errors else "ok"
        if upstream is None:
            return Reply(status, body, headers, outcome=outcome)
        headers += tuple((name, value) for name, value in upstream.headers if name == b"x-sentinel-fallback")
        return Reply(status, body, headers, upstream.backend, outcome, upstream.attempts)
