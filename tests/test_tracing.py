"""W3C trace context and the OpenTelemetry spans (ops/tracing.py): parsing, what the nodes get,
the spans of a request and of its attempts (the SDK's in-memory exporter, on a ``task.Clock``),
and over loopback: a caller's traceparent reaching a node, and spans exported over OTLP/HTTP."""
import json
import os
import subprocess
import sys

import pytest
import pytest_twisted

from twisted.internet import defer, reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from sentinel_proxy.ops.tracing import MAX_SPAN_METHODS, OtelTracer, TraceContext, trace_context
from sentinel_proxy.proxy.path import RequestPath
from sentinel_proxy.proxy.values import Caller, Limits, forwarded_headers
from sentinel_proxy.upstream.response import UpstreamError
from sentinel_proxy.web.auth import caller_from

from tests.stages_support import JSON, answer, hang, result, rig, rpc, settled
from tests.support import RunningNode, TEST_CHAIN, post_json, wait_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01".encode()
TRACESTATE = b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
JSON_HEADER = {b"content-type": [b"application/json"]}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- parsing


def test_a_valid_traceparent_is_read_with_its_ids_and_flags():
    context = trace_context(TRACEPARENT, None)
    assert context == TraceContext(TRACEPARENT)
    assert (context.trace_id, context.parent_id, context.flags) == (int(TRACE_ID, 16), int(PARENT_ID, 16), 1)
    assert trace_context(f"00-{TRACE_ID}-{PARENT_ID}-00".encode(), None).flags == 0


@pytest.mark.parametrize("value", [
    TRACEPARENT.upper(),                                              # uppercase hex
    f"00-{TRACE_ID.upper()}-{PARENT_ID}-01".encode(),                 # uppercase trace id only
    f"01-{TRACE_ID}-{PARENT_ID}-01".encode(),                         # another version
    f"ff-{TRACE_ID}-{PARENT_ID}-01".encode(),                         # the forbidden version
    f"00-{'0' * 32}-{PARENT_ID}-01".encode(),                         # all-zero trace id
    f"00-{TRACE_ID}-{'0' * 16}-01".encode(),                          # all-zero parent id
    f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01".encode(),                    # a short trace id
    f"00-{TRACE_ID}-{PARENT_ID}-1".encode(),                          # short flags
    f"00-{TRACE_ID}-{PARENT_ID}-01-extra".encode(),                   # a field too many for 00
    f"00-{TRACE_ID}-{PARENT_ID[:-1]}g-01".encode(),                   # not hex
    f"00_{TRACE_ID}_{PARENT_ID}_01".encode(),                         # wrong separators
    TRACEPARENT + b", " + TRACEPARENT,                                # sent twice (joined)
    b"",
])
def test_an_invalid_traceparent_is_ignored(value):
    assert trace_context(value, TRACESTATE) is None


def test_a_valid_tracestate_is_kept_as_sent():
    assert trace_context(TRACEPARENT, TRACESTATE).tracestate == TRACESTATE
    spaced = b"rojo=1 ,, congo=2,tenant@vendor=x"
    assert trace_context(TRACEPARENT, spaced).tracestate == spaced


@pytest.mark.parametrize("value", [
    b"Rojo=1",                                                        # uppercase key
    b"rojo=1,rojo=2",                                                 # a key twice
    b"rojo",                                                          # no value
    b"rojo=a=b",                                                      # '=' in a value
    b",".join(b"k%d=v" % i for i in range(33)),                       # 33 members
    b"",
])
def test_an_invalid_tracestate_is_dropped_and_the_traceparent_kept(value):
    assert trace_context(TRACEPARENT, value) == TraceContext(TRACEPARENT)


def test_the_caller_carries_its_trace_context():
    caller = caller_from("10.0.0.1", {b"traceparent": TRACEPARENT, b"tracestate": TRACESTATE})
    assert caller.trace == TraceContext(TRACEPARENT, TRACESTATE)
    assert caller_from("10.0.0.1", {b"traceparent": TRACEPARENT.upper()}).trace is None
    assert caller_from("10.0.0.1", {b"tracestate": TRACESTATE}).trace is None


