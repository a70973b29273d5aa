"""Getting an answer from some node: pick, attempt, judge, fail over, hedge.

Every attempt's outcome goes to the node's state through ``BackendPool.record_outcome``, so the
breakers and the hedge delay learn from real traffic.
"""
from __future__ import annotations

import re
import zlib
from typing import Any

import msgspec

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sentinel_proxy.core import answers, jsonrpc, methods
from sentinel_proxy.interfaces import IForwardingClient
from sentinel_proxy.ops.logs import observer
from sentinel_proxy.ops.metrics import Metrics
from sentinel_proxy.ops.tracing import NO_TRACER, Tracer
from sentinel_proxy.proxy.values import JSON_HEADERS, Attempt, Plan, Reply, error_reply
from sentinel_proxy.state.backends import Backend, BackendPool
from sentinel_proxy.upstream.response import LocalError, LocalErrors, UpstreamError, UpstreamResponse

log = Logger(observer=observer)

#: Hedge delay while a node has too few answers for a p95.
DEFAULT_HEDGE_DELAY = 0.05
#: Attempt failures after which another node may get the same call (when it is safe to repeat).
_RETRYABLE = frozenset({"timeout", "connect", "transport", "bad_answer"})
#: What a node answers when the request it got is at fault, not the node: bad syntax, a body too
#: large or of a type it refuses, or content it cannot process. Such an answer with no usable
#: JSON-RPC body is the caller's (kind "caller_error"): another node would answer the same.
#: 401/403/404/405/408/429 stay the node's: they come from its set-up or its load, not the caller.
CALLER_ERROR_STATUSES = frozenset({400, 411, 413, 415, 422, 431})
#: JSON-RPC errors that say the request itself is unreadable: -32700 (parse error), -32600 (invalid request).
_REQUEST_ERRORS = frozenset({jsonrpc.PARSE_ERROR, jsonrpc.INVALID_REQUEST})
_read_error = msgspec.json.Decoder(dict[str, Any]).decode

#: Response headers that describe the connection to the node, not the answer.
_DROP_RESPONSE_HEADERS = frozenset({
    b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"date", b"server",
    b"proxy-authenticate", b"trailer", b"upgrade",
})
#: The same, for an answer the gateway rewrote (in request order, merged): it goes uncompressed.
_DROP_FROM_REWRITTEN = _DROP_RESPONSE_HEADERS | {b"content-encoding"}


def inflate(body: bytes, coding: bytes, limit: int) -> bytes | None:
    """``body`` decoded from gzip or deflate, or None when it is not valid, is cut short or
    inflates past ``limit`` bytes."""
    inflater = zlib.decompressobj(zlib.MAX_WBITS if coding == b"deflate" else 16 + zlib.MAX_WBITS)
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error:
        return None
    if len(plain) > limit or not inflater.eof:
        return None
    return plain


#: A node's "state of block N is not available here" (docs/aztec-protocol.md, "Old state on a pruned
#: node"): -32702 with the 5.x world state's or the 4.x native tree's wording.
PRUNED_CODE = -32702
_PRUNED = re.compile(r"Unable to find leaf for block (\d+) in the archive tree: world state history has been pruned"
                     r"|Unable to (?:find low leaf|get leaf at index \d+) for block (\d+), failed to get block data")


def pruned_block(error: Any) -> int | None:
    """The block N of a pruned-state error object (decoded), else None."""
    if not isinstance(error, dict) or error.get("code") != PRUNED_CODE:
        return None
    message = error.get("message")
    match = _PRUNED.search(message) if isinstance(message, str) else None
    if match is None:
        return None
    return int(match.group(1) or match.group(2))


def _pruned_items(result: Attempt) -> dict[int, int]:
    """Index in the answer items -> block N, for each item that is a pruned-state error."""
    found: dict[int, int] = {}
    for index, item in enumerate(result.items or ()):
        if item is None or item.error is msgspec.UNSET:
            continue
        raw = bytes(item.error)
        if b"-32702" not in raw:
            continue
        try:
            block = pruned_block(msgspec.json.decode(raw))
        except msgspec.DecodeError:
            continue
        if block is not None:
            found[index] = block
    return found


