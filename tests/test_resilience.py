"""Fault injection (issue 5, "Resilience"): failover, circuit breakers, timeouts, hedging,
backpressure, limits and graceful shutdown, proven against simulated nodes over loopback.

In-process tests drive a real listening gateway with a load loop (``Load``) while a node is made to
fail; the twistd tests at the end send real signals to a real daemon. Every wait is bounded: state
is polled with ``wait_for`` or awaited on Deferreds, never slept for.
"""
from __future__ import annotations

import dataclasses
import json
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, tcp
from twisted.internet.error import ConnectError
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site

from sentinel_proxy.core import jsonrpc
from sentinel_simnode.node import SCENARIOS, simulated_site
from tests.support import RunningNode, post_json, rpc, wait_for
from tests.processes import Daemon, fetch, poll

ensure = pytest_twisted.ensureDeferred

#: The acceptance load of the issue: 2,000 reads at 32 in flight (used for the killed node).
FULL_LOAD = 2000
#: The other faults make the same point with fewer requests (the file must stay well under 90 s).
FAULT_LOAD = 600
CONCURRENCY = 32
#: Fraction of the load after which the fault is injected.
INJECT_AT = 0.2

#: A block every simulated pruned node keeps (they keep the last 64 below the tip of 1000).
RECENT = 950

#: Settings of the fault matrix: only the request path and the breaker react (no health checks
#: during the run), a hang costs 300 ms, an open breaker probes again after 500 ms.
MATRIX_SETTINGS = {"health_check_interval_ms": "600000", "integrity_check_interval_ms": "600000",
                   "attempt_timeout_ms": "300", "request_timeout_ms": "3000", "breaker_consecutive_failures": "5",
                   "breaker_cooldown_ms": "500", "breaker_close_successes": "3", "max_attempts": "3"}

ATTEMPT_RESULTS_NOT_OK = ("timeout", "connect", "transport", "bad_answer", "too_large")


# ------------------------------------------------------------------------------------ helpers


def read_call(i: int) -> list[dict]:
    """What the real client sends: a one-item batch, alternating the two hottest reads."""
    return [rpc("node_getL2Tips" if i % 2 else "node_getBlockNumber", id_=i)]


def failure_of(answer: Any) -> str | None:
    """Why a read did not succeed, or None: HTTP 200 with a JSON-RPC ``result`` is success."""
    if answer.code != 200:
        return f"HTTP {answer.code}: {answer.body[:200]!r}"
    try:
        items = answer.json()
    except ValueError:
        return f"HTTP 200 with a body that is not JSON: {answer.body[:200]!r}"
    if not isinstance(items, list) or len(items) != 1 or "result" not in items[0]:
        return f"HTTP 200 without a result: {answer.body[:200]!r}"
    return None


@dataclasses.dataclass
class LoadResult:
    codes: list[int]
    latencies: list[float]
    #: (request index, reason) of every request that did not succeed.
    failures: list[tuple[int, str]]

    def p(self, quantile: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * quantile))]


class Load:
    """``concurrency`` workers posting reads to ``url``: at least ``minimum`` requests, and on
    until :meth:`stop` (so a recovery phase still has traffic), at most ``maximum``."""

    def __init__(self, url: str, concurrency: int = CONCURRENCY, make: Callable[[int], Any] = read_call):
        self.url = url
        self.concurrency = concurrency
        self.make = make
        self.started = 0
        self.done = 0
        self._stopping = False
        self._minimum = 0
        self._maximum = 0
        self._milestones: list[tuple[int, defer.Deferred[None]]] = []
        self.result = LoadResult([], [], [])

    def reached(self, count: int) -> defer.Deferred[None]:
        """Fires once ``count`` requests have completed."""
        waiter: defer.Deferred[None] = defer.Deferred()
        if self.done >= count:
            waiter.callback(None)
        else:
            self._milestones.append((count, waiter))
        return waiter

    def stop(self) -> None:
        self._stopping = True

    def run(self, minimum: int, maximum: int | None = None, until_stopped: bool = False) -> defer.Deferred[LoadResult]:
        self._minimum = minimum
        self._maximum = maximum or minimum
        self._stopping = not until_stopped
        workers = [defer.Deferred.fromCoroutine(self._worker()) for _ in range(self.concurrency)]
        return defer.gatherResults(workers, consumeErrors=True).addCallback(lambda _: self.result)

    def _more(self) -> bool:
        if self.started >= self._maximum:
            return False
        return self.started < self._minimum or not self._stopping

    async def _worker(self) -> None:
        while self._more():
            i = self.started
            self.started += 1
            began = reactor.seconds()
            try:
                answer = await post_json(self.url, self.make(i), timeout=15.0)
            except Exception as exc:  # noqa: BLE001 - every way a request can fail is a finding
                self.result.codes.append(0)
                self.result.failures.append((i, f"{exc.__class__.__name__}: {exc}"))
            else:
                self.result.codes.append(answer.code)
                reason = failure_of(answer)
                if reason is not None:
                    self.result.failures.append((i, reason))
            self.result.latencies.append(reactor.seconds() - began)
            self.done += 1
            ready = [w for c, w in self._milestones if self.done >= c]
            self._milestones = [(c, w) for c, w in self._milestones if self.done < c]
            for waiter in ready:
                waiter.callback(None)