def test_a_node_gets_a_valid_trace_context_and_the_request_id():
    headers = dict(forwarded_headers({b"traceparent": TRACEPARENT, b"tracestate": TRACESTATE, **JSON}, b"r1", True))
    assert (headers[b"traceparent"], headers[b"tracestate"], headers[b"x-request-id"]) == (TRACEPARENT, TRACESTATE,
                                                                                           b"r1")
    for caller_headers in ({b"traceparent": b"00-bad"}, {b"tracestate": TRACESTATE}, {}):
        names = [name for name, _ in forwarded_headers({**caller_headers, **JSON}, b"r1", True)]
        assert b"traceparent" not in names and b"tracestate" not in names


# -- tracing off: the caller's context goes on as it came, on every attempt


def test_with_tracing_off_every_attempt_passes_the_callers_traceparent_on():
    gateway = rig()
    gateway.client.script("n0:1", UpstreamError("connect", "refused"))
    gateway.client.script("n1:1", answer(result(7)))
    reply = settled(gateway.handle(rpc("node_getBlockNumber"), headers={**JSON, b"traceparent": TRACEPARENT}))
    assert reply.status == 200
    assert [sent.header(b"traceparent") for sent in gateway.client.sent] == [[TRACEPARENT], [TRACEPARENT]]


def test_with_tracing_off_and_no_traceparent_none_is_sent():
    gateway = rig(default=answer(result(7)))
    settled(gateway.handle(rpc("node_getBlockNumber")))
    assert gateway.client.sent[0].header(b"traceparent") == []


# -- tracing on: spans in memory


@pytest.fixture
def otel():
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    return OtelTracer(SimpleSpanProcessor(exporter), reactor), exporter


def traced(tracer, limits=Limits(), **options):
    gateway = rig(limits=limits, **options)
    gateway.path = RequestPath(gateway.pool, gateway.client, gateway.metrics, gateway.clock, limits, tracer=tracer)
    return gateway


def kinds(exporter):
    from opentelemetry.trace import SpanKind

    spans = exporter.get_finished_spans()
    server = [span for span in spans if span.kind == SpanKind.SERVER]
    client = sorted((span for span in spans if span.kind == SpanKind.CLIENT),
                    key=lambda span: span.attributes["sentinel.attempt"])
    assert len(server) + len(client) == len(spans)
    return server, client


def sent_traceparent(span) -> bytes:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}".encode()


def test_one_server_span_per_request_and_one_client_span_per_attempt(otel):
    tracer, exporter = otel
    gateway = traced(tracer, default=answer(result(7)))
    settled(gateway.handle(rpc("node_getBlockNumber"), caller=Caller("req-1")))
    (server,), (client,) = kinds(exporter)
    assert server.parent is None, "no caller context: a new trace"
    assert server.name == "POST /"
    assert dict(server.attributes) == {
        "http.request.method": "POST", "http.route": "/", "sentinel.request_id": "req-1",
        "http.response.status_code": 200, "sentinel.outcome": "ok", "sentinel.methods": ("node_getBlockNumber",)}
    assert client.parent.span_id == server.context.span_id
    assert client.context.trace_id == server.context.trace_id
    assert dict(client.attributes) == {"sentinel.node": "n0:1", "sentinel.attempt": 1, "sentinel.role": "first",
                                       "sentinel.result": "ok"}
    assert gateway.client.sent[0].header(b"traceparent") == [sent_traceparent(client)]


