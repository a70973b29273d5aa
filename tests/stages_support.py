"""In-memory stand-ins for the request path's stage tests: a forwarding client whose nodes answer
from a script, a response cache, a pool of trusted nodes, and a request path built on them.

Time is a ``task.Clock``: nothing here opens a socket or sleeps.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine, Union

from twisted.internet import defer, task
from twisted.python.failure import Failure
from zope.interface import implementer

from sentinel_proxy.core.scoring import BreakerPolicy
from sentinel_proxy.interfaces import IForwardingClient, IResponseCache
from sentinel_proxy.ops.logs import AccessLog
from sentinel_proxy.ops.metrics import Metrics
from sentinel_proxy.proxy.path import RequestPath
from sentinel_proxy.proxy.values import Caller, Limits
from sentinel_proxy.state.backends import Backend, BackendPool
from sentinel_proxy.upstream.response import UpstreamError, UpstreamResponse

#: A caller's headers as the request path takes them: names lower-cased, one value each.
JSON = {b"content-type": b"application/json"}

#: A scripted answer: a response, a failure, a Deferred the test fires (or never fires), or a
#: function of the request body that returns a response (a node that reads what it is asked).
Script = Union[UpstreamResponse, UpstreamError, defer.Deferred, Callable[[bytes], UpstreamResponse]]


def rpc(method: str, params: list | None = None, id_: Any = 1) -> dict:
    return {"jsonrpc": "2.0", "id": id_, "method": method, "params": params or []}


def body_of(value: Any) -> bytes:
    return json.dumps(value).encode()


def pairs(headers: dict | None) -> tuple[tuple[bytes, bytes], ...]:
    """Header pairs, names lower-cased, from ``{name: value or [values]}``."""
    out = []
    for name, values in (headers or {}).items():
        for value in (values if isinstance(values, (list, tuple)) else [values]):
            out.append((name.lower(), value))
    return tuple(out)


def answer(value: Any, code: int = 200, headers: dict | None = None) -> UpstreamResponse:
    """A node's answer: ``value`` as JSON unless it is already bytes; ``headers`` as
    ``{name: value or [values]}``, after a content-type."""
    body = value if isinstance(value, bytes) else json.dumps(value).encode()
    return UpstreamResponse(code, ((b"content-type", b"application/json"),) + pairs(headers), body)


def request_headers(headers: dict) -> dict[bytes, bytes]:
    """A caller's headers as the web layer hands them on: names lower-cased, values joined."""
    return {name.lower(): (b", ".join(value) if isinstance(value, (list, tuple)) else value)
            for name, value in headers.items()}


def result(value: Any, id_: Any = 1) -> dict:
    return {"jsonrpc": "2.0", "id": id_, "result": value}


def hang() -> defer.Deferred[UpstreamResponse]:
    """A node that never answers: only the attempt's timeout (or a cancellation) ends the call."""
    return defer.Deferred()


@dataclass(frozen=True)
class Sent:
    node: str
    body: bytes
    #: (name, value) pairs, as the request path hands them to the client.
    headers: tuple[tuple[bytes, bytes], ...]
    timeout: float

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key == name]


def _timed_out(_: Any, timeout: float) -> Failure:
    return Failure(UpstreamError("timeout", f"no answer within {timeout:g} s"))


@implementer(IForwardingClient)
class MemoryClient:
    """Each node answers from its own script, in order; a node without one answers ``default``.

    Bounded by the attempt's timeout on the test's clock, and cancellable, like the real client.
    """

    def __init__(self, clock: task.Clock, default: Script | None = None):
        self._clock = clock
        self._scripts: dict[str, list[Script]] = {}
        self._default = default
        self.sent: list[Sent] = []
        #: Nodes whose call was cancelled by the request path (a hedge lost, the caller gone).
        self.cancelled: list[str] = []

    def script(self, node: str, *answers: Script) -> None:
        self._scripts.setdefault(node, []).extend(answers)

    def to(self, node: str) -> list[Sent]:
        return [s for s in self.sent if s.node == node]

    async def post(self, backend: Backend, body: bytes, headers: Any, timeout: float,
                   limit: int | None = None) -> UpstreamResponse:
        headers = tuple(headers)
        assert all(type(name) is bytes and type(value) is bytes for name, value in headers), headers
        self.sent.append(Sent(backend.name, body, headers, timeout))
        queue = self._scripts.get(backend.name)
        scripted = queue.pop(0) if queue else self._default
        if scripted is None:
            raise AssertionError(f"no answer scripted for {backend.name}")
        if callable(scripted) and not isinstance(scripted, (UpstreamResponse, defer.Deferred)):
            scripted = scripted(body)
        if isinstance(scripted, defer.Deferred):
            pending = scripted
        elif isinstance(scripted, UpstreamError):
            pending = defer.fail(scripted)
        else:
            pending = defer.succeed(scripted)
        pending.addTimeout(timeout, self._clock, onTimeoutCancel=_timed_out)

        def note_cancel(failure: Failure) -> Failure:
            if failure.check(defer.CancelledError):
                self.cancelled.append(backend.name)
            return failure

        pending.addErrback(note_cancel)
        return await pending

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)