def sample(service: Any, name: str, **labels: str) -> float:
    return service.metrics.registry.get_sample_value(name, labels) or 0.0


def failed_attempts(service: Any, backend: Any) -> float:
    return sum(sample(service, "sentinel_proxy_upstream_attempts_total", backend=backend.label, result=result)
               for result in ATTEMPT_RESULTS_NOT_OK)


def all_attempts(service: Any, backend: Any) -> float:
    return failed_attempts(service, backend) + sample(
        service, "sentinel_proxy_upstream_attempts_total", backend=backend.label, result="ok")


class BreakerLog:
    """Watches the gateway's "circuit breaker of X is now Y" log events; for each, notes the failed
    attempts counted for that node at that very moment (the metric is updated before the breaker)."""

    FORMAT = "circuit breaker of {backend} is now {state}"

    def __init__(self, service: Any):
        self.service = service
        self.events: list[tuple[str, str, float]] = []

    def __enter__(self) -> Self:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)

    def __call__(self, event: dict) -> None:
        if event.get("log_format") != self.FORMAT:
            return
        backend = next((b for b in self.service.pool.backends if b.name == event["backend"]), None)
        failed = failed_attempts(self.service, backend) if backend is not None else -1.0
        self.events.append((event["backend"], event["state"], failed))

    def states(self, name: str) -> list[str]:
        return [state for backend, state, _ in self.events if backend == name]


async def ready_gateway(cluster: Any, nodes: list[RunningNode], **overrides: str) -> tuple[Any, str]:
    """A gateway whose nodes are all healthy, typed and trusted (the same routing tier), so that
    every node gets a share of the traffic from the first request on."""
    service, url = await cluster.gateway(nodes, **overrides)
    await wait_for(lambda: all(b.trusted for b in service.pool.backends), what="integrity verdicts of every node")
    return service, url


def backend_of(service: Any, running: RunningNode) -> Any:
    """The gateway's backend for a node (look it up before killing the node: a closed port has no URL)."""
    return next(b for b in service.pool.backends if b.url == running.url)


def cut_connections(running: RunningNode) -> None:
    """Abort every connection the node has accepted (its port keeps listening)."""
    for connection in node_connections(running.port.getHost().port):
        if isinstance(connection, tcp.Server):
            connection.abortConnection()


def node_connections(port_number: int) -> list[tcp.Connection]:
    """Open TCP connections in this process to or from a loopback port (node side and gateway side)."""
    found = []
    for reader in reactor.getReaders():
        accepted = isinstance(reader, tcp.Server) and reader.getHost().port == port_number
        connected = isinstance(reader, tcp.Client) and reader.connected and reader.getPeer().port == port_number
        if accepted or connected:
            found.append(reader)
    return found


async def kill(running: RunningNode) -> int:
    """As if the node's process died: the port closes, and established (keep-alive) connections are
    cut; anything still reaching its resource is reset. Returns the port number, to listen again."""
    port_number = running.port.getHost().port
    running.node.scenario = SCENARIOS["failing-reset"]
    await running.port.stopListening()
    for connection in node_connections(port_number):
        if isinstance(connection, tcp.Server):
            connection.abortConnection()
    await wait_for(lambda: not node_connections(port_number), timeout=5.0,
                   what=f"every connection to port {port_number} to close")
    return port_number


def revive(running: RunningNode, port_number: int) -> None:
    """The node comes back on the same port (``RunningNode.port`` is updated for the teardown)."""
    running.node.scenario = SCENARIOS["pruned"]
    running.port = reactor.listenTCP(port_number, simulated_site(running.node), interface="127.0.0.1")


# ------------------------------------------------------------------------- 1. fault matrix

#: How a node fails: its process dies, or it answers with a simulator failure scenario.
FAULTS = ("killed", "hang", "failing-500", "failing-reset", "failing-garbage")


