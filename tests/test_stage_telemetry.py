"""The telemetry stage: response headers, metrics, the access log line and the totals, in memory."""
import io
import json

from twisted.internet import task

from sentinel_proxy.core import jsonrpc
from sentinel_proxy.ops.logs import AccessLog, methods_summary
from sentinel_proxy.ops.metrics import Metrics
from sentinel_proxy.proxy.telemetry import Telemetry, response_headers
from sentinel_proxy.proxy.values import JSON_HEADERS, Caller, Inbound, Limits, Reply, error_reply
from sentinel_proxy.upstream.response import UpstreamError

from tests.stages_support import answer, hang, result, rig, rpc, sample, settled, trusted_pool


def test_methods_summary_stays_short():
    assert methods_summary(()) == "-"
    assert methods_summary(("a", "b", "c")) == "a,b,c"
    assert methods_summary(("a", "b", "c", "d", "e")) == "a,b,c,+2"


def test_response_headers_name_the_request_worker_and_node():
    backend = trusted_pool(1).backends[0]
    served = Reply(200, b"{}", backend=backend, attempts=2)
    assert response_headers(served, "rid-1", "3") == (
        (b"x-request-id", b"rid-1"), (b"x-sentinel-worker", b"3"), (b"x-sentinel-backend", b"n0:1"),
        (b"x-sentinel-node-type", b"pruned"), (b"x-sentinel-attempts", b"2"))
    assert response_headers(Reply(400, b"{}"), "rid-1", None) == ((b"x-request-id", b"rid-1"),)
    backend.node_type = ""
    assert (b"x-sentinel-node-type", b"unknown") in response_headers(served, "rid-1", None)


def test_finish_counts_logs_and_adds_the_headers():
    clock = task.Clock()
    clock.advance(1_700_000_000.0)
    pool = trusted_pool(1)
    metrics = Metrics(pool)
    stream = io.StringIO()
    telemetry = Telemetry(metrics, clock, AccessLog(stream, json_lines=True))
    inbound = Inbound("/archiver", b"[1,2]", {}, False, Caller("rid-9", "10.1.2.3"))
    started = clock.seconds()
    clock.advance(0.25)
    reply = Reply(200, b"[]", JSON_HEADERS, pool.backends[0], "ok", 2, ("node_getBlock", "node_getBlockNumber"), 2,
                  cache="partial", upstream_ms=12.3456)
    final = telemetry.finish(inbound, reply, started)
    assert final.headers[:2] == JSON_HEADERS and (b"x-request-id", b"rid-9") in final.headers
    assert (final.status, final.body, final.backend) == (200, b"[]", pool.backends[0])
    assert reply.headers == JSON_HEADERS, "the stage's own reply is left as it was"
    telemetry.access_log.flush()
    line = json.loads(stream.getvalue())
    assert {k: line[k] for k in ("request_id", "client", "route", "methods", "calls", "backend", "status", "outcome",
                                 "duration_ms", "attempts", "cache", "upstream_ms", "bytes_in", "bytes_out")} == {
        "request_id": "rid-9", "client": "10.1.2.3", "route": "/archiver",
        "methods": ["node_getBlock", "node_getBlockNumber"], "calls": 2, "backend": "n0:1", "status": 200,
        "outcome": "ok", "duration_ms": 250.0, "attempts": 2, "cache": "partial", "upstream_ms": 12.346,
        "bytes_in": 5, "bytes_out": 2}
    assert "attempts=2 cache=partial upstream=12.3ms in=5 out=2" in line["message"]
    assert sample(metrics, "sentinel_proxy_rpc_requests_total", route="/archiver", outcome="ok") == 1.0
    assert sample(metrics, "sentinel_proxy_requests_total", method="proxy", status="200", backend="n0:1") == 1.0
    assert sample(metrics, "sentinel_proxy_rpc_calls_total", method="node_getBlock", route="/archiver") == 1.0
    assert sample(metrics, "sentinel_proxy_batch_size_count") == 1.0
    telemetry.finish(inbound, error_reply(400, jsonrpc.PARSE_ERROR, "bad"), started)
    assert (telemetry.totals.requests, telemetry.totals.errors) == (2, 1)
    assert (telemetry.totals.caller_errors, telemetry.totals.node_errors) == (1, 0)
    assert sample(metrics, "sentinel_proxy_requests_total", method="proxy", status="400", backend="none") == 1.0


def test_no_access_log_when_it_is_off():
    telemetry = Telemetry(Metrics(trusted_pool(1)), task.Clock(), None)
    final = telemetry.finish(Inbound("/", b"", {}, False, Caller("r")), Reply(200, b"{}"), 0.0)
    assert final.status == 200 and telemetry.totals.requests == 1


def test_every_reply_of_the_path_carries_the_headers_and_a_log_line():
    gateway = rig(worker="1")
    gateway.client.script("n0:1", UpstreamError("connect", "refused"))
    gateway.client.script("n1:1", answer(result(7)))
    served = settled(gateway.handle(rpc("node_getBlockNumber"), caller=Caller("rid-1", "10.0.0.9")))
    refused = settled(gateway.handle(None, raw=b"{oops", caller=Caller("rid-2", "10.0.0.9")))
    assert dict(served.headers)[b"x-sentinel-backend"] == b"n1:1"
    assert dict(served.headers)[b"x-sentinel-attempts"] == b"2"
    assert dict(served.headers)[b"x-sentinel-worker"] == b"1"
    assert dict(refused.headers)[b"x-request-id"] == b"rid-2" and b"x-sentinel-backend" not in dict(refused.headers)
    first, second = gateway.lines()
    assert (first["request_id"], first["backend"], first["attempts"], first["outcome"]) == ("rid-1", "n1:1", 2, "ok")
    assert (second["request_id"], second["backend"], second["status"], second["outcome"], second["methods"]) == \
        ("rid-2", "-", 400, "rejected", [])
    assert gateway.path.totals.requests == 2 and gateway.path.totals.errors == 1


def test_reconfigure_turns_the_access_log_off():
    gateway = rig(default=answer(result(7)))
    gateway.path.configure(Limits(), None)
    settled(gateway.handle(rpc("node_getBlockNumber")))
    assert gateway.lines() == []


def test_a_cancelled_request_leaves_no_trace():
    gateway = rig()
    gateway.client.script("n0:1", hang())
    pending = gateway.handle(rpc("node_getBlockNumber"))
    pending.cancel()
    pending.addErrback(lambda f: None)
    assert gateway.path.in_flight == 0 and gateway.path.totals.requests == 0 and gateway.lines() == []
    assert gateway.client.cancelled == ["n0:1"]