def unavailable_reply(plan: Plan, result: Attempt, pruned: dict[int, int], attempts: int) -> Reply:
    """The pruned-state answer with each pruned item turned into -32004 (no node keeps the block):
    HTTP 400 for a single call, the batch's other items as the node sent them."""
    parsed = plan.parsed
    items = list(result.items or ())
    pieces: dict[int, bytes] = {}
    for index, call in enumerate(parsed.calls):
        item = items[index] if index < len(items) else None
        if index in pruned:
            message = (f"Block {pruned[index]} is older than any available node keeps "
                       "(its state was pruned on the node asked); no archiver node has it")
            error = jsonrpc.encode({"code": jsonrpc.BLOCK_UNAVAILABLE, "message": message})
            item = items[index] = answers.Answer(id=msgspec.Raw(call.id or b"null"), error=msgspec.Raw(error))
        if item is not None:
            pieces[call.position] = answers.rebuilt(call.id, item)
    if parsed.is_batch:
        body = jsonrpc.merge_batch(parsed, pieces)
        status = 200
    else:
        body = pieces[parsed.calls[0].position]
        status = 400
    return Reply(status, body, JSON_HEADERS, result.backend,
                 "rpc_error", attempts, items=items)


def _method_not_found(item: Any) -> bool:
    """Whether an answer item is a JSON-RPC -32601 (method not found)."""
    if item is None or item.error is msgspec.UNSET:
        return False
    raw = bytes(item.error)
    if b"-32601" not in raw:
        return False
    try:
        error = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return False
    return isinstance(error, dict) and error.get("code") == jsonrpc.METHOD_NOT_FOUND


def wrong_dialect(plan: Plan, items: list[Any] | None) -> bool:
    """Whether the node does not speak the request's dialect: every call answered -32601 (method
    not found), and at least one of them is a method of the gateway's table (``aztec_*`` on a 4.x
    node, a 5.x-only or 4.x-only method on a node of the other version). Such a node executed
    nothing, so another node may get the calls, writes included. A batch where only some items
    are -32601 is an answer as it is (the other items were executed)."""
    calls = plan.parsed.calls
    if not items or len(items) != len(calls):
        return False
    if not any(methods.lookup(call.method) is not None for call in calls):
        return False  # methods the gateway does not know: their -32601 is the answer
    return all(_method_not_found(item) for item in items)


def refuses_the_request(answer: UpstreamResponse, text: bytes | None) -> bool:
    """Whether an answer the request path cannot use says the caller's request is at fault: a
    client-error status (:data:`CALLER_ERROR_STATUSES`), or, short of a 5xx, one JSON-RPC error
    object -32700 or -32600 under whatever id (``text``: the body, decoded when it was compressed).
    Run only on answers already found unusable."""
    if answer.code in CALLER_ERROR_STATUSES:
        return True
    if answer.code >= 500 or text is None or b"-32" not in text:
        return False
    try:
        error = _read_error(text).get("error")
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return False
    return isinstance(error, dict) and error.get("code") in _REQUEST_ERRORS


def _bad(plan: Plan, backend: Backend, answer: UpstreamResponse, why: str, text: bytes | None = None) -> Attempt:
    if refuses_the_request(answer, text):
        log.info("request {request_id}: {backend} refused the request as the caller's fault (HTTP {code}, {why}); "
                 "passed on, not retried, not charged", request_id=plan.request_id, backend=backend.name,
                 code=answer.code, why=why)
        return Attempt(backend, "caller_error", f"HTTP {answer.code}: the request refused ({why})", answer=answer,
                       body=answer.body)
    log.warn("request {request_id}: {backend} answered HTTP {code} with an unusable body: {why}",
             request_id=plan.request_id, backend=backend.name, code=answer.code, why=why)
    return Attempt(backend, "bad_answer", f"HTTP {answer.code} with an unusable body: {why}")