@pytest.mark.parametrize("fault", FAULTS)
@ensure
@pytest.mark.slow
async def test_fault_matrix_no_caller_sees_a_node_failure(cluster, fault):
    """Three healthy nodes under load; one fails 20% into the run. Every read still succeeds, the
    bad node's breaker opens after a bounded number of calls, and once the node recovers the
    breaker closes again after its probes and the node serves traffic again."""
    nodes = [cluster.node("pruned") for _ in range(3)]
    service, url = await ready_gateway(cluster, nodes, **MATRIX_SETTINGS)
    bad = nodes[1]
    backend = backend_of(service, bad)
    policy = backend.breaker.policy
    total = FULL_LOAD if fault == "killed" else FAULT_LOAD

    with BreakerLog(service) as breakers:
        load = Load(url)
        running = load.run(total, maximum=20 * total, until_stopped=True)
        port_number = None
        try:
            await load.reached(int(total * INJECT_AT))
            if fault == "killed":
                port_number = await kill(bad)
            else:
                bad.node.scenario = SCENARIOS[fault]
            injected_at = reactor.seconds()
            await wait_for(lambda: backend.breaker.state == "open", timeout=10.0,
                           what="the bad node's breaker to open")
            opened_after = reactor.seconds() - injected_at
            gauge = sample(service, "sentinel_proxy_backend_breaker_state", backend=backend.label, state="open")
            # The fault lasts a few cool-downs, so that half-open probes meet the failing node too
            # (each failed probe re-opens the breaker; the move to half-open itself is not logged).
            await wait_for(lambda: breakers.states(backend.name).count("open") >= 3, timeout=10.0,
                           what="two failed half-open probes of the failing node")
            failed_during_fault = failed_attempts(service, backend)

            if fault == "killed":
                revive(bad, port_number)
                port_number = None
            else:
                bad.node.scenario = SCENARIOS["pruned"]
            requests_at_recovery = bad.node.requests
            reads_at_recovery = bad.node.calls["node_getBlockNumber"] + bad.node.calls["node_getL2Tips"]
            await wait_for(lambda: backend.breaker.state == "closed", timeout=10.0,
                           what="the recovered node's breaker to close")
            await wait_for(lambda: bad.node.requests >= requests_at_recovery + 20, timeout=10.0,
                           what="the recovered node to get traffic again")
        finally:
            load.stop()
            result = await running
            if port_number is not None:  # failed while the node was down: let the teardown close it
                revive(bad, port_number)

    opened = [(state, failed) for name, state, failed in breakers.events if name == backend.name and state == "open"]
    # Every "open" after the first is a half-open probe that failed.
    probes = breakers.states(backend.name).count("open") - 1
    print(f"\n{fault}: {len(result.codes)} requests, breaker open {opened_after * 1000:.0f} ms after the fault, "
          f"failed attempts at first opening {opened[0][1]:.0f}, during the fault {failed_during_fault:.0f} "
          f"({probes} half-open probes), p99 {result.p(0.99) * 1000:.1f} ms")
    print("   failed attempts by result:", {r: int(n) for r in ATTEMPT_RESULTS_NOT_OK
                                         if (n := sample(service, "sentinel_proxy_upstream_attempts_total",
                                                         backend=backend.label, result=r))})
    assert result.failures == [], f"{len(result.failures)} failed requests, first: {result.failures[:5]}"
    assert set(result.codes) == {200}
    # Opened at the threshold of consecutive failures (a success already on its way may reset the
    # streak once or twice: the bound allows for the load's concurrency)...
    assert opened and policy.consecutive_failures <= opened[0][1] <= policy.consecutive_failures + CONCURRENCY, \
        breakers.events
    # ...and every failed attempt is accounted for: the threshold, requests already in flight to the
    # node when it opened (at most the load's concurrency), and one per half-open probe.
    assert failed_during_fault <= policy.consecutive_failures + CONCURRENCY + probes, breakers.events
    # Recovery: the probes succeeded and the breaker closed (the last transition logged).
    assert breakers.states(backend.name)[-1] == "closed", breakers.events
    assert bad.node.calls["node_getBlockNumber"] + bad.node.calls["node_getL2Tips"] >= reads_at_recovery + 20
    # Metrics tell the story too.
    assert gauge == 1.0
    assert sample(service, "sentinel_proxy_backend_breaker_state", backend=backend.label, state="closed") == 1.0
    transitions = {state: sample(service, "sentinel_proxy_breaker_transitions_total", backend=backend.label,
                                 state=state) for state in ("open", "closed")}
    assert transitions == {"open": probes + 1, "closed": 1}, transitions
    assert sample(service, "sentinel_proxy_failovers_total", route="/") >= policy.consecutive_failures
    # The healthy nodes never tripped.
    for other in nodes:
        if other is not bad:
            assert backend_of(service, other).breaker.state == "closed"
            assert other.node.requests > total // 5


# ----------------------------------------------------------------------------- 2. write safety

#: A write (any params: the simulator answers "method not found"; what matters is who received it).
WRITE = rpc("node_sendTx", [{"tx": "0x" + "00" * 32}], id_="w1")
WRITE_BODIES = {"single": WRITE, "batch-with-a-read": [rpc("node_getBlockNumber", id_=0), WRITE]}
#: Health and integrity checks far apart, so nothing but the call under test reaches the nodes.
QUIET = {"health_check_interval_ms": "600000", "integrity_check_interval_ms": "600000"}


@pytest.mark.parametrize("shape", WRITE_BODIES)
@pytest.mark.parametrize("fault", ["failing-500", "hang", "failing-reset", "failing-garbage"])
@ensure
async def test_write_that_reached_a_node_is_never_sent_again(cluster, fault, shape):
    """The first node received the node_sendTx and then failed: the caller gets a 502 and no
    other node ever sees the call."""
    nodes = [cluster.node("pruned") for _ in range(3)]
    service, url = await ready_gateway(cluster, nodes, **MATRIX_SETTINGS)
    service.pool._random = lambda: 0.0  # the first candidate: nodes[0]
    assert service.pool.pick("/").backend is backend_of(service, nodes[0])
    nodes[0].node.scenario = SCENARIOS[fault]
    before = [n.node.requests for n in nodes]

    answer = await post_json(url, WRITE_BODIES[shape])

    deltas = [n.node.requests - b for n, b in zip(nodes, before)]
    assert deltas == [1, 0, 0], deltas
    assert all(n.node.calls["node_sendTx"] == 0 for n in nodes[1:])
    assert answer.code == 502
    expected = jsonrpc.UPSTREAM_TIMEOUT if fault == "hang" else jsonrpc.UPSTREAM_FAILED
    document = answer.json()  # a batch: one error per item
    assert {item["error"]["code"] for item in (document if isinstance(document, list) else [document])} == {expected}
    assert answer.header("x-sentinel-attempts") == "1"
    assert sample(service, "sentinel_proxy_failovers_total", route="/") == 0
    await wait_for(lambda: nodes[0].node.in_flight == 0, timeout=2.0, what="the hung call's connection to close")


