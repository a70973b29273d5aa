"""W3C trace context, and the spans of a request and of its upstream attempts.

The request path and the failover call a :class:`Tracer` the same way whether tracing is on or
off. Off (TRACING=off, the default) it is :data:`NO_TRACER`, whose calls do nothing, and the
opentelemetry packages are never imported; a caller's valid ``traceparent`` still reaches the
nodes as it came (:func:`~sentinel_proxy.proxy.values.forwarded_headers`). On (TRACING=otlp) it
is :class:`OtelTracer`: a SERVER span per request (a child of the caller's traceparent, when
there is one) and a CLIENT span per upstream attempt, each attempt telling the node its own span
as the traceparent's parent-id, exported in batches over OTLP/HTTP as the standard OTEL_*
variables say.

The current request span travels in OpenTelemetry's context (a contextvar): Twisted runs each
coroutine in its own copy of the context, so the attempts of a request, hedges included, see
their own request's span without it being passed along the stages.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Protocol

from twisted.internet import defer, threads

from sentinel_proxy import __version__

if TYPE_CHECKING:
    from sentinel_proxy.proxy.values import Caller, HeaderPairs, Reply

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
_TRACE_HEADERS = (TRACEPARENT, TRACESTATE)

#: Version 00, lowercase hex, neither id all zeros (W3C Trace Context, section 3.2). Another
#: version is ignored: the gateway speaks 00 and would have to rewrite it.
_TRACEPARENT = re.compile(rb"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}\Z")
#: One tracestate list member: a simple or multi-tenant key, ``=``, a value (section 3.3.1).
_MEMBER = re.compile(rb"([a-z0-9][_0-9a-z*/-]{0,255}|[a-z0-9][_0-9a-z*/-]{0,240}@[a-z][_0-9a-z*/-]{0,13})"
                     rb"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]\Z")
_MAX_MEMBERS = 32

#: The distinct methods a request span names (a batch may carry a hundred calls), each cut short.
MAX_SPAN_METHODS = 10
_MAX_METHOD_LENGTH = 64
#: Attempt results that are not the node failing: no error status on their span.
_NOT_FAILURES = frozenset({"ok", "caller_error", "wrong_dialect", "too_large", "cancelled"})
#: The packages TRACING=otlp needs (the otel extra), by module.
OTLP_MODULES = ("opentelemetry.trace", "opentelemetry.sdk.trace",
                "opentelemetry.exporter.otlp.proto.http.trace_exporter")


@dataclass(frozen=True, slots=True)
class TraceContext:
    """A caller's valid ``traceparent``, and its ``tracestate`` when that is valid too, as sent."""

    traceparent: bytes
    tracestate: bytes | None = None

    @property
    def trace_id(self) -> int:
        return int(self.traceparent[3:35], 16)

    @property
    def parent_id(self) -> int:
        return int(self.traceparent[36:52], 16)

    @property
    def flags(self) -> int:
        return int(self.traceparent[53:55], 16)

    def pairs(self) -> HeaderPairs:
        if self.tracestate is None:
            return ((TRACEPARENT, self.traceparent),)
        return ((TRACEPARENT, self.traceparent), (TRACESTATE, self.tracestate))


def valid_tracestate(value: bytes) -> bool:
    """At most 32 list members, each ``key=value`` in the spec's grammar, no key twice; empty
    members (``a=1,,b=2``) and blanks around commas are allowed."""
    keys = set()
    for member in value.split(b","):
        member = member.strip(b" \t")
        if not member:
            continue
        match = _MEMBER.match(member)
        if match is None or match.group(1) in keys:
            return False
        keys.add(match.group(1))
    return 0 < len(keys) <= _MAX_MEMBERS


def trace_context(traceparent: bytes | None, tracestate: bytes | None) -> TraceContext | None:
    """The caller's trace context, or None when its ``traceparent`` is absent or invalid (ignored,
    as the spec says, never refused). A repeated header arrives joined with ", " and so is
    invalid. An invalid ``tracestate`` is dropped on its own."""
    if traceparent is None or _TRACEPARENT.match(traceparent) is None:
        return None
    if tracestate is not None and not valid_tracestate(tracestate):
        tracestate = None
    return TraceContext(traceparent, tracestate)


class RequestSpan(Protocol):
    def end(self, reply: Reply | None) -> None:
        """``reply``: what the caller got, or None when the caller went away first."""


class AttemptSpan(Protocol):
    def headers(self, base: HeaderPairs) -> HeaderPairs:
        """The headers of this attempt: ``base`` with this span as the trace context."""

    def end(self, result: str) -> None:
        """``result``: the attempt's kind (``ok``, ``timeout``, ...), or ``cancelled``."""


class Tracer(Protocol):
    def request(self, route: str, caller: Caller) -> RequestSpan:
        """Starts the request's span and makes it the current one until :meth:`RequestSpan.end`."""

    def attempt(self, node: str, number: int, role: str) -> AttemptSpan:
        """Starts an attempt's span under the current request span. ``role``: first, failover or hedge."""

    def close(self) -> defer.Deferred[None]:
        """Sends what is still buffered and stops (the gateway is stopping)."""


class _NoSpan:
    __slots__ = ()

    def headers(self, base: HeaderPairs) -> HeaderPairs:
        return base

    def end(self, outcome: Any) -> None:
        pass


_NO_SPAN = _NoSpan()


