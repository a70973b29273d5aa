"""CPU per request of the request path alone, in memory: RequestPath with an in-memory node and a MemoryCache.

Not a test. No sockets, no reactor: the node answers at once (a fired Deferred), time is a
``task.Clock``, the access log goes to /dev/null, metrics are the real Prometheus registry. Every
feature of the request path is on (cache, coalescing, access log, metrics, telemetry headers);
what is measured is ``time.process_time()`` over N requests, per request, for each workload:

- ``pass``: a one-call batch of a method that is never cached (straight to failover), as the Aztec
  client sends it (always an array), and the same as a single object (``pass-single``);
- ``hit``: a one-call batch answered from the cache (the entry was stored by a first request);
- ``hit10``: a ten-call batch, every call a cache hit;
- ``miss-batch``: a three-call batch, one hit, one never-cached call, one cacheable miss (the
  cache's sub-batch path: lookup, sub-batch, matching, storing, reassembly).

The script works against older trees of the package too (their ``Headers``-based API), so that a
"before" figure can be taken from a copy of the old modules::

    git archive HEAD sentinel_proxy | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before .venv/bin/python bench/path_cpu.py      # before (the copy is imported first)
    .venv/bin/python bench/path_cpu.py                             # after

    .venv/bin/python bench/path_cpu.py [-n 20000] [--repeat 5] [--null-metrics]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from twisted.internet import defer, task  # noqa: E402

import sentinel_proxy  # noqa: E402
from sentinel_proxy.ops.logs import AccessLog  # noqa: E402
from sentinel_proxy.ops.metrics import Metrics  # noqa: E402
from sentinel_proxy.proxy import values  # noqa: E402
from sentinel_proxy.proxy.path import RequestPath  # noqa: E402
from sentinel_proxy.proxy.values import Caller, Limits  # noqa: E402
from sentinel_proxy.state.backends import BackendPool  # noqa: E402
from sentinel_proxy.stores.cache import MemoryCache  # noqa: E402
from sentinel_proxy.upstream.client import UpstreamResponse  # noqa: E402

#: The old API took twisted ``Headers`` for the caller's headers and the node's answer.
OLD_API = "Headers" in str(values.Inbound.__annotations__.get("headers", ""))
if OLD_API:
    from twisted.web.http_headers import Headers

    REQUEST_HEADERS: Any = Headers({b"content-type": [b"application/json"], b"user-agent": [b"node"],
                                    b"accept-encoding": [b"gzip, deflate"]})
else:
    REQUEST_HEADERS = {b"content-type": b"application/json", b"user-agent": b"node",
                       b"accept-encoding": b"gzip, deflate"}

NODE_HEADERS = ((b"content-type", b"application/json"), (b"access-control-allow-origin", b"*"),
                (b"x-aztec-l1chainid", b"31337"), (b"x-aztec-rollupversion", b"1"),
                (b"x-aztec-packageversion", b"4.1.2"))
BLOCK = {"number": 42, "hash": "0x" + "ab" * 32, "header": {"globalVariables": {"blockNumber": 42}},
         "body": {"txEffects": ["0x" + "cd" * 64] * 8}}


def node_headers() -> Any:
    if OLD_API:
        headers = Headers()
        for name, value in NODE_HEADERS:
            headers.addRawHeader(name, value)
        return headers
    return NODE_HEADERS


def results_for(body: bytes) -> bytes:
    """What the node answers: each call's id, a result by method, in request order."""
    document = json.loads(body)
    items = document if isinstance(document, list) else [document]
    out = []
    for item in items:
        method = item["method"]
        value = {"node_isReady": True, "node_getBlockNumber": 100, "node_getBlock": BLOCK}.get(method, 7)
        out.append({"jsonrpc": "2.0", "id": item.get("id"), "result": value})
    return json.dumps(out if isinstance(document, list) else out[0], separators=(",", ":")).encode()


class InstantClient:
    """Answers at once; the answer for a body is computed once and replayed (the node's CPU is not ours)."""

    def __init__(self) -> None:
        self._answers: dict[bytes, UpstreamResponse] = {}
        self.calls = 0

    def post(self, backend: Any, body: bytes, headers: Any, timeout: float, limit: int | None = None) -> Any:
        self.calls += 1
        answer = self._answers.get(body)
        if answer is None:
            answer = self._answers[body] = UpstreamResponse(200, node_headers(), results_for(body))
        return defer.succeed(answer)

    def close(self) -> Any:
        return defer.succeed(None)