@implementer(IResponseCache)
class MemoryStore:
    """A dict, answering at once; ``ttls`` records what each key was stored for."""

    def __init__(self) -> None:
        self.values: dict[bytes, bytes] = {}
        self.ttls: dict[bytes, float | None] = {}

    def get(self, key: bytes) -> defer.Deferred[bytes | None]:
        return defer.succeed(self.values.get(key))

    def set(self, key: bytes, value: bytes, ttl: float | None) -> defer.Deferred[None]:
        self.values[key] = value
        self.ttls[key] = ttl
        return defer.succeed(None)

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)


@dataclass(frozen=True)
class Verdict:
    """Stands in for an IntegrityVerdict: only what the pool reads."""

    status: str = "perfect"
    score: int = 100
    node_type: str = "pruned"
    missing_epochs: tuple = ()
    inconsistent_epochs: tuple = ()


#: The chain every in-memory node reports: (l1ChainId, rollupVersion).
CHAIN = ("31337", "1")


def trusted_pool(count: int = 3, breaker: BreakerPolicy | None = None, oldest_block: int | None = 50) -> BackendPool:
    """Healthy, trusted pruned nodes named n0:1, n1:1, ...; picked in that order (random is 0)."""
    pool = BackendPool([(f"n{i}:1", f"http://n{i}:1") for i in range(count)], random=lambda: 0.0)
    if breaker is not None:
        pool.set_breaker_policy(breaker)
    for backend in pool.backends:
        pool.record_health(backend, True, now=0.0, block_number=100, latency_ms=5.0, oldest_block=oldest_block,
                           chain=CHAIN)
        pool.record_integrity(backend, Verdict())
    pool.reassess()  # the majority chain: cache keys carry it, and nothing is cached before it is known
    return pool


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@dataclass
class Rig:
    """A request path over in-memory nodes, with what a test looks at."""

    clock: task.Clock
    pool: BackendPool
    client: MemoryClient
    metrics: Metrics
    path: RequestPath
    log: io.StringIO = field(default_factory=io.StringIO)
    access_log: AccessLog | None = None

    def node(self, index: int) -> Backend:
        return self.pool.backends[index]

    def lines(self) -> list[dict[str, Any]]:
        assert self.access_log is not None
        self.access_log.flush()
        return [json.loads(line) for line in self.log.getvalue().splitlines()]

    def handle(self, value: Any, route: str = "/", headers: dict | None = None, caller: Caller = Caller("req-1"),
               raw: bytes | None = None) -> defer.Deferred:
        body = raw if raw is not None else body_of(value)
        return defer.Deferred.fromCoroutine(
            self.path.handle(route, body, request_headers(JSON if headers is None else headers), caller=caller))


def rig(count: int = 3, limits: Limits = Limits(), cache: IResponseCache | None = None, limiter: Any = None,
        worker: str | None = None, breaker: BreakerPolicy | None = None, default: Script | None = None) -> Rig:
    clock = task.Clock()
    clock.advance(1000.0)
    pool = trusted_pool(count, breaker)
    client = MemoryClient(clock, default)
    metrics = Metrics(pool)
    log = io.StringIO()
    access_log = AccessLog(log, json_lines=True)
    path = RequestPath(pool, client, metrics, clock, limits, access_log, cache, 1.0, limiter, worker)
    return Rig(clock, pool, client, metrics, path, log, access_log)


def settled(deferred: defer.Deferred | Coroutine[Any, Any, Any]) -> Any:
    """The result of a Deferred (or coroutine) that must be done already: the clock drives everything."""
    if not isinstance(deferred, defer.Deferred):
        deferred = defer.Deferred.fromCoroutine(deferred)
    outcome: list[Any] = []
    deferred.addBoth(outcome.append)
    assert outcome, "the request is still waiting"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


#: A breaker that opens at the first failure and closes at the first success.
TRIGGER_HAPPY = BreakerPolicy(consecutive_failures=1, cooldown=5.0, close_after=1)
