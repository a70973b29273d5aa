"""Answering from the cache: look calls up, share identical calls in flight, fetch the rest as one
sub-batch, and reassemble the answer in the caller's order with the caller's ids.

The sub-batch is the gateway's own request, so its calls carry the gateway's own ids (0, 1, ...):
the node's answer is matched to them by failover (by id, whatever order it comes in), and each
call's answer is put back under the caller's id bytes exactly as the caller wrote them, as are
cache hits and the answers shared with followers. A hit costs a look-up and a concatenation:
nothing is parsed or encoded on the way back.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable, Mapping

import msgspec
from twisted.internet import defer
from twisted.python.failure import Failure

from sentinel_proxy.core import jsonrpc
from sentinel_proxy.core.answers import MISSING, entry_from_store, entry_of, item_bytes, store_value
from sentinel_proxy.core.cache_policy import FOREVER, NEVER, NEVER_DECISION, RULES, Decision, Rule, decide, storable
from sentinel_proxy.interfaces import IResponseCache
from sentinel_proxy.ops.metrics import Metrics
from sentinel_proxy.proxy.coalesce import Entry, Flight, SharedCall, SingleFlight
from sentinel_proxy.proxy.values import JSON_HEADERS, HeaderPairs, Plan, Reply, error_reply


class Miss:
    """A call that goes upstream: ``flight`` is set when others may wait for its answer (and it is
    stored), None for a call that is never cached."""

    __slots__ = ("call", "decision", "flight")

    def __init__(self, call: jsonrpc.Call, decision: Decision, flight: Flight | None):
        self.call = call
        self.decision = decision
        self.flight = flight


class Lookup:
    """What the cache and the calls in flight give for one request, and what is left to fetch."""

    __slots__ = ("found", "misses", "shared", "counts")

    def __init__(self) -> None:
        self.found: dict[int, Entry] = {}
        self.misses: list[Miss] = []
        self.shared: list[tuple[jsonrpc.Call, defer.Deferred[Entry]]] = []
        self.counts = {"hit": 0, "miss": 0, "coalesced": 0}

    def release(self) -> None:
        """Stop waiting for the answers not awaited (the request failed or its caller left), so a
        shared call nobody waits for is cancelled and no failure is left unhandled."""
        for _, waiter in self.shared:
            if not waiter.called:
                waiter.cancel()
            waiter.addErrback(_ignored)


def _ignored(_: Failure) -> None:
    """A wait given up: its outcome concerns nobody."""


class Fetched:
    """The node's reply to the sub-batch, and each call's answer by the caller's position."""

    __slots__ = ("reply", "entries")

    def __init__(self, reply: Reply, entries: dict[int, Entry]):
        self.reply = reply
        self.entries = entries


def reassemble(parsed: jsonrpc.ParsedRequest, entries: Mapping[int, Entry]) -> bytes:
    """The caller's answer: every call's entry under the caller's id bytes, refused items in place."""
    if not parsed.is_batch:
        call = parsed.calls[0]
        return item_bytes(call.id, entries[call.position])
    parts: list[bytes] = [b""] * parsed.size
    for position, item in parsed.refused.items():
        parts[position] = item
    for call in parsed.calls:
        parts[call.position] = item_bytes(call.id, entries[call.position])
    return b"[" + b",".join(parts) + b"]"


#: The gateway's ids for the calls of its sub-batches: 0, 1, 2, ...
_SUB_IDS = [b"%d" % i for i in range(128)]
_EMPTY_PARAMS = b"[]"


def _method_json(method: str, known: dict[str, bytes] = {}) -> bytes:  # noqa: B006 - a cache on purpose
    encoded = known.get(method)
    if encoded is None:
        encoded = jsonrpc.encode(method)
        if len(known) < 4096:
            known[method] = encoded
    return encoded


