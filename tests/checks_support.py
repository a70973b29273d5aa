"""The checks in memory: a pool and a check client over simulated nodes on a Clock
(tests/test_checks.py, test_check_deadlines.py)."""
from __future__ import annotations

from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet import task
from twisted.web.resource import Resource

from sentinel_proxy.checks import CheckClient, HealthService, IntegrityService
from sentinel_proxy.checks.client import CHECK_MAX_RESPONSE
from sentinel_proxy.checks.integrity import Runner, run_inline
from sentinel_proxy.core.integrity import IntegrityParams
from sentinel_proxy.state.backends import BackendPool
from sentinel_simnode.node import ChainParams, SimulatedNode


#: A chain that does not move while a test runs, small enough to analyse in milliseconds.
CHAIN = ChainParams(slots_per_epoch=8, committee_size=4, slot_seconds=600.0, block_seconds=600.0)
PARAMS = IntegrityParams(slots_per_epoch=8, expected_validators=4)


TIMEOUT = 5.0


class ByHost(Resource):
    """One in-memory server for several nodes, told apart by the Host header (``name:1``)."""

    isLeaf = True

    def __init__(self, nodes: dict[str, Resource]):
        super().__init__()
        self.nodes = nodes

    def render(self, request: Any) -> Any:
        return self.nodes[request.getHeader(b"host").decode()].render(request)


class Setup:
    """Backends named after their ``nodes`` keys (``http://name:1``) and the check client over them."""

    def __init__(self, clock: task.Clock, nodes: dict[str, Resource], limit: int = CHECK_MAX_RESPONSE,
                 **pool_options: Any):
        self.clock = clock
        self.router = ByHost({f"{name}:1": node for name, node in nodes.items()})
        self.agent = RequestTraversalAgent(self.router)
        self.client = CheckClient.over(self.agent, self.clock, limit)
        self.pool = BackendPool([f"http://{name}:1" for name in nodes], **pool_options)
        self.backends = dict(zip(nodes, self.pool.backends))

    def health(self, client: Any = None) -> HealthService:
        return HealthService(self.pool, client or self.client, 30.0, TIMEOUT, self.clock)

    def integrity(self, runner: Runner = run_inline) -> IntegrityService:
        return IntegrityService(self.pool, self.client, 60.0, TIMEOUT, self.clock, PARAMS, runner=runner)


def simulated(scenario: str, clock: task.Clock, dialect: str = "4") -> SimulatedNode:
    return SimulatedNode(scenario, CHAIN, clock=clock, dialect=dialect)