@ensure
async def test_write_fails_over_when_the_connection_is_refused(cluster):
    """A refused connection proves the node never got the call: the write goes to the next node.

    ATTEMPT_TIMEOUT_MS is 2 s here, well above the 0.3 s a refused connect currently takes to
    surface (see test_refused_connection_fails_over_at_once)."""
    nodes = [cluster.node("pruned") for _ in range(3)]
    service, url = await ready_gateway(cluster, nodes, **{**MATRIX_SETTINGS, "attempt_timeout_ms": "2000"})
    service.pool._random = lambda: 0.0
    backends = [backend_of(service, n) for n in nodes]
    port_number = await kill(nodes[0])
    try:
        before = [n.node.requests for n in nodes]
        answer = await post_json(url, WRITE)
        deltas = [n.node.requests - b for n, b in zip(nodes, before)]
    finally:
        revive(nodes[0], port_number)
    # The simulator does not implement node_sendTx: its "method not found" proves the second node
    # executed nothing either (a node of another dialect), so the write goes on to the third, once.
    assert deltas == [0, 1, 1], deltas
    assert nodes[1].node.calls["node_sendTx"] == 1 and nodes[2].node.calls["node_sendTx"] == 1
    assert answer.header("x-sentinel-backend") == backends[2].name
    assert answer.header("x-sentinel-attempts") == "3"
    assert answer.code == 400 and answer.json()["error"]["code"] == jsonrpc.METHOD_NOT_FOUND
    assert sample(service, "sentinel_proxy_upstream_attempts_total", backend=backends[0].label, result="connect") == 1
    assert sample(service, "sentinel_proxy_upstream_attempts_total", backend=backends[1].label,
                  result="wrong_dialect") == 1
    assert sample(service, "sentinel_proxy_failovers_total", route="/") == 2


@ensure
async def test_refused_connection_fails_over_at_once(cluster):
    """BUG (reported to the lead, test kept failing on purpose): a refused connection surfaces
    only after 0.3 s, because twisted's ``Agent`` connects through a ``HostnameEndpoint``, which
    notices that its last address failed only at its next 0.3 s "happy eyeballs" tick. So every
    attempt at a dead node costs 0.3 s, and with ATTEMPT_TIMEOUT_MS <= 300 the refusal is
    classified as a *timeout*: a node_sendTx that provably never reached a node is not failed
    over and the caller gets a 502."""
    nodes = [cluster.node("pruned") for _ in range(2)]
    service, url = await ready_gateway(cluster, nodes, **{**MATRIX_SETTINGS, "attempt_timeout_ms": "250"})
    service.pool._random = lambda: 0.0
    port_number = await kill(nodes[0])
    try:
        began = reactor.seconds()
        read = await post_json(url, read_call(1))
        read_latency = reactor.seconds() - began
        write = await post_json(url, WRITE)
    finally:
        revive(nodes[0], port_number)
    print(f"\nread failing over from a refused port took {read_latency * 1000:.0f} ms; "
          f"write answered HTTP {write.code} {write.body[:120]!r}")
    assert failure_of(read) is None
    assert read_latency < 0.15, f"a refused connect cost {read_latency * 1000:.0f} ms"
    assert write.header("x-sentinel-attempts") == "2" and nodes[1].node.calls["node_sendTx"] == 1, write.body


# --------------------------------------------------------------------------------- 3. timeouts


@ensure
async def test_hanging_node_costs_one_attempt_timeout(cluster):
    hung, good = cluster.node("pruned"), cluster.node("pruned")
    service, url = await ready_gateway(cluster, [hung, good], **MATRIX_SETTINGS)  # attempt timeout 300 ms
    service.pool._random = lambda: 0.0  # the hanging node first
    hung.node.scenario = SCENARIOS["hang"]

    began = reactor.seconds()
    answer = await post_json(url, read_call(1))
    latency = reactor.seconds() - began

    print(f"\nread via a hanging node then a good one: {latency * 1000:.0f} ms (attempt timeout 300 ms)")
    assert failure_of(answer) is None
    assert answer.header("x-sentinel-attempts") == "2"
    assert answer.header("x-sentinel-backend") == backend_of(service, good).name
    assert 0.29 <= latency < 0.3 + 0.5
    await wait_for(lambda: hung.node.in_flight == 0, timeout=2.0, what="the hung connection to close")


@ensure
async def test_overall_deadline_bounds_a_request_when_every_node_hangs(cluster):
    nodes = [cluster.node("pruned") for _ in range(3)]
    _, url = await ready_gateway(cluster, nodes, **{**MATRIX_SETTINGS, "attempt_timeout_ms": "600",
                                                    "request_timeout_ms": "1000"})
    for n in nodes:
        n.node.scenario = SCENARIOS["hang"]

    began = reactor.seconds()
    answer = await post_json(url, read_call(1))
    latency = reactor.seconds() - began

    print(f"\nevery node hanging: answered after {latency * 1000:.0f} ms (request timeout 1000 ms)")
    assert answer.code == 502
    assert answer.json()[0]["error"]["code"] == jsonrpc.UPSTREAM_TIMEOUT, "a one-item batch: an array"
    # 600 ms at the first node, the 400 ms left at the second, no time for a third.
    assert answer.header("x-sentinel-attempts") == "2"
    assert 0.99 <= latency < 1.0 + 0.5
    await wait_for(lambda: all(n.node.in_flight == 0 for n in nodes), timeout=2.0,
                   what="every hung connection to close")


