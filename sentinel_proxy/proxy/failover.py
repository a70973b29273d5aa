"""Getting an answer from some node: pick, attempt, judge, fail over, hedge.

Every attempt's outcome goes to the node's state through ``BackendPool.record_outcome``, so the
breakers and the hedge delay learn from real traffic.
"""
from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sentinel_proxy.core import jsonrpc
from sentinel_proxy.interfaces import IForwardingClient
from sentinel_proxy.ops.logs import observer
from sentinel_proxy.ops.metrics import Metrics
from sentinel_proxy.proxy.values import Attempt, Plan, Reply, error_reply
from sentinel_proxy.state.backends import Backend, BackendPool
from sentinel_proxy.upstream.client import UpstreamError, UpstreamResponse

log = Logger(observer=observer)

#: Hedge delay while a node has too few answers for a p95.
DEFAULT_HEDGE_DELAY = 0.05
#: Attempt failures after which another node may get the same call (when it is safe to repeat).
_RETRYABLE = frozenset({"timeout", "connect", "transport", "bad_answer"})

#: Response headers that describe the connection to the node, not the answer.
_DROP_RESPONSE_HEADERS = frozenset({
    b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"date", b"server",
    b"proxy-authenticate", b"trailer", b"upgrade",
})


def answer_items(body: bytes, batch: bool, count: int) -> list[Any] | None:
    """The node's answer items, or None when the answer does not have the request's shape."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if batch:
        return document if isinstance(document, list) and len(document) == count else None
    return [document] if isinstance(document, dict) else None


def _answer_outcome(status: int, body: bytes, encoding: bytes | None) -> str:
    """rpc_error when the node answered with a JSON-RPC error (HTTP 4xx, or an error item in an
    uncompressed answer: a substring search, no parse), else ok."""
    if status >= 400 or (encoding is None and b'"error":' in body):
        return "rpc_error"
    return "ok"


def _looks_like_json(body: bytes, encoding: bytes | None, is_batch: bool) -> bool:
    """A cheap shape check of the node's answer, so garbage never reaches a caller as success.

    Parsing every answer would cost more than the rest of the request path; the first and last
    bytes tell a JSON-RPC object or array from an HTML error page, a truncated body or noise.
    """
    if encoding is not None and encoding.strip().lower() == b"gzip":
        return body[:2] == b"\x1f\x8b"
    text = body.strip()
    if not text:
        return False
    return (text[:1], text[-1:]) in ((b"[", b"]"), (b"{", b"}")) if is_batch else \
        (text[:1], text[-1:]) == (b"{", b"}")


def judge(plan: Plan, backend: Backend, answer: UpstreamResponse) -> Attempt:
    """A 5xx or garbage is the node failing; anything else, JSON-RPC errors included, is an answer.

    When some batch items were refused locally, the node's items are merged back among them here,
    so an answer that cannot be merged is garbage too.
    """
    encoding = answer.headers.getRawHeaders(b"content-encoding", [None])[0]
    parsed = plan.parsed
    usable = answer.code < 500 and _looks_like_json(answer.body, encoding, parsed.is_batch)
    body: bytes | None = answer.body
    if usable and parsed.refused:
        items = answer_items(answer.body, True, len(parsed.calls))
        body = None if items is None else jsonrpc.encode(jsonrpc.merge_batch(parsed, items))
    if not usable or body is None:
        log.warn("request {request_id}: {backend} answered HTTP {code} with an unusable body",
                 request_id=plan.request_id, backend=backend.name, code=answer.code)
        return Attempt(backend, "bad_answer", f"HTTP {answer.code} with an unusable body")
    return Attempt(backend, "ok", answer=answer, body=body, encoding=encoding)


def answer_reply(result: Attempt, fallback: str | None, attempts: int) -> Reply:
    """The node's answer as the caller gets it: its status, body and headers, minus the hop's own."""
    answer = result.answer
    assert answer is not None
    headers = tuple((name, value) for name, values in answer.headers.getAllRawHeaders()
                    if name.lower() not in _DROP_RESPONSE_HEADERS for value in values)
    if fallback is not None:
        headers += ((b"x-sentinel-fallback", fallback.encode()),)
    return Reply(answer.code, result.body, headers, result.backend,
                 _answer_outcome(answer.code, result.body, result.encoding), attempts)


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

    def __init__(self, pool: BackendPool, client: IForwardingClient, metrics: Metrics, clock: IReactorTime):
        self._pool = pool
        self._client = client
        self._metrics = metrics
        self._clock = clock

    async def forward(self, plan: Plan) -> Reply:
        """Failover: the next-best node after a transport error, timeout, 5xx or garbage, never the
        same node twice, within MAX_ATTEMPTS and the overall deadline; a call that is not safe to
        repeat goes to a second node only when the first provably never received it."""
        limits = plan.limits
        tried: list[Backend] = []
        failure: Attempt | None = None
        while len(tried) < limits.max_attempts:
            now = self._clock.seconds()
            remaining = plan.deadline - now
            if remaining <= 0:
                break
            pick = self._pool.pick(plan.route, plan.block, tried, now)
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
                result = await self._attempt(plan, pick.backend, min(limits.attempt_timeout, remaining))
            if result.ok:
                return answer_reply(result, pick.fallback, len(tried))
            failure = result
            if result.kind not in _RETRYABLE or not (plan.safe or result.kind == "connect"):
                break
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
            self._attempt(plan, first_backend, min(limits.attempt_timeout, plan.deadline - now)))
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
            self._attempt(plan, second_backend, min(limits.attempt_timeout, plan.deadline - now)))
        return await _first_good([first, second]), second_backend

    async def _attempt(self, plan: Plan, backend: Backend, timeout: float) -> Attempt:
        backend.breaker.begin()
        started = self._clock.seconds()
        try:
            answer = await self._client.post(backend, plan.body, plan.request_headers(), timeout)
        except UpstreamError as failure:
            result = Attempt(backend, failure.kind, str(failure))
            log.warn("request {request_id} to {backend} failed: {reason}", request_id=plan.request_id,
                     backend=backend.name, reason=str(failure))
        except defer.CancelledError:
            self._pool.record_outcome(backend, self._clock.seconds(), attempt="abandoned")
            raise
        else:
            result = judge(plan, backend, answer)
        now = self._clock.seconds()
        self._metrics.observe_attempt(backend.label, result.kind)
        if result.ok:
            self._pool.record_outcome(backend, now, attempt="answered", latency_ms=(now - started) * 1000.0)
        elif result.kind == "too_large":  # the caller asked for too much: no sign of a failing node
            self._pool.record_outcome(backend, now, attempt="abandoned")
        else:
            self._pool.record_outcome(backend, now, attempt="failed")
        return result