def narrowed(plan: Plan, misses: list[Miss]) -> Plan:
    """The plan for the calls the cache could not answer, as a sub-batch of their own.

    The body is the gateway's: each call's method and params (as the caller wrote them) under
    the gateway's id, its index in the sub-batch. It goes without compression, and the answer is
    matched and taken apart by id.
    """
    calls = []
    items = []
    for index, miss in enumerate(misses):
        raw_id = _SUB_IDS[index] if index < len(_SUB_IDS) else b"%d" % index
        call = miss.call
        calls.append(call.renumbered(index, raw_id))
        params = call.params_raw
        items.append(b"".join((b'{"jsonrpc":"2.0","id":', raw_id, b',"method":', _method_json(call.method),
                               b',"params":', _EMPTY_PARAMS if params is None else params, b"}")))
    batch = plan.parsed.is_batch or len(calls) > 1
    body = b"[" + b",".join(items) + b"]" if batch else items[0]
    return plan.narrowed(jsonrpc.ParsedRequest(batch, tuple(calls), {}), body)


class Caching:
    """Between the guard and failover when a cache is configured: a call answered here, or by a
    call already in flight, costs no node anything."""

    def __init__(self, cache: IResponseCache, metrics: Metrics, volatile_ttl: float,
                 finalized: Callable[[], int | None], forward: Callable[[Plan], Awaitable[Reply]],
                 flights: SingleFlight | None = None, chain: Callable[[], Any] | None = None):
        self._cache = cache
        self._metrics = metrics
        self._volatile_ttl = volatile_ttl
        #: The finalized tip, read when deciding and again when storing: it may move while a call is out.
        self._finalized = finalized
        self._forward = forward
        #: The chain identity every key carries (``BackendPool.chain_identity``): while it is
        #: unknown nothing is cached. None: keys carry no chain (a stage not given the pool's chain).
        self._chain = chain
        self._flights = flights if flights is not None else SingleFlight()
        #: x-aztec-* headers of the latest answer from a node: a full cache hit still carries them,
        #: since clients check the chain and versions in them.
        self._aztec_headers: HeaderPairs = ()
        #: The reply headers by X-Cache value ("" for a batch), rebuilt when the x-aztec-* ones change.
        self._reply_headers: dict[bytes, HeaderPairs] = {}

    async def serve(self, plan: Plan) -> Reply | None:
        """Answer what the cache has, wait for identical calls already in flight, send the rest
        upstream as one sub-batch, and reassemble in the caller's order with the caller's ids.

        None when no call of the request is cacheable: it then passes through untouched (gzip and
        all), which costs less than taking it apart.
        """
        parsed = plan.parsed
        chain = None
        if self._chain is not None:
            chain = self._chain()
            if chain is None:  # no majority chain yet: an entry could be another chain's
                return None
        finalized = self._finalized()
        volatile_ttl = self._volatile_ttl
        decisions = []
        cacheable = False
        for call in parsed.calls:
            # The rule first: the params of a call never cached (a large node_sendTx) stay undecoded.
            if RULES.get(call.method, Rule.NEVER) is Rule.NEVER:
                decision = NEVER_DECISION
            else:
                decision = decide(call.method, call.params, finalized, volatile_ttl, chain)
                cacheable = cacheable or decision.kind != NEVER
            decisions.append(decision)
        if not cacheable:
            return None
        lookup = await self._look_up(parsed.calls, decisions)
        fetching = self._fetch_shared(plan, lookup.misses) if lookup.misses else None
        try:
            self._metrics.observe_cache(lookup.counts)
            fetched = None
            if fetching is not None:
                fetched = await fetching
                if isinstance(fetched, Reply):
                    return fetched.missed()
            entries = dict(lookup.found)
            if fetched is not None:
                entries.update(fetched.entries)
            for call, waiter in lookup.shared:
                try:
                    entries[call.position] = await waiter
                except defer.CancelledError:  # this request's caller went away
                    raise
                except Exception:  # the leading call failed at every node it tried
                    return error_reply(502, jsonrpc.UPSTREAM_FAILED, "Upstream node failed for a shared call",
                                       "upstream_error").missed()
        finally:
            lookup.release()
        return self._reply(parsed, entries, lookup.counts, None if fetched is None else fetched.reply)

    async def _look_up(self, calls: tuple[jsonrpc.Call, ...], decisions: list[Decision]) -> Lookup:
        """Classify each call: found in the cache, waiting for an identical call in flight, or a
        miss this request leads (others asking meanwhile wait for it).

        Flights are joined and led only once every look-up is back, and the caller starts their
        upstream call without waiting in between: a flight never exists without its call.
        """
        lookup = Lookup()
        left: list[tuple[jsonrpc.Call, Decision]] = []
        for call, decision in zip(calls, decisions):
            if decision.kind != NEVER:
                stored = await self._cache.get(decision.key)
                entry = entry_from_store(stored) if stored is not None else None
                if entry is not None:
                    lookup.found[call.position] = entry
                    lookup.counts["hit"] += 1
                    continue
            left.append((call, decision))
        leading: dict[bytes, Flight] = {}
        for call, decision in left:
            if decision.kind == NEVER:
                lookup.misses.append(Miss(call, decision, None))
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
        return lookup

    def _fetch_shared(self, plan: Plan, misses: list[Miss]) -> defer.Deferred[Fetched | Reply]:
        """:meth:`_fetch`, as a call this request shares with the followers of its flights: it goes
        on if this request's caller leaves while others wait (cancelled once nobody does)."""
        running = defer.Deferred.fromCoroutine(self._fetch(plan, misses))
        flights = [miss.flight for miss in misses if miss.flight is not None]
        if not flights:  # nobody else can wait for these calls: the request owns them alone
            return running
        return SharedCall(running, flights).leader()

    async def _fetch(self, plan: Plan, misses: list[Miss]) -> Fetched | Reply:
        """Send the calls the cache could not answer; store and share what comes back.

        A Reply is the failure the caller gets instead.
        """
        sub = narrowed(plan, misses)
        reply = await self._forward(sub)
        if reply.outcome not in ("ok", "rpc_error"):
            return reply
        items = reply.items
        if items is None:  # the node refused the sub-batch as a whole: its answer, as it is
            return reply
        aztec = tuple([pair for pair in reply.headers if pair[0].startswith(b"x-aztec-")])
        if aztec and aztec != self._aztec_headers:
            self._aztec_headers = aztec
            self._reply_headers = {}
        finalized = self._finalized()
        entries: dict[int, Entry] = {}
        for miss, item in zip(misses, items):
            call = miss.call
            entry = entries[call.position] = MISSING if item is None else entry_of(item)
            if miss.flight is None:
                continue
            miss.flight.resolve(entry)
            kind = entry.kind
            if kind == "error":
                continue
            result: Any = None
            if kind == "result":
                try:
                    result = msgspec.json.decode(item.result)
                except msgspec.DecodeError:  # a number out of range: nothing to reason about, not stored
                    continue
            ttl = storable(miss.decision, call.method, call.params, kind == "result", result, finalized)
            if ttl is not None:
                self._cache.set(miss.decision.key, store_value(entry), None if ttl == FOREVER else ttl)
        return Fetched(reply, entries)

    def _reply(self, parsed: jsonrpc.ParsedRequest, entries: dict[int, Entry], counts: dict[str, int],
               upstream: Reply | None) -> Reply:
        body = reassemble(parsed, entries)
        errors = bool(parsed.refused)
        if not errors:
            for entry in entries.values():
                if entry.kind == "error":
                    errors = True
                    break
        if parsed.is_batch:
            status = 200
            label = b""
        else:
            status = 400 if errors else 200
            label = b"HIT" if counts["hit"] else b"COALESCED" if counts["coalesced"] else b"MISS"
        headers = self._reply_headers.get(label)
        if headers is None:
            headers = JSON_HEADERS + self._aztec_headers + (((b"x-cache", label),) if label else ())
            self._reply_headers[label] = headers
        outcome = "rpc_error" if errors else "ok"
        if upstream is None:
            return Reply(status, body, headers, outcome=outcome, cache="hit")
        headers += tuple((name, value) for name, value in upstream.headers if name == b"x-sentinel-fallback")
        cache = "partial" if counts["hit"] or counts["coalesced"] else "miss"
        return Reply(status, body, headers, upstream.backend, outcome, upstream.attempts, cache=cache,
                     upstream_ms=upstream.upstream_ms)