def judge(plan: Plan, backend: Backend, answer: UpstreamResponse) -> Attempt:
    """A 5xx, garbage, or an answer that does not answer the request is the node failing;
    anything else, JSON-RPC errors included, is an answer. An unusable answer that blames the
    request (:func:`refuses_the_request`: HTTP 400, 413, 415, ... or a lone -32700/-32600 under
    another id) is kind "caller_error": the caller's fault, passed on as the node sent it.

    The answer is parsed and checked against the request's ids (:func:`answers.match`): its
    items must be the calls' answers, matched by id. When they come in another order than asked,
    or when some batch items were refused locally, the caller gets the node's items in request
    order (merged with the refused ones), re-assembled from the node's own item bytes; otherwise
    the node's own bytes, compressed or not.

    An answer of -32601 to every call, known methods among them (:func:`wrong_dialect`), is kind
    "wrong_dialect": the node does not speak that dialect. It keeps the answer, which the caller
    gets when no other node answers differently.
    """
    if answer.code >= 500:
        return _bad(plan, backend, answer, "a server error")
    encoding = None
    for name, value in answer.headers:
        if name == b"content-encoding":
            encoding = value
            break
    text = answer.body
    if encoding is not None:
        coding = encoding.strip().lower()
        if coding in (b"gzip", b"x-gzip", b"deflate"):
            text = inflate(text, coding, plan.limits.max_response)
            if text is None:
                return _bad(plan, backend, answer, f"not valid {coding.decode('latin-1')} within "
                                                   f"{plan.limits.max_response} bytes")
        elif coding not in (b"identity", b""):  # empty: no coding (what treq's decoder leaves behind)
            return _bad(plan, backend, answer, f"unreadable Content-Encoding {coding.decode('latin-1')[:32]}")
    parsed = plan.parsed
    refused = parsed.refused
    try:
        matched = answers.match(text, parsed.calls, parsed.is_batch, want_pieces=bool(refused))
    except answers.BadAnswer as failure:
        return _bad(plan, backend, answer, str(failure), text)
    kind, why = "ok", ""
    if matched.errors and wrong_dialect(plan, matched.items):
        kind, why = "wrong_dialect", "-32601 (method not found) to every call: it does not speak that dialect"
    if refused and matched.items is not None:
        return Attempt(backend, kind, why, answer=answer, body=jsonrpc.merge_batch(parsed, matched.pieces),
                       items=matched.items, errors=True, rewritten=True)
    if matched.body is not None:
        return Attempt(backend, kind, why, answer=answer, body=matched.body, items=matched.items, errors=matched.errors,
                       rewritten=True)
    return Attempt(backend, kind, why, answer=answer, body=answer.body, encoding=encoding, items=matched.items,
                   errors=matched.errors)


def answer_reply(result: Attempt, fallback: str | None, attempts: int, upstream_ms: float | None = None) -> Reply:
    """The node's answer as the caller gets it: its status, body and headers, minus the hop's own.
    ``upstream_ms``: from the answering attempt's start (a hedged pair's: the first node's)."""
    answer = result.answer
    assert answer is not None
    drop = _DROP_FROM_REWRITTEN if result.rewritten else _DROP_RESPONSE_HEADERS
    headers = tuple([pair for pair in answer.headers if pair[0] not in drop])
    if fallback is not None:
        headers += ((b"x-sentinel-fallback", fallback.encode()),)
    code = answer.code
    return Reply(code, result.body, headers, result.backend, "rpc_error" if code >= 400 or result.errors else "ok",
                 attempts, items=result.items, upstream_ms=upstream_ms)


def _shield(deferred: defer.Deferred[Any]) -> defer.Deferred[Any]:
    """A Deferred with ``deferred``'s result whose cancellation leaves ``deferred`` running,
    so a race can be lost by a waiter without cancelling the call it waits for."""
    shield: defer.Deferred[Any] = defer.Deferred()

    def forward(result: Any) -> Any:
        if not shield.called:
            shield.callback(result)
        return result

    deferred.addBoth(forward)
    return shield