class NoTracer:
    """TRACING=off: nothing recorded, the headers as they are."""

    def request(self, route: str, caller: Caller) -> _NoSpan:
        return _NO_SPAN

    def attempt(self, node: str, number: int, role: str) -> _NoSpan:
        return _NO_SPAN

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)


NO_TRACER = NoTracer()


def span_methods(methods: Iterable[str]) -> list[str]:
    """The distinct methods of a request, in order, at most :data:`MAX_SPAN_METHODS`, each cut short."""
    return [method[:_MAX_METHOD_LENGTH] for method in list(dict.fromkeys(methods))[:MAX_SPAN_METHODS]]


def otlp_missing() -> str | None:
    """The first module TRACING=otlp needs that is not installed, else None. Finding a submodule
    imports its parent packages (``opentelemetry`` and ``opentelemetry.sdk``), so only call this
    when tracing is asked for."""
    for name in OTLP_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except ModuleNotFoundError:
            return name
    return None


class OtelTracer:
    """Spans through the OpenTelemetry SDK, to ``processor`` (a BatchSpanProcessor with the
    OTLP/HTTP exporter when the gateway runs; an in-memory exporter in the tests). Its own
    TracerProvider, not the global one: several gateways may run in one process (the tests).
    ``reactor`` runs the blocking last export in its thread pool when the gateway stops."""

    def __init__(self, processor: Any, reactor: Any):
        from opentelemetry import context, trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read by Resource.create; a name
        # given there wins over the gateway's own.
        resource = Resource.create({"service.version": __version__})
        if resource.attributes.get("service.name", "").startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "sentinel-proxy"}))
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(processor)
        self._tracer = self._provider.get_tracer("sentinel_proxy", __version__)
        self._reactor = reactor
        self._trace = trace
        self._attach = context.attach
        self._detach = context.detach
        self._server = trace.SpanKind.SERVER
        self._client = trace.SpanKind.CLIENT
        self._error = trace.Status(trace.StatusCode.ERROR)

    def request(self, route: str, caller: Caller) -> _OtelRequest:
        trace = self._trace
        parent = None
        if caller.trace is not None:
            remote = caller.trace
            state = None if remote.tracestate is None else trace.TraceState.from_header(
                [remote.tracestate.decode("ascii")])
            parent = trace.set_span_in_context(trace.NonRecordingSpan(trace.SpanContext(
                remote.trace_id, remote.parent_id, is_remote=True, trace_flags=trace.TraceFlags(remote.flags),
                trace_state=state)))
        span = self._tracer.start_span(f"POST {route}", parent, kind=self._server, attributes={
            "http.request.method": "POST", "http.route": route, "sentinel.request_id": caller.request_id})
        return _OtelRequest(span, self._attach(trace.set_span_in_context(span)), self._detach, self._error)

    def attempt(self, node: str, number: int, role: str) -> _OtelAttempt:
        span = self._tracer.start_span("upstream attempt", kind=self._client, attributes={
            "sentinel.node": node, "sentinel.attempt": number, "sentinel.role": role})
        return _OtelAttempt(span, self._error)

    def close(self) -> defer.Deferred[None]:
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._provider.shutdown)


class _OtelRequest:
    __slots__ = ("_span", "_token", "_detach", "_error")

    def __init__(self, span: Any, token: Any, detach: Any, error: Any):
        self._span = span
        self._token = token
        self._detach = detach
        self._error = error

    def end(self, reply: Reply | None) -> None:
        span = self._span
        if reply is None:
            span.set_attribute("sentinel.outcome", "cancelled")
        else:
            attributes: dict[str, Any] = {"http.response.status_code": reply.status, "sentinel.outcome": reply.outcome,
                                          "sentinel.methods": span_methods(reply.methods + reply.refused)}
            if reply.batch is not None:
                attributes["sentinel.batch_size"] = reply.batch
            span.set_attributes(attributes)
            if reply.status >= 500:
                span.set_status(self._error)
        span.end()
        self._detach(self._token)


class _OtelAttempt:
    __slots__ = ("_span", "_error")

    def __init__(self, span: Any, error: Any):
        self._span = span
        self._error = error

    def headers(self, base: HeaderPairs) -> HeaderPairs:
        """The node is told this attempt's span as the parent (W3C: the client span of the call)."""
        context = self._span.get_span_context()
        pairs = [pair for pair in base if pair[0] not in _TRACE_HEADERS]
        pairs.append((TRACEPARENT, b"00-%032x-%016x-%02x" % (context.trace_id, context.span_id,
                                                             context.trace_flags)))
        state = context.trace_state.to_header()
        if state:
            pairs.append((TRACESTATE, state.encode("ascii")))
        return tuple(pairs)

    def end(self, result: str) -> None:
        span = self._span
        span.set_attribute("sentinel.result", result)
        if result not in _NOT_FAILURES:
            span.set_status(self._error)
        span.end()


def make_tracer(export: str, reactor: Any) -> Tracer:
    """The tracer TRACING names: off, or otlp (OTLP/HTTP, configured by the OTEL_* variables).
    Without the otel extra installed, otlp ends the start with one line."""
    if export == "off":
        return NO_TRACER
    missing = otlp_missing()
    if missing is not None:
        raise SystemExit(f"sentinel-proxy: invalid TRACING: otlp needs the otel extra ({missing} is not "
                         "installed): pip install 'sentinel-proxy[otel]'")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return OtelTracer(BatchSpanProcessor(OTLPSpanExporter()), reactor)
