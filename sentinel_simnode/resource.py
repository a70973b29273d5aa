"""The simulated node as a ``twisted.web`` resource: routing, scenarios, failure modes, headers.

``SimulatedNode`` is the only part of the simulator that reads a clock (injected, ``IReactorTime``); the
chain it reports is ``chain_state(params, scenario, elapsed)``.  It speaks one dialect, 4.x (``"4"``,
the default) or 5.x (``"5"``): the method table (``methods4``/``methods5``), the JSON-RPC envelope
(``rpc.JsonRpcEngine``), ``GET /status`` and the version headers follow it.
"""

from __future__ import annotations

import gzip
import zlib
from collections import Counter
from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from sentinel_simnode.chain import DIALECTS, ChainParams, ChainState, Scenario, chain_salt, chain_state, dumps, \
    get_scenario, hash32
from sentinel_simnode.methods4 import NodeMethods
from sentinel_simnode.methods5 import NodeMethods5
from sentinel_simnode.rpc import GZIP_MIN_BYTES, MAX_BODY, NULL_ID, Handler, JsonRpcEngine, accepts_gzip, \
    error_json, inflate

log = Logger()

#: ``x-aztec-packageVersion`` and ``nodeVersion`` per dialect (the published releases the shapes follow).
PACKAGE_VERSIONS = {"legacy": "2.1.2", "4": "4.1.2", "5": "5.2.0"}


def package_version(scenario: Scenario, dialect: str) -> str:
    return PACKAGE_VERSIONS["legacy" if scenario.legacy else dialect]


def rollup_address(scenario: Scenario) -> str:
    return "0x" + hash32("rollup", f"{scenario.l1_chain_id}:{scenario.rollup_version}")[2:42]


def version_headers(scenario: Scenario, dialect: str) -> tuple[tuple[bytes, bytes], ...]:
    """The headers on every answer: CORS and the ``x-aztec-*`` component versions."""
    generation = 2 if scenario.legacy else 1
    headers = {
        "Access-Control-Allow-Origin": "*",
        "x-aztec-l1ChainId": str(scenario.l1_chain_id),
        "x-aztec-rollupVersion": str(scenario.rollup_version),
        "x-aztec-l2ProtocolContractsHash": hash32("protocol-contracts", generation),
        "x-aztec-l2CircuitsVkTreeRoot": hash32("vk-tree", generation),
        "x-aztec-packageVersion": package_version(scenario, dialect),
        "x-aztec-l1RollupAddress": rollup_address(scenario),
    }
    return tuple((k.encode(), v.encode()) for k, v in headers.items())


def node_info_json(scenario: Scenario, dialect: str) -> bytes:
    """The ``getNodeInfo`` result."""
    chain = f"{scenario.l1_chain_id}:{scenario.rollup_version}"
    l1 = {
        f"{name}Address": "0x" + hash32(name, chain)[2:42]
        for name in ("registry", "inbox", "outbox", "feeJuice", "feeJuicePortal", "stakingAsset")
    }
    return dumps({
        "nodeVersion": package_version(scenario, dialect),
        "l1ChainId": scenario.l1_chain_id,
        "rollupVersion": scenario.rollup_version,
        "enr": "enr:-" + hash32("enr", chain)[2:],
        "l1ContractAddresses": {"rollupAddress": rollup_address(scenario), **l1},
        "protocolContractAddresses": {
            name: "0x" + f"{i + 1:064x}"
            for i, name in enumerate(("classRegistry", "feeJuice", "instanceRegistry", "multiCallEntrypoint"))
        },
        "realProofs": True,
    }).encode()