async def _first_good(attempts: list[defer.Deferred[Attempt]]) -> Attempt:
    pending = list(attempts)
    last: Attempt | None = None
    while pending:
        index, result = await defer.race([_shield(d) for d in pending])
        pending.pop(index)
        if result.ok:
            for loser in pending:  # cancelling closes its connection; its outcome no longer matters
                loser.addErrback(lambda f: f.trap(defer.CancelledError))
                loser.cancel()
            return result
        last = result
    assert last is not None
    return last


class Failover:
    """One request's attempts at the nodes; the only stage that talks to them (through
    :class:`IForwardingClient`, so it runs in memory in the tests)."""

    def __init__(self, pool: BackendPool, client: IForwardingClient, metrics: Metrics, clock: IReactorTime,
                 tracer: Tracer = NO_TRACER):
        self._tracer = tracer
        self._pool = pool
        self._client = client
        self._metrics = metrics
        self._clock = clock
        self._local = LocalErrors(clock, "upstream", metrics)

    async def forward(self, plan: Plan) -> Reply:
        """Failover: the next-best node after a transport error, timeout, 5xx or garbage, never the
        same node twice, within MAX_ATTEMPTS and the overall deadline; a call that is not safe to
        repeat goes to a second node only when the first provably never received it.

        A node that does not speak the request's dialect (kind "wrong_dialect": -32601 to every
        call, see :func:`wrong_dialect`) provably executed nothing: the request goes to another
        node, writes included, and when the last attempt was such an answer the caller gets it as
        the node sent it (status included) rather than a 502.

        A node refusing the request as the caller's fault (kind "caller_error") ends it: the caller
        gets that answer, and no other node is asked. The gateway failing to open a connection
        itself (kind "local", :class:`LocalError`) ends it too, with 503 -32005 and Retry-After:
        the node is not at fault and the caller may come back in a moment."""
        limits = plan.limits
        tried: list[Backend] = []
        failure: Attempt | None = None
        block = plan.block
        #: The last answer that said "state of block N pruned here", and which items said so.
        pruned: tuple[Attempt, dict[int, int]] | None = None
        while len(tried) < limits.max_attempts:
            now = self._clock.seconds()
            remaining = plan.deadline - now
            if remaining <= 0:
                break
            pick = self._pool.pick(plan.route, block, tried, now)
            if pick.backend is None:
                break
            if failure is not None:
                self._metrics.failovers.labels(plan.route).inc()
                log.info("request {request_id}: failing over from {failed} ({reason}) to {backend}",
                         request_id=plan.request_id, failed=failure.backend.name, reason=failure.message,
                         backend=pick.backend.name)
            tried.append(pick.backend)
            if limits.hedge and plan.safe and len(tried) < limits.max_attempts:
                result, hedge = await self._hedged(plan, pick.backend, tuple(tried))
                if hedge is not None:
                    tried.append(hedge)
            else:
                result = await self._attempt(plan, pick.backend, min(limits.attempt_timeout, remaining), len(tried))
            if result.ok:
                found = _pruned_items(result) if result.errors and plan.safe else {}
                if not found:
                    return answer_reply(result, pick.fallback, len(tried), (self._clock.seconds() - now) * 1000.0)
                # The pruning edge: the node no longer keeps N. Not a failure (it answered); it
                # keeps nothing below N+1 from now on, and the call goes to a node that keeps N.
                oldest = min(found.values())
                self._pool.note_pruned(result.backend, max(found.values()))
                block = oldest if block is None else min(block, oldest)
                pruned = result, found
                log.info("request {request_id}: {backend} no longer keeps block {block}; asking a node that does",
                         request_id=plan.request_id, backend=result.backend.name, block=oldest)
                continue
            if result.kind == "caller_error":  # another node would refuse it too
                return answer_reply(result, pick.fallback, len(tried), (self._clock.seconds() - now) * 1000.0)
            if result.kind == "local":
                return error_reply(503, jsonrpc.OVERLOADED, "Gateway overloaded: it cannot open a connection to a "
                                   "node (out of file descriptors, ports or memory); retry shortly",
                                   attempts=len(tried), retry_after=1)
            failure = result
            if result.kind == "wrong_dialect":
                continue  # it executed nothing: any call may go to another node
            if result.kind not in _RETRYABLE or not (plan.safe or result.kind == "connect"):
                break
        if pruned is not None:
            return unavailable_reply(plan, pruned[0], pruned[1], len(tried))
        if failure is not None and failure.kind == "wrong_dialect":
            # No node answered otherwise: the -32601 is the answer.
            return answer_reply(failure, None, len(tried))
        if failure is None:
            return error_reply(503, jsonrpc.NO_BACKEND, f"No healthy node available for {plan.route}")
        timeout = failure.kind == "timeout"
        return error_reply(502, jsonrpc.UPSTREAM_TIMEOUT if timeout else jsonrpc.UPSTREAM_FAILED,
                           f"Upstream node failed: {failure.message}", "timeout" if timeout else "upstream_error",
                           failure.backend, len(tried))

    async def _hedged(self, plan: Plan, first_backend: Backend,
                      tried: tuple[Backend, ...]) -> tuple[Attempt, Backend | None]:
        """Ask a second node when the first is slower than usual; the first good answer wins.

        Returns the winning (or last) attempt, and the second node when one was asked.
        """
        limits = plan.limits
        now = self._clock.seconds()
        first = defer.Deferred.fromCoroutine(
            self._attempt(plan, first_backend, min(limits.attempt_timeout, plan.deadline - now), len(tried)))
        delay = limits.hedge_delay or (self._pool.hedge_delay(plan.route) or DEFAULT_HEDGE_DELAY * 1000.0) / 1000.0
        index, result = await defer.race([_shield(first), task.deferLater(self._clock, delay, lambda: None)])
        if index == 0:
            return result, None
        now = self._clock.seconds()
        second_backend = self._pool.pick(plan.route, plan.block, tried, now).backend
        if second_backend is None:
            return await first, None
        self._metrics.hedges.labels(plan.route).inc()
        second = defer.Deferred.fromCoroutine(
            self._attempt(plan, second_backend, min(limits.attempt_timeout, plan.deadline - now), len(tried) + 1,
                          "hedge"))
        return await _first_good([first, second]), second_backend

    async def _attempt(self, plan: Plan, backend: Backend, timeout: float, number: int,
                       role: str | None = None) -> Attempt:
        """One attempt in its span (``number`` counts the request's attempts; ``role``: hedge, or
        else first or failover by the number). One coroutine: a nested one per attempt cost ~1 µs."""
        span = self._tracer.attempt(backend.name, number, role or ("first" if number == 1 else "failover"))
        backend.breaker.begin()
        started = self._clock.seconds()
        try:
            answer = await self._client.post(backend, plan.body, span.headers(plan.headers), timeout)
        except UpstreamError as failure:
            result = Attempt(backend, failure.kind, str(failure))
            log.warn("request {request_id} to {backend} failed: {reason}", request_id=plan.request_id,
                     backend=backend.name, reason=str(failure))
        except defer.CancelledError:
            self._pool.record_outcome(backend, self._clock.seconds(), attempt="abandoned")
            span.end("cancelled")
            raise
        except LocalError as failure:
            # The gateway's own failure: no attempt result, no breaker charge (its probe slot is freed).
            self._pool.record_outcome(backend, self._clock.seconds(), attempt="abandoned")
            self._local.report(failure, backend.name)
            span.end("local")
            return Attempt(backend, "local", str(failure))
        else:
            result = judge(plan, backend, answer)
        now = self._clock.seconds()
        self._metrics.observe_attempt(backend.label, result.kind, now - started, plan.parsed.methods)
        if result.ok:
            self._pool.record_outcome(backend, now, attempt="answered", latency_ms=(now - started) * 1000.0)
        elif result.kind in ("too_large", "wrong_dialect", "caller_error"):
            # The caller asked for too much, in a dialect the node does not speak, or wrongly: no
            # sign of a failing node (it answered, but not with the answer: no latency sample either).
            self._pool.record_outcome(backend, now, attempt="abandoned")
        else:
            self._pool.record_outcome(backend, now, attempt="failed")
        span.end(result.kind)
        return result
