"""Shared helpers for the loopback tests: simulated nodes, a real listening gateway, an HTTP client.

Waiting is done on Deferreds or by polling with a bound, never by sleeping a fixed time.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import defer, reactor, task
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from sentinel_proxy.config import Settings, load_settings
from sentinel_simnode.node import SCENARIOS, ChainParams, SimulatedNode, simulated_site
from sentinel_proxy.service import Gateway as GatewayService, build_service
from sentinel_proxy.upstream.client import BytesProducer, read_body

#: A small, slow chain: the tip does not move during a test, so direct and proxied answers match,
#: and the archiver's long history stays small enough to analyse in milliseconds.
TEST_CHAIN = ChainParams(slots_per_epoch=8, committee_size=4, slot_seconds=600.0, block_seconds=600.0)
CHAIN_SETTINGS = {"slots_per_epoch": "8", "expected_validators": "4"}

JSON = {b"content-type": [b"application/json"]}
#: DRAIN_DELAY_MS of the gateways the tests start (the default, 3 s, is for load balancers): every
#: stop drains. tests/test_drain.py tests the delay itself.
TEST_DRAIN_DELAY_MS = 20


@dataclass
class Answer:
    code: int
    headers: Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


async def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
               timeout: float = 10.0) -> Answer:
    """One HTTP exchange without any decoding, so tests see exactly what went over the wire.

    (treq's clients always gunzip answers; a bare ``Agent`` does not.)
    """
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    producer = None if body is None else BytesProducer(body)
    exchange = defer.Deferred.fromCoroutine(_exchange(agent, method, url, producer, headers))
    exchange.addTimeout(timeout, reactor)
    return await exchange


async def _exchange(agent: Agent, method: str, url: str, producer: Any, headers: dict | None) -> Answer:
    response = await agent.request(method.encode(), url.encode(), Headers(headers if headers is not None else JSON),
                                   producer)
    return Answer(response.code, response.headers, await read_body(response))


async def post_json(url: str, value: Any, headers: dict | None = None, timeout: float = 10.0) -> Answer:
    return await http("POST", url, json.dumps(value).encode(), headers, timeout)


def rpc(method: str, params: list | None = None, id_: Any = 1) -> dict:
    return {"jsonrpc": "2.0", "id": id_, "method": method, "params": params or []}


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` every 20 ms until it holds, failing after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await task.deferLater(reactor, 0.02, lambda: None)


@dataclass
class RunningNode:
    node: SimulatedNode
    port: Any

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"


@dataclass
class Cluster:
    """Things a test started, stopped in reverse order at teardown."""

    nodes: list[RunningNode] = field(default_factory=list)
    gateways: list[GatewayService] = field(default_factory=list)

    def node(self, scenario: str = "pruned", chain: ChainParams = TEST_CHAIN, dialect: str = "4") -> RunningNode:
        sim = SimulatedNode(SCENARIOS[scenario], chain, clock=reactor, dialect=dialect)
        running = RunningNode(sim, reactor.listenTCP(0, simulated_site(sim), interface="127.0.0.1"))
        self.nodes.append(running)
        return running

    def settings(self, backends: list[str], **overrides: str) -> Settings:
        # The cache is off unless a test is about it: most tests count what reaches the nodes.
        cli = {"backends": ",".join(backends), "listen": "tcp:0:interface=127.0.0.1",
               "health_check_interval_ms": "200", "integrity_check_interval_ms": "500",
               "request_timeout_ms": "2000", "cache": "off", "drain_delay_ms": str(TEST_DRAIN_DELAY_MS),
               **CHAIN_SETTINGS, **overrides}
        return load_settings(cli=cli, environ={}, dotenv_path=None)

    async def gateway(self, nodes: list[RunningNode] | list[str], wait_healthy: int | None = None,
                      **overrides: str) -> tuple[GatewayService, str]:
        """Start a real listening gateway; by default wait until every node is healthy and typed."""
        urls = [n if isinstance(n, str) else n.url for n in nodes]
        service = build_service(self.settings(urls, **overrides), reactor)
        service.startService()
        self.gateways.append(service)
        wanted = len(urls) if wait_healthy is None else wait_healthy
        await wait_for(lambda: sum(b.healthy and b.node_type != "" for b in service.pool.backends) >= wanted,
                       what=f"{wanted} healthy, classified backends")
        return service, f"http://127.0.0.1:{service.listener.port.getHost().port}"

    async def stop(self) -> None:
        for service in reversed(self.gateways):
            await service.stopService()
        for running in reversed(self.nodes):
            await running.port.stopListening()

