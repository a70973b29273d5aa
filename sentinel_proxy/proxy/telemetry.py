"""What a finished request leaves behind: metrics, the gateway's response headers, the access log
line and the /health totals."""
from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from sentinel_proxy.ops.logs import AccessLog
from sentinel_proxy.ops.metrics import NO_BACKEND, Metrics
from sentinel_proxy.proxy.values import HeaderPairs, Inbound, Reply
from sentinel_proxy.state.status import RequestTotals


#: (name, node type) -> the node's two headers; built once per node and type, not per request.
_NODE_HEADERS: dict[tuple[str, str], HeaderPairs] = {}
_ATTEMPTS = tuple(((b"x-sentinel-attempts", str(n).encode("ascii")),) for n in range(16))


def _node_headers(name: str, node_type: str) -> HeaderPairs:
    headers = _NODE_HEADERS.get((name, node_type))
    if headers is None:
        headers = ((b"x-sentinel-backend", name.encode("ascii", "replace")),
                   (b"x-sentinel-node-type", (node_type or "unknown").encode("ascii")))
        if len(_NODE_HEADERS) < 4096:
            _NODE_HEADERS[(name, node_type)] = headers
    return headers


def response_headers(reply: Reply, request_id: str, worker: str | None) -> HeaderPairs:
    """What the gateway adds to every reply: the request id to quote in a bug report, which worker
    (with --workers) and which node answered, and after how many attempts."""
    headers: HeaderPairs = ((b"x-request-id", request_id.encode("ascii")),)
    if worker is not None:
        headers += ((b"x-sentinel-worker", worker.encode("ascii")),)
    backend = reply.backend
    if backend is not None:
        attempts = reply.attempts
        headers += _node_headers(backend.name, backend.node_type) + (
            _ATTEMPTS[attempts] if 0 <= attempts < 16 else ((b"x-sentinel-attempts", str(attempts).encode("ascii")),))
    return headers


class Telemetry:
    """Every request ends here, refused or answered, so the counts and the log miss none."""

    def __init__(self, metrics: Metrics, clock: IReactorTime, access_log: AccessLog | None = None,
                 worker: str | None = None):
        self._metrics = metrics
        self._clock = clock
        #: None: access logging is off (ACCESS_LOG=false); replaced on reload.
        self.access_log = access_log
        self._worker = worker
        self.totals = RequestTotals()

    def finish(self, inbound: Inbound, reply: Reply, started: float) -> Reply:
        """Count and log the request, and return the reply with the gateway's headers added."""
        elapsed = self._clock.seconds() - started
        backend = reply.backend
        self.totals.record(reply.status, len(reply.refused))
        self._metrics.observe_request(inbound.route, reply.status, reply.outcome,
                                      backend.label if backend else NO_BACKEND, elapsed, reply.methods, reply.batch)
        caller = inbound.caller
        if self.access_log is not None:
            self.access_log.write(self._clock.seconds(), caller.request_id, caller.address, inbound.route,
                                  reply.methods, backend.name if backend else "-", reply.status, reply.outcome,
                                  elapsed * 1000.0, reply.attempts, reply.refused, reply.cache, reply.upstream_ms,
                                  len(inbound.body), len(reply.body))
        return reply.with_headers(response_headers(reply, caller.request_id, self._worker))