def test_the_callers_trace_is_kept_and_each_node_is_told_its_own_attempt(otel):
    tracer, exporter = otel
    gateway = traced(tracer)
    gateway.client.script("n0:1", UpstreamError("connect", "refused"))
    gateway.client.script("n1:1", answer(result(7)))
    reply = settled(gateway.handle(rpc("node_getBlockNumber"),
                                   caller=Caller("req-1", trace=TraceContext(TRACEPARENT, TRACESTATE)),
                                   headers={**JSON, b"traceparent": TRACEPARENT, b"tracestate": TRACESTATE}))
    assert reply.status == 200
    (server,), (first, second) = kinds(exporter)
    assert server.context.trace_id == int(TRACE_ID, 16)
    assert (server.parent.span_id, server.parent.is_remote) == (int(PARENT_ID, 16), True)
    assert [(span.attributes["sentinel.node"], span.attributes["sentinel.role"], span.attributes["sentinel.result"],
             span.parent.span_id, span.status.is_ok) for span in (first, second)] == [
        ("n0:1", "first", "connect", server.context.span_id, False),
        ("n1:1", "failover", "ok", server.context.span_id, True)]
    for sent, span in zip(gateway.client.sent, (first, second)):
        assert sent.header(b"traceparent") == [sent_traceparent(span)], "the caller's parent-id is replaced"
        assert sent.header(b"tracestate") == [TRACESTATE]
        assert sent.header(b"x-request-id") == [b"req-1"]
    assert first.context.span_id != second.context.span_id


def test_an_unsampled_caller_is_propagated_but_not_exported(otel):
    tracer, exporter = otel
    gateway = traced(tracer, default=answer(result(7)))
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00".encode()
    settled(gateway.handle(rpc("node_getBlockNumber"), caller=Caller("req-1", trace=TraceContext(unsampled)),
                           headers={**JSON, b"traceparent": unsampled}))
    assert exporter.get_finished_spans() == ()
    (sent,) = gateway.client.sent[0].header(b"traceparent")
    assert sent.startswith(f"00-{TRACE_ID}-".encode()) and sent.endswith(b"-00")
    assert sent != unsampled, "the node is told the gateway's attempt as its parent"


def test_a_hedge_is_its_own_attempt_and_the_loser_ends_cancelled(otel):
    tracer, exporter = otel
    gateway = traced(tracer, Limits(hedge=True, hedge_delay=0.05))
    gateway.client.script("n0:1", hang())
    gateway.client.script("n1:1", answer(result(7)))
    pending = gateway.handle(rpc("node_getBlockNumber"))
    gateway.clock.advance(0.05)
    assert settled(pending).status == 200
    (server,), (first, hedge) = kinds(exporter)
    assert [(span.attributes["sentinel.role"], span.attributes["sentinel.result"]) for span in (first, hedge)] == [
        ("first", "cancelled"), ("hedge", "ok")]
    assert {first.parent.span_id, hedge.parent.span_id} == {server.context.span_id}
    assert first.status.is_ok, "a lost race is not an error"


def test_a_batch_span_names_a_bounded_set_of_methods(otel):
    tracer, exporter = otel
    gateway = traced(tracer)
    calls = [rpc(f"x_method{i % 12}", id_=i) for i in range(30)]
    reply = settled(gateway.handle(calls))
    (server,), client = kinds(exporter)
    assert client == [], "every call refused by the method policy: no node asked"
    assert server.attributes["sentinel.batch_size"] == 30
    assert server.attributes["sentinel.outcome"] == reply.outcome
    assert server.attributes["sentinel.methods"] == tuple(f"x_method{i}" for i in range(MAX_SPAN_METHODS))


def test_a_failed_request_is_an_error_span_and_a_cancelled_one_still_ends(otel):
    tracer, exporter = otel
    gateway = traced(tracer, default=UpstreamError("connect", "refused"))
    assert settled(gateway.handle(rpc("node_getBlockNumber"))).status == 502
    (server,), attempts = kinds(exporter)
    assert not server.status.is_ok and len(attempts) == 3
    exporter.clear()
    gateway.client.script("n0:1", hang())
    pending = gateway.handle(rpc("node_getBlockNumber"))
    pending.addErrback(lambda failure: failure.trap(defer.CancelledError))
    pending.cancel()
    (server,), (attempt,) = kinds(exporter)
    assert (server.attributes["sentinel.outcome"], attempt.attributes["sentinel.result"]) == ("cancelled",
                                                                                             "cancelled")