@dataclass(frozen=True)
class Verdict:
    status: str = "perfect"
    score: int = 100
    node_type: str = "pruned"
    missing_epochs: tuple = ()
    inconsistent_epochs: tuple = ()


class NullChild:
    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


def null_metrics(metrics: Metrics) -> Metrics:
    """Prometheus out of the picture (``--null-metrics``): what the request path itself costs."""
    child = NullChild()
    metrics.observe_request = lambda *args, **kwargs: None  # type: ignore[method-assign]
    metrics.observe_cache = lambda *args, **kwargs: None  # type: ignore[method-assign]
    metrics.observe_attempt = lambda *args, **kwargs: None  # type: ignore[method-assign]
    metrics.in_flight = child  # type: ignore[assignment]
    return metrics


def build(no_metrics: bool = False) -> tuple[RequestPath, InstantClient, task.Clock]:
    clock = task.Clock()
    clock.advance(1000.0)
    pool = BackendPool([f"http://n{i}:1" for i in range(3)], random=lambda: 0.0)
    for backend in pool.backends:
        pool.record_health(backend, True, now=1000.0, block_number=100, latency_ms=5.0, oldest_block=1,
                           chain=("31337", "1"))
        pool.record_integrity(backend, Verdict())
    pool.reassess()  # the chain identity: cache keys carry it, and nothing is cached before it is known
    pool.finalized = 90
    client = InstantClient()
    access_log = AccessLog(open(os.devnull, "w"), json_lines=False)
    cache = MemoryCache(64 << 20, clock)
    metrics = Metrics(pool)
    path = RequestPath(pool, client, null_metrics(metrics) if no_metrics else metrics, clock, Limits(), access_log,
                       cache, 3600.0)
    return path, client, clock


def call(method: str, params: list, id_: Any) -> dict:
    return {"jsonrpc": "2.0", "id": id_, "method": method, "params": params}


def body(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


WORKLOADS = {
    "pass": body([call("node_isReady", [], 1)]),
    "pass-single": body(call("node_isReady", [], 1)),
    "hit": body([call("node_getBlock", [42], 1)]),
    "hit10": body([call("node_getBlock", [42 - i], i) for i in range(10)]),
    "miss-batch": None,  # built per request: a new block number each time
}


def run(path: RequestPath, make_body: Any, count: int) -> float:
    """CPU µs per request over ``count`` requests."""
    caller = Caller("bench-1", "10.0.0.1")
    handle = path.handle
    statuses: list[int] = []
    bodies = [make_body(i) for i in range(count)]
    started = time.process_time()
    for payload in bodies:
        deferred = defer.Deferred.fromCoroutine(handle("/", payload, REQUEST_HEADERS, False, caller))
        deferred.addCallback(lambda reply: statuses.append(reply.status))
    elapsed = time.process_time() - started
    assert len(statuses) == count and set(statuses) == {200}, (len(statuses), set(statuses))
    return elapsed / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5, help="runs per workload; the best is shown")
    parser.add_argument("--null-metrics", action="store_true",
                        help="replace the Prometheus calls with no-ops (what the stages cost without them)")
    options = parser.parse_args()
    print(f"package: {os.path.dirname(sentinel_proxy.__file__)}  ({'old Headers' if OLD_API else 'new'} API)"
          f"{'  metrics: null' if options.null_metrics else ''}")
    path, client, _ = build(options.null_metrics)
    fixed = {name: payload for name, payload in WORKLOADS.items() if payload is not None}
    for payload in fixed.values():  # warm the cache (and every code path)
        run(path, lambda i, p=payload: p, 10)

    def miss_batch(i: int) -> bytes:
        return body([call("node_getBlock", [42], 1), call("node_isReady", [], 2),
                     call("node_getBlock", [1_000_000 + miss_batch.counter], 3)])
    miss_batch.counter = 0  # type: ignore[attr-defined]

    def miss_batch_next(i: int) -> bytes:
        miss_batch.counter += 1  # type: ignore[attr-defined]
        return miss_batch(i)

    for name in WORKLOADS:
        make = miss_batch_next if name == "miss-batch" else (lambda i, p=fixed[name]: p)
        before = client.calls
        best = min(run(path, make, options.n) for _ in range(options.repeat))
        upstream = (client.calls - before) / (options.n * options.repeat)
        print(f"{name:12s} {best:7.1f} µs CPU/request   ({upstream:.2f} upstream calls/request)")


if __name__ == "__main__":
    main()
