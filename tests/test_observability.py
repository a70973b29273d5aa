"""Metrics from a scrape after real traffic, bounded labels, request ids, gateway headers, JSON logs."""
import io
import json
import random
import re
import string

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import Logger

from sentinel_proxy.ops import logs
from sentinel_proxy.ops.metrics import KNOWN_METHODS
from sentinel_simnode.node import SCENARIOS, SimulatedNode, simulated_site
from tests.support import TEST_CHAIN, RunningNode, http, post_json, rpc
from tests.processes import Daemon, fetch

ensure = pytest_twisted.ensureDeferred


def samples(text: str, name: str) -> list[dict[str, str]]:
    """The label sets of every sample of metric ``name`` in a Prometheus text scrape."""
    found = []
    for line in text.splitlines():
        match = re.match(rf"{name}\{{(.*)\}} ", line)
        if match:
            found.append(dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))))
    return found


def value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, number = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                return float(number)
    raise AssertionError(f"no sample {name} {labels}")


@ensure
async def test_metrics_after_real_traffic(cluster):
    node = cluster.node("pruned")
    service, gateway = await cluster.gateway([node])
    await post_json(gateway, [rpc("node_getBlockNumber", id_=0), rpc("node_getL2Tips", id_=1)])
    await post_json(gateway, rpc("node_getBlockNumber"))
    await post_json(gateway + "/archiver", rpc("node_getBlockNumber"))  # no archiver: 503
    await http("POST", gateway, b"{nope")
    text = (await http("GET", gateway + "/metrics")).body.decode()

    # The prototype's five, unchanged.
    assert value(text, "sentinel_proxy_requests_total", method="proxy", status="200", backend=node.url) == 2
    assert value(text, "sentinel_proxy_requests_total", method="proxy", status="503", backend="none") == 1
    assert value(text, "sentinel_proxy_request_duration_seconds_count", method="proxy", backend=node.url) == 2
    for gauge in ("backend_health", "backend_integrity_score", "backend_block_number"):
        assert samples(text, f"sentinel_proxy_{gauge}") == [{"url": node.url}]

    # Ours.
    assert value(text, "sentinel_proxy_rpc_requests_total", route="/", outcome="ok") == 2
    assert value(text, "sentinel_proxy_rpc_requests_total", route="/", outcome="rejected") == 1
    assert value(text, "sentinel_proxy_rpc_requests_total", route="/archiver", outcome="rejected") == 1
    assert value(text, "sentinel_proxy_rpc_requests_total", route="/pruned", outcome="timeout") == 0
    assert value(text, "sentinel_proxy_rpc_calls_total", method="node_getBlockNumber", route="/") == 2
    assert value(text, "sentinel_proxy_rpc_calls_total", method="node_getL2Tips", route="/") == 1
    assert value(text, "sentinel_proxy_rpc_call_duration_seconds_count", method="node_getBlockNumber") >= 2
    assert value(text, "sentinel_proxy_rpc_request_duration_seconds_count", route="/", outcome="ok") == 2
    assert value(text, "sentinel_proxy_batch_size_count") == 1
    assert value(text, "sentinel_proxy_batch_size_bucket", le="2.0") == 1
    assert value(text, "sentinel_proxy_in_flight_requests") == 0
    assert value(text, "sentinel_proxy_upstream_attempts_total", backend=node.url, result="ok") == 2
    assert value(text, "sentinel_proxy_check_duration_seconds_count", check="health", backend=node.url) >= 1
    assert value(text, "sentinel_proxy_check_duration_seconds_count", check="integrity", backend=node.url) >= 1
    assert value(text, "sentinel_proxy_backend_lag_blocks", backend=node.url) == 0
    assert value(text, "sentinel_proxy_backend_oldest_block", backend=node.url) > 1
    assert value(text, "sentinel_proxy_backend_integrity_status", backend=node.url, status="perfect") == 1
    assert value(text, "sentinel_proxy_backend_integrity_status", backend=node.url, status="bad") == 0
    assert value(text, "sentinel_proxy_backend_node_type", backend=node.url, type="pruned") == 1
    assert value(text, "sentinel_proxy_backend_routing", backend=node.url, state="preferred") == 1
    assert value(text, "sentinel_proxy_backend_quarantined", backend=node.url, reason="lag") == 0