# ---------------------------------------------------------------------------------- 4. hedging

HEDGE_LOAD = 200
HEDGE_CONCURRENCY = 8


@ensure
@pytest.mark.slow
async def test_hedged_reads_cut_the_tail_of_a_slow_node(cluster):
    slow, fast = cluster.node("slow"), cluster.node("pruned")
    # Breakers that never open: the comparison measures hedging alone (see the next test for why).
    no_breaker = dict(breaker_consecutive_failures="100000", breaker_window_failures="100000", **QUIET)
    plain, plain_url = await ready_gateway(cluster, [slow, fast], **no_breaker)
    hedged, hedged_url = await ready_gateway(cluster, [slow, fast], hedge="on", hedge_delay_ms="20", **no_breaker)

    off = await Load(plain_url, HEDGE_CONCURRENCY).run(HEDGE_LOAD)
    on = await Load(hedged_url, HEDGE_CONCURRENCY).run(HEDGE_LOAD)
    hedges = sample(hedged, "sentinel_proxy_hedges_total", route="/")
    slow_backend = backend_of(hedged, slow)
    print(f"\nhedging, {HEDGE_LOAD} reads at {HEDGE_CONCURRENCY} in flight, one node 200 ms slow: "
          f"p50/p99 off {off.p(0.5) * 1000:.1f}/{off.p(0.99) * 1000:.1f} ms, "
          f"on {on.p(0.5) * 1000:.1f}/{on.p(0.99) * 1000:.1f} ms; {hedges:.0f} hedges; slow node attempts "
          f"ok {sample(hedged, 'sentinel_proxy_upstream_attempts_total', backend=slow_backend.label, result='ok'):.0f}"
          f", failed {failed_attempts(hedged, slow_backend):.0f}, breaker {slow_backend.breaker.state}")
    assert off.failures == [] and on.failures == []
    assert sample(plain, "sentinel_proxy_hedges_total", route="/") == 0
    assert hedges > 0
    assert on.p(0.99) < off.p(0.99)

    # The loser is cancelled: its connection closes at once, long before the node would answer.
    slow.node.scenario = dataclasses.replace(SCENARIOS["slow"], name="very-slow", delay_seconds=5.0)
    hedged.pool._random = lambda: 0.0  # the slow node first
    began = reactor.seconds()
    answer = await post_json(hedged_url, read_call(1))
    latency = reactor.seconds() - began
    assert failure_of(answer) is None
    assert answer.header("x-sentinel-backend") == backend_of(hedged, fast).name
    assert answer.header("x-sentinel-attempts") == "2"
    assert latency < 1.0
    await wait_for(lambda: slow.node.in_flight == 0, timeout=1.0, what="the losing request to be cancelled")


@ensure
async def test_a_lost_hedge_race_is_no_failure_of_the_slow_node(cluster):
    """BUG (reported to the lead, test kept failing on purpose): the cancelled loser of a hedge
    race surfaces as ``ResponseNeverReceived`` and is recorded as a "transport" failure, so with
    the default breaker a node that is merely slower than the hedge delay is ejected after five
    hedges, although it answered nothing wrong."""
    slow, fast = cluster.node("slow"), cluster.node("pruned")
    service, url = await ready_gateway(cluster, [slow, fast], hedge="on", hedge_delay_ms="20", **QUIET)
    service.pool._random = lambda: 0.0  # the slow node first, every time
    slow_backend = backend_of(service, slow)
    rounds = 2 * slow_backend.breaker.policy.consecutive_failures
    for i in range(rounds):
        answer = await post_json(url, read_call(i))
        assert failure_of(answer) is None
        assert answer.header("x-sentinel-backend") == backend_of(service, fast).name
    results = {r: n for r in ATTEMPT_RESULTS_NOT_OK
               if (n := sample(service, "sentinel_proxy_upstream_attempts_total", backend=slow_backend.label,
                               result=r))}
    assert results == {}, f"lost hedge races counted as failures of the slow node: {results}"
    assert slow_backend.breaker.state == "closed"
    assert sample(service, "sentinel_proxy_hedges_total", route="/") == rounds


# ----------------------------------------------------------------------------- 5. backpressure