def _request_body(request: Request) -> bytes | tuple[int, bytes, bool]:
    """The JSON-RPC body of a POST, inflated; or the (status, body, text) answer that refuses it."""
    content_type = (request.getHeader(b"content-type") or b"").split(b";", 1)[0].strip().lower()
    if content_type != b"application/json":
        return 400, error_json(NULL_ID, -32600, "Content-Type must be application/json"), False
    content = request.content
    size = content.seek(0, 2)
    content.seek(0)
    if size > MAX_BODY:
        return 413, error_json(NULL_ID, -32600, "Request body too large"), False
    body = content.read()
    encoding = (request.getHeader(b"content-encoding") or b"identity").strip().lower()
    if encoding in (b"gzip", b"x-gzip", b"deflate"):
        try:
            inflated = inflate(body)
        except zlib.error as e:
            return 400, error_json(NULL_ID, -32700, f"Parse error: {e}"), False
        if inflated is None:
            return 413, error_json(NULL_ID, -32600, "Request body too large"), False
        return inflated
    if encoding != b"identity":
        return 415, b"Unsupported Content-Encoding", True
    return body


class SimulatedNode(Resource):
    """The fake node as a ``twisted.web`` root resource: ``POST /``, ``GET /status``, 404 elsewhere.

    ``scenario`` may be replaced at runtime (a ``Scenario`` or its name) to turn a healthy node into a
    failing one mid-test.  ``requests`` counts HTTP POSTs and ``calls`` counts JSON-RPC method names,
    so tests can check what the gateway actually sent upstream.  ``dialect`` is ``"4"`` or ``"5"``
    (fixed per node); ``reorder_batches`` (None, ``"reverse"``, ``"shuffle"``) reorders batch answers.
    ``handlers`` is the method table (full name -> handler) in use, which tests may patch.
    """

    isLeaf = True

    def __init__(
        self,
        scenario: Scenario | str = "pruned",
        chain: ChainParams = ChainParams(),
        clock: IReactorTime | None = None,
        dialect: str = "4",
        reorder_batches: str | None = None,
    ) -> None:
        super().__init__()
        if dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {', '.join(DIALECTS)}, not {dialect!r}")
        if clock is None:
            from twisted.internet import reactor  # here, so importing this module installs no reactor

            clock = reactor
        self.chain = chain
        self.dialect = dialect
        self._clock: IReactorTime = clock
        self._started = clock.seconds()
        self.requests = 0
        self.calls: Counter[str] = Counter()
        self._held: set[Request] = set()
        self._tip_cache: dict[str, bytes] = {}
        self._tip_cache_tip = -1
        self._methods = NodeMethods5(self) if dialect == "5" else NodeMethods(self)
        self._engine = JsonRpcEngine(dialect, {}, self.calls, reorder_batches)
        self.scenario = scenario

    # -- scenario and state

    @property
    def scenario(self) -> Scenario:
        """The current behaviour; assigning one (or a name) resets every per-scenario cache."""
        return self._scenario

    @scenario.setter
    def scenario(self, value: Scenario | str) -> None:
        scenario = get_scenario(value)
        if scenario.legacy and self.dialect != "4":
            raise ValueError(f"scenario {scenario.name!r} has 2.x/3.x shapes: it needs dialect 4, not {self.dialect}")
        self._scenario = scenario
        self.chain_key = (scenario.l1_chain_id, scenario.rollup_version)
        self.salt = chain_salt(self.chain_key)
        self._tip_cache.clear()
        self._tip_cache_tip = -1
        self._headers = version_headers(scenario, self.dialect)
        self.node_info = node_info_json(scenario, self.dialect)
        self._engine.handlers = self._methods.table()
        log.info("simulated node scenario is now {scenario}", scenario=scenario.name)

    @property
    def handlers(self) -> dict[str, Handler]:
        return self._engine.handlers

    @property
    def reorder_batches(self) -> str | None:
        return self._engine.reorder

    @reorder_batches.setter
    def reorder_batches(self, value: str | None) -> None:
        self._engine = JsonRpcEngine(self.dialect, self._engine.handlers, self.calls, value)

    def chain_state(self) -> ChainState:
        """The node's view of the chain now, from the injected clock."""
        return chain_state(self.chain, self._scenario, self._clock.seconds() - self._started)

    @property
    def in_flight(self) -> int:
        """Requests held open (delayed or hanging), so tests can see the gateway give up on them."""
        return len(self._held)

    def per_tip(self, name: str, state: ChainState, build: Callable[[ChainState], bytes]) -> bytes:
        """Answers that only change with the tip are built once per tip."""
        if self._tip_cache_tip != state.tip:
            self._tip_cache.clear()
            self._tip_cache_tip = state.tip
        body = self._tip_cache.get(name)
        if body is None:
            body = self._tip_cache[name] = build(state)
        return body

    def handle_body(self, body: bytes) -> tuple[int, bytes]:
        """Answer one JSON-RPC HTTP body (single or batch): ``(HTTP status, response bytes)``."""
        return self._engine.handle_body(body, self.chain_state())  # one tip for the whole batch

    # -- HTTP

    def render(self, request: Request) -> bytes | int:
        """Route, apply the scenario's failure mode, and answer (maybe later, for ``slow``)."""
        if request.method == b"POST":
            self.requests += 1
        for name, value in self._headers:
            request.setHeader(name, value)
        failure = self._scenario.failure
        if failure is not None:
            return self._fail(request, failure)
        if request.path == b"/status":
            if request.method != b"GET":
                return self._respond(request, 405, b"Method Not Allowed", text=True)
            return self._status(request)
        if request.path != b"/":
            return self._respond(request, 404, b"Not Found", text=True)
        if request.method != b"POST":
            return self._respond(request, 405, b"Method Not Allowed", text=True)
        body = _request_body(request)
        if isinstance(body, tuple):
            return self._respond(request, *body)
        return self._respond(request, *self.handle_body(body))

    def _status(self, request: Request) -> bytes | int:
        """4.x: ``OK`` in plain text; 5.x: ``{"ok", "components"}`` JSON (per RPC namespace).  500 if not ready."""
        ready = self._scenario.ready
        if self.dialect == "4":
            return self._respond(request, 200, b"OK", text=True) if ready else \
                self._respond(request, 500, b"Internal Server Error", text=True)
        component = {"healthy": ready}
        body = dumps({"ok": ready, "components": {"aztec": component, "node": component}}).encode()
        return self._respond(request, 200 if ready else 500, body)

    def _respond(self, request: Request, status: int, body: bytes, text: bool = False) -> bytes | int:
        """Send a response now, or after the scenario's delay without blocking the reactor."""
        request.setResponseCode(status)
        if text:
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        else:
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"vary", b"Accept-Encoding")
            if len(body) > GZIP_MIN_BYTES and accepts_gzip(request.getHeader(b"accept-encoding")):
                # Level 1: the validator stats are megabytes and compress ~15x even so.
                body = gzip.compress(body, compresslevel=1, mtime=0)
                request.setHeader(b"content-encoding", b"gzip")
        delay = self._scenario.delay_seconds
        if delay <= 0:
            return body
        request.setHeader(b"content-length", str(len(body)).encode())
        self._hold(request, self._clock.callLater(delay, self._finish, request, body))
        return NOT_DONE_YET

    def _finish(self, request: Request, body: bytes) -> None:
        request.write(body)
        request.finish()

    def _hold(self, request: Request, call: IDelayedCall | None) -> None:
        """Keep a request open; forget it (and its pending answer) when it ends or the client leaves."""
        self._held.add(request)

        def done(_: object) -> None:
            self._held.discard(request)
            if call is not None and call.active():
                call.cancel()

        request.notifyFinish().addBoth(done)

    def _fail(self, request: Request, failure: str) -> bytes | int:
        """The broken-upstream modes a gateway must survive."""
        if failure == "500":
            return self._respond(request, 500, b"Internal Server Error", text=True)
        if failure == "garbage":
            request.setHeader(b"content-type", b"application/json")
            return b"<html><body>502 Bad Gateway</body></html>"
        if failure == "reset":
            request.channel.transport.abortConnection()
        else:  # "hang": never answer; forgotten when the client gives up
            self._hold(request, None)
        return NOT_DONE_YET


class _QuietSite(Site):
    """A Site without access logging (~90 µs per request) and without POST form parsing."""

    noisy = False

    def log(self, request: Request) -> None:
        """Access logging is off on purpose: it would dominate the simulator's cost per request."""


def simulated_site(node: SimulatedNode) -> Site:
    """The ``Site`` to listen with: quiet, and not parsing POST bodies as forms."""
    return _QuietSite(node, parsePOSTFormSubmission=False)