@ensure
async def test_failures_are_counted_by_outcome(cluster):
    node = cluster.node("pruned")
    _, gateway = await cluster.gateway([node], health_check_interval_ms="600000", request_timeout_ms="500")
    node.node.scenario = SCENARIOS["failing-500"]
    await post_json(gateway, rpc("node_getBlockNumber"))
    node.node.scenario = SCENARIOS["hang"]
    await post_json(gateway, rpc("node_getBlockNumber"))
    node.node.scenario = SCENARIOS["pruned"]
    await post_json(gateway, rpc("node_getBlock", [10 ** 6, 1, 2]))  # the node refuses the params: rpc_error
    text = (await http("GET", gateway + "/metrics")).body.decode()
    assert value(text, "sentinel_proxy_rpc_requests_total", route="/", outcome="upstream_error") == 1
    assert value(text, "sentinel_proxy_rpc_requests_total", route="/", outcome="timeout") == 1
    assert value(text, "sentinel_proxy_upstream_attempts_total", backend=node.url, result="timeout") == 1
    assert value(text, "sentinel_proxy_upstream_attempts_total", backend=node.url, result="bad_answer") == 1


@ensure
async def test_method_labels_stay_bounded_with_a_thousand_random_methods(cluster):
    node = cluster.node("pruned")
    _, gateway = await cluster.gateway([node])
    rng = random.Random(1)
    names = ["node_" + "".join(rng.choices(string.ascii_letters, k=12)) for _ in range(1000)]
    for start in range(0, 1000, 100):
        answer = await post_json(gateway, [rpc(m, id_=i) for i, m in enumerate(names[start:start + 100])])
        assert answer.code == 200 and len(answer.json()) == 100
    text = (await http("GET", gateway + "/metrics")).body.decode()
    methods = {s["method"] for s in samples(text, "sentinel_proxy_rpc_calls_total")}
    assert methods <= KNOWN_METHODS | {"other"}
    assert value(text, "sentinel_proxy_rpc_calls_total", method="other", route="/") == 1000
    assert len(samples(text, "sentinel_proxy_rpc_call_duration_seconds_count")) <= len(KNOWN_METHODS) + 1
    assert not any(name in text for name in names[:50])