# -- what is imported, and a missing extra


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


@pytest.mark.slow
def test_with_tracing_off_no_opentelemetry_module_is_imported():
    done = run_python(
        "import sys\n"
        "from twisted.internet import defer, reactor\n"
        "from sentinel_proxy.config import load_settings\n"
        "from sentinel_proxy.service import build_service\n"
        "import sentinel_proxy.tap\n"
        "settings = load_settings(cli={'backends': 'http://127.0.0.1:1'}, environ={}, dotenv_path=None)\n"
        "gateway = build_service(settings, reactor)\n"
        "handled = defer.Deferred.fromCoroutine(gateway.forwarder.handle('/', b'{\"jsonrpc\":\"2.0\",\"id\":1,"
        "\"method\":\"node_getBlockNumber\"}', {b'content-type': b'application/json', b'traceparent': "
        f"{TRACEPARENT!r}}}))\n"
        "replies = []\n"
        "handled.addCallback(replies.append)\n"
        "print(replies[0].status, sorted(name for name in sys.modules if name.startswith('opentelemetry')))\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(maxsplit=1) == ["503", "[]\n"]


@pytest.mark.slow
def test_otlp_without_the_extra_is_one_line_at_start():
    done = run_python("import sys\n"
                      "sys.modules['opentelemetry'] = None  # as if the otel extra were not installed\n"
                      "from sentinel_proxy.ops.tracing import make_tracer\n"
                      "make_tracer('otlp', None)\n")
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["sentinel-proxy: invalid TRACING: otlp needs the otel extra "
                                        "(opentelemetry.trace is not installed): pip install 'sentinel-proxy[otel]'"]


# -- over loopback


class Recording(Resource):
    """A node that records the headers of each call it gets, then answers as ``inner`` does;
    ``fail_once``: the first call carrying that request id (on any node sharing ``seen``) gets a 500."""

    isLeaf = True

    def __init__(self, inner: Resource, seen: list, fail_once: bytes | None = None):
        super().__init__()
        self._inner = inner
        self.seen = seen
        self._fail_once = fail_once

    def render(self, request):
        request_id = request.getHeader(b"x-request-id")
        if request_id is not None:
            self.seen.append((self, {name.lower(): values[0] for name, values in
                                     request.requestHeaders.getAllRawHeaders()}))
            calls = [headers for _, headers in self.seen if headers[b"x-request-id"] == request_id]
            if request_id == self._fail_once and len(calls) == 1:
                request.setResponseCode(500)
                return b"Internal Server Error"
        return self._inner.render(request)


def recording_node(cluster, seen: list, fail_once: bytes | None = None) -> RunningNode:
    from sentinel_simnode.node import SCENARIOS, SimulatedNode, simulated_site

    sim = SimulatedNode(SCENARIOS["pruned"], TEST_CHAIN, clock=reactor, dialect="4")
    site = simulated_site(sim)
    site.resource = Recording(site.resource, seen, fail_once)
    running = RunningNode(sim, reactor.listenTCP(0, site, interface="127.0.0.1"))
    cluster.nodes.append(running)
    return running


@pytest_twisted.ensureDeferred
async def test_a_callers_traceparent_reaches_the_node(cluster):
    seen: list = []
    _, url = await cluster.gateway([recording_node(cluster, seen)])
    reply = await post_json(url, rpc("node_getBlockNumber"), headers={
        **JSON_HEADER, b"traceparent": [TRACEPARENT], b"tracestate": [TRACESTATE], b"x-request-id": [b"trace-1"]})
    assert reply.code == 200
    (_, headers), = [s for s in seen if s[1][b"x-request-id"] == b"trace-1"]
    assert (headers[b"traceparent"], headers[b"tracestate"]) == (TRACEPARENT, TRACESTATE)
    reply = await post_json(url, rpc("node_getBlockNumber"), headers={
        **JSON_HEADER, b"traceparent": [TRACEPARENT.upper()], b"x-request-id": [b"trace-2"]})
    (_, headers), = [s for s in seen if s[1][b"x-request-id"] == b"trace-2"]
    assert b"traceparent" not in headers, "an invalid traceparent is not passed on"


class Collector(Resource):
    """An OTLP/HTTP receiver: keeps each export's spans."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.spans: list = []

    def render_POST(self, request):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        export = ExportTraceServiceRequest.FromString(request.content.read())
        for resource in export.resource_spans:
            service = {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"]
            for scope in resource.scope_spans:
                self.spans.extend((service, span) for span in scope.spans)
        request.setHeader(b"content-type", b"application/x-protobuf")
        return b""


@pytest_twisted.ensureDeferred
async def test_spans_are_exported_over_otlp_http(cluster, monkeypatch):
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

    collector = Collector()
    port = reactor.listenTCP(0, Site(collector), interface="127.0.0.1")
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port.getHost().port}")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # the exporter uses requests, which honours HTTP(S)_PROXY
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        seen: list = []
        nodes = [recording_node(cluster, seen, fail_once=b"trace-otlp") for _ in range(2)]
        _, url = await cluster.gateway(nodes, tracing="otlp")
        reply = await post_json(url, rpc("node_getBlockNumber"), headers={
            **JSON_HEADER, b"traceparent": [TRACEPARENT], b"x-request-id": [b"trace-otlp"]})
        assert reply.code == 200
        await wait_for(lambda: len(collector.spans) >= 3, what="the request's three spans exported")
        spans = [span for _, span in collector.spans if span.trace_id.hex() == TRACE_ID]
        (server,) = [span for span in spans if span.kind == Span.SPAN_KIND_SERVER]
        attempts = [span for span in spans if span.kind == Span.SPAN_KIND_CLIENT]
        assert {service for service, _ in collector.spans} == {"sentinel-proxy"}
        assert server.parent_span_id.hex() == PARENT_ID
        assert [span.parent_span_id for span in attempts] == [server.span_id] * 2
        calls = [(resource, headers) for resource, headers in seen if headers[b"x-request-id"] == b"trace-otlp"]
        assert len(calls) == 2 and calls[0][0] is not calls[1][0], "failed over to the other node"
        told = sorted(headers[b"traceparent"] for _, headers in calls)
        assert told == sorted(f"00-{TRACE_ID}-{span.span_id.hex()}-01".encode() for span in attempts)
        results = sorted(json.dumps({a.key: a.value.string_value or a.value.int_value for a in span.attributes
                                     if a.key in ("sentinel.role", "sentinel.result")}, sort_keys=True)
                         for span in attempts)
        assert results == [json.dumps({"sentinel.result": "bad_answer", "sentinel.role": "first"}, sort_keys=True),
                           json.dumps({"sentinel.result": "ok", "sentinel.role": "failover"}, sort_keys=True)]
    finally:
        await cluster.stop()
        cluster.gateways.clear()
        cluster.nodes.clear()
        await port.stopListening()


@pytest.mark.slow
def test_check_config_refuses_otlp_without_the_extra():
    done = run_python("import sys\n"
                      "sys.modules['opentelemetry'] = None  # as if the otel extra were not installed\n"
                      "from sentinel_proxy.config import ConfigError, load_settings\n"
                      "try:\n"
                      "    load_settings(cli={'backends': 'http://a:1', 'tracing': 'otlp'}, environ={}, dotenv_path=None)\n"
                      "except ConfigError as exc:\n"
                      "    print(exc)\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["invalid TRACING: otlp needs the otel extra (opentelemetry.trace is not "
                                        "installed): pip install 'sentinel-proxy[otel]'"]