@ensure
@pytest.mark.slow
async def test_overload_is_refused_at_once_with_retry_after(cluster):
    node = cluster.node("pruned")
    service, url = await ready_gateway(cluster, [node], max_in_flight="4", **QUIET)
    node.node.scenario = dataclasses.replace(SCENARIOS["slow"], name="slow-1s", delay_seconds=1.0)

    async def one(i: int) -> tuple[Any, float]:
        began = reactor.seconds()
        answer = await post_json(url, read_call(i))
        return answer, reactor.seconds() - began

    results = await defer.gatherResults([defer.Deferred.fromCoroutine(one(i)) for i in range(20)])
    refused = [(a, t) for a, t in results if a.code == 503]
    served = [(a, t) for a, t in results if a.code == 200]
    print(f"\n20 requests at max_in_flight=4: {len(served)} served in "
          f"{min(t for _, t in served) * 1000:.0f}-{max(t for _, t in served) * 1000:.0f} ms, {len(refused)} refused "
          f"in at most {max((t for _, t in refused), default=0) * 1000:.0f} ms")
    assert len(refused) + len(served) == 20, [a.code for a, _ in results]
    assert 4 <= len(served) < 20 and refused
    for answer, latency in refused:
        assert answer.header("retry-after") == "1"
        assert answer.json()[0]["error"]["code"] == jsonrpc.OVERLOADED, "a one-item batch: an array"
        assert latency < 0.5  # well before any slow answer (1 s)
    for answer, latency in served:
        assert failure_of(answer) is None and latency >= 0.99

    node.node.scenario = SCENARIOS["pruned"]
    after = await post_json(url, read_call(99))
    assert failure_of(after) is None
    assert service.forwarder.in_flight == 0


# ---------------------------------------------------------------------- 6. oversized upstream answer

BIG_READ = [rpc("node_getBlocks", [RECENT, 5], id_=0)]  # ~14 kB from the simulator


@ensure
async def test_oversized_answer_is_a_502_and_not_retried(cluster):
    nodes = [cluster.node("pruned") for _ in range(2)]
    # The integrity check's ~35 kB answer is refused as well, so the nodes stay unverified: fine here.
    _, url = await cluster.gateway(nodes, max_response_bytes="2000", **QUIET)
    before = sum(n.node.requests for n in nodes)

    answer = await post_json(url, BIG_READ)

    assert answer.code == 502
    (error,) = [item["error"] for item in answer.json()]  # a one-item batch: an array
    assert error["code"] == jsonrpc.UPSTREAM_FAILED and "2000" in error["message"]
    assert answer.header("x-sentinel-attempts") == "1"
    assert sum(n.node.requests for n in nodes) - before == 1
    small = await post_json(url, read_call(1))
    assert failure_of(small) is None


@ensure
async def test_oversized_answers_do_not_eject_a_healthy_node(cluster):
    """BUG (reported to the lead, test kept failing on purpose): an answer over
    MAX_RESPONSE_BYTES is fed to the node's circuit breaker as a failure, so any caller can eject
    a healthy node, and with it the whole gateway, with BREAKER_CONSECUTIVE_FAILURES large reads."""
    node = cluster.node("pruned")
    service, url = await cluster.gateway([node], max_response_bytes="2000", **QUIET)
    backend = backend_of(service, node)
    for _ in range(backend.breaker.policy.consecutive_failures):
        assert (await post_json(url, BIG_READ)).code == 502
    small = await post_json(url, read_call(1))
    assert backend.breaker.state == "closed"
    assert failure_of(small) is None, small.body


# ------------------------------------------------------------------- 7. graceful shutdown in-process


def abort_accepted(port_number: int) -> int:
    """What the reactor does to the connections left once twistd's services have stopped
    (``disconnectAll``): drop them, unsent data included. Returns how many there were."""
    accepted = [c for c in node_connections(port_number) if isinstance(c, tcp.Server)]
    for connection in accepted:
        connection.abortConnection()
    return len(accepted)


@ensure
async def test_stop_refuses_new_connections_and_drains_requests_in_flight(cluster):
    """stopService closes the listener at once, and fires only once the request in flight has been
    answered: when it fires, the process may exit (twistd stops the reactor, which drops every
    connection left), so the answer must already be on its way to the caller by then."""
    node = cluster.node("pruned")
    service, url = await ready_gateway(cluster, [node], **QUIET)
    node.node.scenario = dataclasses.replace(SCENARIOS["slow"], name="slow-500ms", delay_seconds=0.5)
    port = service.listener.port
    port_number = port.getHost().port
    events: list[str] = []

    request = defer.Deferred.fromCoroutine(post_json(url, read_call(1)))
    request.addBoth(lambda result: events.append("request answered") or result)
    await wait_for(lambda: node.node.in_flight == 1, what="the request to reach the node")

    cluster.gateways.remove(service)  # stopped here, not again at teardown
    stopping = service.stopService()

    def stopped(_: object) -> None:
        events.append(f"stopped, node in flight {node.node.in_flight}, gateway in flight "
                      f"{service.forwarder.in_flight}; dropped {abort_accepted(port_number)} connections")

    stopping.addCallback(stopped)
    await wait_for(lambda: not port.connected, timeout=2.0, what="the listener to close")
    with pytest.raises(ConnectError):
        await post_json(url, read_call(2), timeout=5.0)
    assert not stopping.called

    stopping.addTimeout(5.0, reactor)
    await stopping
    answer = await request
    print("\n" + "; ".join(events))
    assert failure_of(answer) is None
    # The stop waits until the answer has left the gateway, so the caller may even have read it first.
    assert any(e.startswith("stopped, node in flight 0, gateway in flight 0") for e in events), events


class ClosingNode(Resource):
    """The node behind a server that closes every connection after its answer ("Connection:
    close", as some reverse proxies do): the gateway keeps no pooled connection to it."""

    isLeaf = True

    def __init__(self, node: Any):
        super().__init__()
        self.node = node

    def render(self, request: Any) -> Any:
        request.setHeader(b"connection", b"close")
        return self.node.render(request)


