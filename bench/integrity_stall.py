"""How long does an integrity check stall the reactor? (a measurement, not a test)

Serves a 4.x-sized node_getValidatorsStats answer (32 slots per epoch, committee 48, 24 epochs of
history: ~37,000 entries, ~1.5 MB) from a simulated node on loopback, runs the IntegrityService
check against it repeatedly, and records the longest gap between reactor turns while it does, once
with the analysis on the reactor thread and once in the reactor's thread pool.

    .venv/bin/python bench/integrity_stall.py [--rounds 10]
"""
from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

from twisted.internet import defer, reactor, task, threads

from sentinel_proxy.state.backends import BackendPool
from sentinel_proxy.checks import CheckClient, IntegrityService, run_inline
from sentinel_proxy.core.integrity import IntegrityParams
from sentinel_simnode.node import SCENARIOS, ChainParams, SimulatedNode, simulated_site
from sentinel_proxy.upstream.client import PooledAgent

CHAIN = ChainParams(slots_per_epoch=32, committee_size=48)
PARAMS = IntegrityParams(slots_per_epoch=32, expected_validators=48)


class GapMeter:
    """Ticks every millisecond; the longest interval between ticks is the longest stall."""

    def __init__(self) -> None:
        self.gaps: list[float] = []
        self._last = time.perf_counter()
        self._loop = task.LoopingCall(self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        self.gaps.append(now - self._last)
        self._last = now

    def start(self) -> None:
        self._last = time.perf_counter()
        self._loop.start(0.001, now=False)

    def stop(self) -> float:
        self._loop.stop()
        return max(self.gaps, default=0.0)


async def measure(rounds: int) -> None:
    node = SimulatedNode(SCENARIOS["pruned"], CHAIN, clock=reactor)
    port = reactor.listenTCP(0, simulated_site(node), interface="127.0.0.1")
    pool = BackendPool([f"http://127.0.0.1:{port.getHost().port}"])
    upstream = PooledAgent(reactor)
    in_thread = partial(threads.deferToThreadPool, reactor, reactor.getThreadPool())
    body = node.handle_body(b'{"jsonrpc":"2.0","id":1,"method":"node_getValidatorsStats","params":[]}')[1]
    print(f"answer: {len(body) / 1e6:.2f} MB")
    for label, runner in (("on the reactor thread", run_inline), ("in the thread pool", in_thread)):
        service = IntegrityService(pool, CheckClient.over(upstream.agent, reactor), 3600, 30, reactor, PARAMS, runner=runner)
        stalls = []
        for _ in range(rounds):
            meter = GapMeter()
            meter.start()
            await service.run_once()
            # The stall ends in the turn that finishes the check: let the meter tick once more.
            await task.deferLater(reactor, 0.005, lambda: None)
            stalls.append(meter.stop() * 1000)
        verdict = pool.backends[0].verdict
        print(f"{label:24s} longest stall per check: median {statistics.median(stalls):5.1f} ms, "
              f"max {max(stalls):5.1f} ms  (verdict {verdict.status}, {verdict.score})")
    await upstream.close()
    await port.stopListening()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    def run() -> defer.Deferred:
        return defer.ensureDeferred(measure(args.rounds)).addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()


if __name__ == "__main__":
    main()