class RecordingNode(SimulatedNode):
    """A simulated node that remembers the X-Request-ID of every POST it gets."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.request_ids = []

    def render(self, request):
        if request.method == b"POST":
            self.request_ids.append(request.getHeader(b"x-request-id"))
        return super().render(request)


@ensure
async def test_request_ids_and_gateway_headers(cluster):
    sim = RecordingNode(SCENARIOS["pruned"], TEST_CHAIN, clock=reactor)
    node = RunningNode(sim, reactor.listenTCP(0, simulated_site(sim), interface="127.0.0.1"))
    cluster.nodes.append(node)
    service, gateway = await cluster.gateway([f"pruned-1={node.url}"])

    answer = await post_json(gateway, [rpc("node_getBlockNumber")],
                             headers={b"content-type": [b"application/json"], b"x-request-id": [b"trace-42:a/b"]})
    assert answer.header("x-request-id") == "trace-42:a/b"
    assert sim.request_ids[-1] == b"trace-42:a/b", "the request id goes to the node too"
    assert answer.header("x-sentinel-backend") == "pruned-1"
    assert answer.header("x-sentinel-node-type") == "pruned"
    assert answer.header("x-sentinel-attempts") == "1"

    for unsafe in (b"x" * 129, b"bad id with spaces", b"\xffbinary"):
        answer = await post_json(gateway, [rpc("node_getBlockNumber")],
                                 headers={b"content-type": [b"application/json"], b"x-request-id": [unsafe]})
        generated = answer.header("x-request-id")
        assert re.fullmatch(r"[0-9a-f]{16}", generated), generated
        assert sim.request_ids[-1] == generated.encode()

    refused = await http("POST", gateway, b"{nope")
    assert re.fullmatch(r"[0-9a-f]{16}", refused.header("x-request-id"))
    assert refused.header("x-sentinel-backend") is None


def test_json_log_lines_carry_named_fields():
    stream = io.StringIO()
    Logger(observer=logs.json_observer(stream), namespace="test").info(
        "request {request_id} took {duration_ms:.1f}ms", request_id="abc", duration_ms=1.25, extra=object())
    record = json.loads(stream.getvalue())
    assert record["message"] == "request abc took 1.2ms" or record["message"] == "request abc took 1.3ms"
    assert (record["request_id"], record["duration_ms"], record["level"], record["namespace"]) == (
        "abc", 1.25, "info", "test")
    assert "extra" not in record and record["time"].endswith("+00:00")


@pytest.mark.slow
def test_json_logs_from_the_daemon_follow_a_request_by_its_id(tmp_path):
    daemon = Daemon(["sentinel-proxy", "--demo", "--listen", "tcp:0:interface=127.0.0.1", "--log-format", "json"],
                    tmp_path)
    try:
        port = daemon.wait_for_line(r'"port": (\d+)|port=(\d+)\)')
        port = port.group(1) or port.group(2)
        base = f"http://127.0.0.1:{port}"
        daemon.wait_for_line(r"demo-archiver.*is healthy|is healthy.*demo-archiver")
        import urllib.request

        request = urllib.request.Request(base + "/", data=json.dumps([rpc("node_getBlockNumber")]).encode(),
                                         headers={"Content-Type": "application/json", "X-Request-ID": "follow-me-1"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.headers["X-Request-ID"] == "follow-me-1"
            backend = response.headers["X-Sentinel-Backend"]
        line = daemon.wait_for_line(r'"request_id": "follow-me-1"').string
        record = json.loads(line)
        assert record["namespace"] == "sentinel_proxy.access"
        assert record["backend"] == backend and record["status"] == 200 and record["route"] == "/"
        assert record["methods"] == ["node_getBlockNumber"] and record["attempts"] == 1
        assert record["client"] == "127.0.0.1" and record["outcome"] == "ok"
        status, _ = fetch(base + "/health")
        assert status == 200
    finally:
        daemon.stop()
    lines = [line for line in daemon.lines if line.strip()]
    assert lines and all(json.loads(line) for line in lines), "every line of a JSON log must parse"
    warned = [record for record in map(json.loads, lines) if record["level"] not in ("debug", "info")]
    assert not warned, "a normal start warns of nothing (the demo's lagging node is an info)"
    assert any(r.get("transition") == "quarantined" and r["backend"] == "demo-lagging" for r in map(json.loads, lines))


def test_an_uncaught_exception_is_one_json_record_with_its_traceback():
    from twisted.logger import globalLogPublisher

    stream = io.StringIO()
    observer = logs.JsonLinesObserver(stream)
    globalLogPublisher.addObserver(observer)
    try:
        try:
            raise RuntimeError("boom at start")
        except RuntimeError as exc:
            logs.log_uncaught(RuntimeError, exc, exc.__traceback__)
    finally:
        globalLogPublisher.removeObserver(observer)
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "critical" and record["exception"] == "RuntimeError('boom at start')"
    assert record["traceback"].startswith("Traceback") and "RuntimeError: boom at start" in record["traceback"]


@pytest.mark.slow
def test_a_start_up_traceback_under_twistd_is_one_json_line(tmp_path):
    import subprocess
    import sys

    from tests.processes import CLEAN_ENV, ROOT

    script = tmp_path / "boom.py"
    script.write_text(
        "import sys\n"
        "from sentinel_proxy import service\n"
        "def boom(self):\n"
        "    raise RuntimeError('boom at start')\n"
        "service.Gateway.startService = boom\n"
        "from twisted.scripts.twistd import run\n"
        "sys.argv = ['twistd', '-n', '--pidfile=', 'sentinel-proxy', '--listen', 'tcp:0:interface=127.0.0.1',\n"
        "            '--backends', 'http://127.0.0.1:9', '--log-format', 'json']\n"
        "run()\n")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**CLEAN_ENV, "PYTHONPATH": str(ROOT)})
    assert done.returncode != 0
    records = [json.loads(line) for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    failures = [r for r in records if "traceback" in r]
    assert len(failures) == 1 and "RuntimeError: boom at start" in failures[0]["traceback"]
    assert not [r for r in records if r["namespace"] == "stderr"], "no record per line of a traceback"


@ensure
async def test_every_metric_is_documented(cluster):
    from pathlib import Path

    node = cluster.node("pruned")
    _, gateway = await cluster.gateway([node])
    await post_json(gateway, rpc("node_getBlockNumber"))
    text = (await http("GET", gateway + "/metrics")).body.decode()
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    reference = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    missing = sorted(n for n in names if f"`{n}`" not in reference and f"`{n}_total`" not in reference
                     and f"`{n.removesuffix('_total')}`" not in reference)
    assert not missing, f"undocumented metrics: {missing}"
    assert len(names) >= 20