@ensure
async def test_stop_fires_only_once_the_answer_is_written(cluster):
    """BUG (reported to the lead, test kept failing on purpose): the drain waiter fires inside the
    forwarder, before the web layer has written the reply. When nothing else in stopService has to
    wait (here: no pooled upstream connection to close), stopService completes right there, and
    twistd's reactor then drops the caller's connection before the answer is written: the very
    request the drain was waiting for is cut off."""
    node = cluster.node("pruned")
    closing = reactor.listenTCP(0, Site(ClosingNode(node.node)), interface="127.0.0.1")
    try:
        service, url = await cluster.gateway([f"http://127.0.0.1:{closing.getHost().port}"], **QUIET)
        node.node.scenario = dataclasses.replace(SCENARIOS["slow"], name="slow-300ms", delay_seconds=0.3)
        port_number = service.listener.port.getHost().port
        dropped: list[int] = []
        request = defer.Deferred.fromCoroutine(post_json(url, read_call(1)))
        await wait_for(lambda: node.node.in_flight == 1, what="the request to reach the node")
        cluster.gateways.remove(service)
        stopping = service.stopService()
        stopping.addCallback(lambda _: dropped.append(abort_accepted(port_number)))
        stopping.addTimeout(5.0, reactor)
        await stopping
        try:
            answer = await request
        except Exception as exc:  # noqa: BLE001
            answer = exc
    finally:
        await closing.stopListening()
    assert dropped == [0], f"stopService fired with {dropped} caller connections still open; caller got {answer!r}"
    assert failure_of(answer) is None


@ensure
async def test_stop_gives_up_on_a_hung_request_after_the_grace(cluster):
    node = cluster.node("pruned")
    service, url = await ready_gateway(cluster, [node], shutdown_grace_ms="100", attempt_timeout_ms="10000",
                                       request_timeout_ms="10000", **QUIET)
    node.node.scenario = SCENARIOS["hang"]
    request = defer.Deferred.fromCoroutine(post_json(url, read_call(1), timeout=15.0))
    await wait_for(lambda: node.node.in_flight == 1, what="the request to reach the node")

    cluster.gateways.remove(service)
    began = reactor.seconds()
    stopping = service.stopService()
    stopping.addTimeout(5.0, reactor)
    await stopping
    took = reactor.seconds() - began
    print(f"\nstop with a hung request and a 100 ms grace took {took * 1000:.0f} ms")
    assert 0.09 <= took < 0.1 + 0.5
    # After the grace the gateway closes what is left (the process exits next): the caller of the
    # hung request sees its connection closed, not a 200 nor a hang.
    outcome = await request.addErrback(lambda failure: ("failed", failure.value))
    assert isinstance(outcome, tuple) and outcome[0] == "failed", outcome
    cut_connections(node)


# ------------------------------------------------------------------------ 8-9. signals under twistd

LISTENING = r"listening on IPv4Address\(type='TCP', host='127\.0\.0\.1', port=(\d+)\)"


def start_simnode(tmp_path: Path, scenario: str) -> tuple[Daemon, int]:
    directory = tmp_path / f"simnode-{scenario}-{time.monotonic_ns()}"
    directory.mkdir()
    daemon = Daemon(["sentinel-simnode", "--scenario", scenario, "--listen", "tcp:0:interface=127.0.0.1"],
                    directory)
    return daemon, int(daemon.wait_for_line(r"starting on (\d+)").group(1))


def health_of(base: str) -> dict:
    status, body = fetch(base + "/health")
    assert status == 200
    return json.loads(body)


def healthy_backends(base: str) -> int:
    try:
        return sum(b["healthy"] for b in health_of(base)["backends"])
    except (OSError, ValueError):
        return 0


class ThreadLoad:
    """Threads posting reads with urllib (one connection per request), each outcome recorded with
    the request id and when it started, until stopped or the gateway refuses connections."""

    def __init__(self, base: str, threads: int):
        self.base = base
        self.outcomes: list[tuple[str, float, str]] = []  # (request id, started, outcome)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work, args=(n,), daemon=True) for n in range(threads)]
        for thread in self._threads:
            thread.start()

    def _one(self, request_id: str) -> str:
        body = json.dumps(read_call(0)).encode()
        request = urllib.request.Request(self.base + "/", data=body, headers={
            "Content-Type": "application/json", "X-Request-ID": request_id})
        try:
            with urllib.request.urlopen(request, timeout=20) as response:
                items = json.loads(response.read())
                return "ok" if response.status == 200 and "result" in items[0] else f"HTTP {response.status}"
        except urllib.error.HTTPError as error:
            return f"HTTP {error.code}: {error.read()[:200]!r}"
        except urllib.error.URLError as error:
            return f"{error.reason.__class__.__name__}: {error.reason}"
        except Exception as exc:  # noqa: BLE001 - resets, incomplete reads: every one is a finding
            return f"{exc.__class__.__name__}: {exc}"

    def _work(self, thread: int) -> None:
        n = 0
        while not self._stop.is_set():
            request_id = f"load-{thread}-{n}"
            n += 1
            started = time.monotonic()
            outcome = self._one(request_id)
            with self._lock:
                self.outcomes.append((request_id, started, outcome))
            if outcome.startswith("ConnectionRefusedError"):
                return

    def count(self, outcome: str = "ok") -> int:
        with self._lock:
            return sum(o == outcome for _, _, o in self.outcomes)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


