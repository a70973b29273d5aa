"""``--demo``: four simulated Aztec nodes in the gateway's own process, so a newcomer sees every
feature work without an Aztec node at hand.

The simulated chain follows the gateway's own SLOTS_PER_EPOCH and EXPECTED_VALIDATORS, so the
integrity check judges the simulated history by the rules it was generated with.
"""
from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from sentinel_proxy.state.backends import BackendPool
from sentinel_proxy.settings import Settings
from sentinel_proxy.ops.logs import observer
from sentinel_simnode.node import SCENARIOS, ChainParams, SimulatedNode, simulated_site

log = Logger(observer=observer)

#: One node per thing the gateway must tell apart: a deep archiver, a pruned node, a node with
#: holes in its history and a node behind the others.
DEMO_SCENARIOS = ("archiver", "pruned", "missing-epochs", "lagging")


def announce(url: str) -> None:
    """Once the gateway listens at ``url``: where to look, and a first call to try (``-k``: a demo's
    TLS certificate is self-signed)."""
    log.info("demo: open {url}/dashboard in a browser, or try: curl -s{insecure} -H 'Content-Type: application/json' "
             "-d '[{{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"node_getBlockNumber\",\"params\":[]}}]' {url}/",
             url=url, insecure="k" if url.startswith("https:") else "")


def demo_chain(settings: Settings) -> ChainParams:
    return ChainParams(slots_per_epoch=settings.slots_per_epoch, committee_size=settings.expected_validators,
                       slot_seconds=12.0, block_seconds=2.0)


class DemoNodesService(Service):
    """Binds the simulated nodes on loopback ports the kernel picks, then points the pool at them."""

    def __init__(self, pool: BackendPool, settings: Settings, reactor: Any):
        self._pool = pool
        self._settings = settings
        self._reactor = reactor
        self.ports: list[IListeningPort] = []
        #: (name, URL) of the simulated nodes, kept across reloads of SENTINEL_BACKENDS.
        self.entries: list[tuple[str, str]] = []

    def startService(self) -> None:
        super().startService()
        chain = demo_chain(self._settings)
        urls = []
        for name in DEMO_SCENARIOS:
            node = SimulatedNode(SCENARIOS[name], chain, clock=self._reactor)
            port = self._reactor.listenTCP(0, simulated_site(node), interface="127.0.0.1")
            self.ports.append(port)
            url = f"http://127.0.0.1:{port.getHost().port}"
            urls.append((f"demo-{name}", url))
            log.info("demo: simulated {scenario} node at {url}", scenario=name, url=url)
        self.entries = urls
        self._pool.replace(list(self._settings.backends) + urls)

    def stopService(self) -> Any:
        super().stopService()
        ports, self.ports = self.ports, []
        for port in ports:
            port.stopListening()