SIGTERM_THREADS = 16


@pytest.mark.slow
def test_sigterm_under_load_cuts_no_request_off(tmp_path):
    """A real daemon in front of a node that takes 200 ms per answer, 16 callers at once: on
    SIGTERM every request the gateway had accepted is answered 200, later ones are refused (never
    reset), and the process exits 0.

    BUG (reported to the lead; this test fails until it is fixed): the last request to finish
    draining is logged "200 ok" by the gateway but its caller gets "Remote end closed connection
    without response": stopService completes before that reply leaves the process, and the
    reactor then drops the connection (see test_stop_fires_only_once_the_answer_is_written)."""
    node, node_port = start_simnode(tmp_path, "slow")
    # No cache: every request must really wait for the slow node, so the signal meets some in flight.
    gateway = Daemon(["sentinel-proxy", "--backends", f"http://127.0.0.1:{node_port}", "--listen",
                      "tcp:0:interface=127.0.0.1", "--expected-validators", "48", "--cache", "off"], tmp_path)
    load = None
    try:
        base = f"http://127.0.0.1:{gateway.wait_for_line(LISTENING).group(1)}"
        assert poll(lambda: healthy_backends(base) == 1), "".join(gateway.lines)
        load = ThreadLoad(base, SIGTERM_THREADS)
        assert poll(lambda: load.count() >= 3 * SIGTERM_THREADS, timeout=30), load.outcomes[:5]
        sent = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        code = gateway.process.wait(timeout=30)
        load.stop()
    finally:
        if load is not None:
            load.stop()
        code = gateway.stop()
        node.stop()
    log = "".join(gateway.lines)
    draining = re.search(r"received SIGTERM: closing the listener and draining (\d+) requests in flight", log)
    outcomes = load.outcomes
    failed = [(rid, outcome) for rid, started, outcome in outcomes
              if outcome != "ok" and not (outcome.startswith("ConnectionRefusedError") and started >= sent)]
    served_after = sum(o == "ok" and started >= sent for _, started, o in outcomes)
    print(f"\nSIGTERM with {draining and draining.group(1)} requests in flight: {load.count()} answered 200 "
          f"({served_after} of them started after the signal), "
          f"{sum(o.startswith('ConnectionRefusedError') for _, _, o in outcomes)} refused, {len(failed)} failed")
    assert code == 0, log
    assert draining and int(draining.group(1)) > 0, log  # the signal did meet requests in flight
    details = [(rid, outcome, f"started {started - sent:+.3f} s from the signal",
                "in the access log" if f"{rid} " in log else "not in the access log")
               for rid, started, outcome in outcomes if (rid, outcome) in failed]
    after_signal = log[log.find("received SIGTERM"):]
    print(f"access log lines after the signal: {after_signal.count(' 200 ok ')}")
    assert failed == [], f"{details[:10]}\n{log}"
    assert "Traceback" not in log


@pytest.mark.slow
def test_sighup_reloads_backends_and_refuses_a_bad_config(tmp_path):
    node_a, port_a = start_simnode(tmp_path, "pruned")
    node_b, port_b = start_simnode(tmp_path, "pruned")
    url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"SENTINEL_BACKENDS={url_a}\nHEALTH_CHECK_INTERVAL_MS=300\n")
    gateway = Daemon(["sentinel-proxy", "--listen", "tcp:0:interface=127.0.0.1"], tmp_path)
    load = None
    try:
        base = f"http://127.0.0.1:{gateway.wait_for_line(LISTENING).group(1)}"
        assert poll(lambda: healthy_backends(base) == 1), "".join(gateway.lines)
        load = ThreadLoad(base, 2)  # traffic throughout: a reload must not drop any of it

        dotenv.write_text(f"SENTINEL_BACKENDS={url_a},{url_b}\nHEALTH_CHECK_INTERVAL_MS=300\n")
        gateway.process.send_signal(signal.SIGHUP)
        changed = gateway.wait_for_line(r"reload: backends (.*) -> (.*)").group(0)
        assert url_b in changed
        assert poll(lambda: healthy_backends(base) == 2), health_of(base)
        assert [b["url"] for b in health_of(base)["backends"]] == [url_a, url_b]

        dotenv.write_text(f"SENTINEL_BACKENDS={url_a}\nHEALTH_CHECK_INTERVAL_MS=300\nREQUEST_TIMEOUT_MS=abc\n")
        gateway.process.send_signal(signal.SIGHUP)
        refused = gateway.wait_for_line(r"reload refused, keeping the running configuration: (.*)").group(1)
        assert "REQUEST_TIMEOUT_MS" in refused and "abc" in refused
        assert [b["url"] for b in health_of(base)["backends"]] == [url_a, url_b]
        served = load.count()
        assert poll(lambda: load.count() >= served + 10), load.outcomes[-5:]
        status, body = fetch(base + "/", json.dumps(read_call(1)).encode())
        assert status == 200 and "result" in json.loads(body)[0]
        load.stop()
        assert {o for _, _, o in load.outcomes} == {"ok"}, [o for o in load.outcomes if o[2] != "ok"][:5]
    finally:
        if load is not None:
            load.stop()
        code = gateway.stop()
        node_a.stop()
        node_b.stop()
    assert code == 0, "".join(gateway.lines)
    assert "Traceback" not in "".join(gateway.lines)
