"""``twistd sentinel-proxy`` and ``twistd sentinel-simnode`` started as real subprocesses."""
from __future__ import annotations

import json
import signal

import pytest

from tests.processes import Daemon, fetch, poll, run_twistd

#: Every test here runs twistd as a subprocess.
pytestmark = pytest.mark.slow



@pytest.mark.parametrize("args, fragment", [
    (["sentinel-proxy"], "SENTINEL_BACKENDS is not set"),
    (["sentinel-proxy", "--backends", "http://a:1", "--request-timeout-ms", "abc"],
     "invalid --request-timeout-ms: 'abc' is not a whole number"),
    (["sentinel-proxy", "--backends", "not-a-url"], "invalid --backends: 'not-a-url' is not an http"),
    (["sentinel-proxy", "--backends", "http://a:1", "--health-check-interval-ms", "-1"],
     "invalid --health-check-interval-ms: '-1' is below the minimum of 1"),
    (["sentinel-simnode", "--scenario", "bogus"], "unknown scenario 'bogus'"),
])
def test_bad_configuration_exits_with_one_line(tmp_path, args, fragment):
    result = run_twistd(args, tmp_path)
    assert result.returncode != 0
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_bad_value_in_dotenv_names_the_variable(tmp_path):
    (tmp_path / ".env").write_text("SENTINEL_BACKENDS=http://a:1\nINTEGRITY_CHECK_EPOCHS=ten\n")
    result = run_twistd(["sentinel-proxy"], tmp_path)
    assert result.returncode != 0
    assert "invalid INTEGRITY_CHECK_EPOCHS (.env): 'ten' is not a whole number" in result.stderr


def test_demo_serves_the_fleet_and_stops_cleanly(tmp_path):
    daemon = Daemon(["sentinel-proxy", "--demo", "--listen", "tcp:0:interface=127.0.0.1"], tmp_path)
    try:
        port = daemon.wait_for_line(r"listening on IPv4Address\(type='TCP', host='127\.0\.0\.1', port=(\d+)\)").group(1)
        base = f"http://127.0.0.1:{port}"
        daemon.wait_for_line(r"demo: open http://127\.0\.0\.1:\d+/dashboard")

        def typed_nodes():
            health = json.loads(fetch(base + "/health")[1])
            return {b["nodeType"] for b in health["backends"] if b["healthy"]} >= {"archiver", "pruned"} and health

        health = poll(typed_nodes)
        assert health, "the demo nodes were not all classified in time"
        assert len(health["backends"]) == 4
        assert fetch(base + "/ready") == (200, b"READY")
        status, body = fetch(base + "/", json.dumps(
            [{"jsonrpc": "2.0", "id": 0, "method": "node_getBlockNumber", "params": []}]).encode())
        assert status == 200 and isinstance(json.loads(body)[0]["result"], int)
        status, body = fetch(base + "/archiver", json.dumps(
            {"jsonrpc": "2.0", "id": 1, "method": "node_getBlock", "params": [3]}).encode())
        assert status == 200 and json.loads(body)["result"]["number"] == 3
    finally:
        code = daemon.stop()
    # twistd re-raises the SIGTERM it handled once it has shut down cleanly.
    assert code in (0, -signal.SIGTERM), "".join(daemon.lines)
    assert "Traceback" not in "".join(daemon.lines)


def test_simnode_runs_on_its_own(tmp_path):
    daemon = Daemon(["sentinel-simnode", "--scenario", "legacy", "--listen", "tcp:0:interface=127.0.0.1"], tmp_path)
    try:
        port = daemon.wait_for_line(r"starting on (\d+)").group(1)
        status, body = fetch(f"http://127.0.0.1:{port}/", json.dumps(
            {"jsonrpc": "2.0", "id": 1, "method": "node_getL2Tips", "params": []}).encode())
        assert status == 200 and set(json.loads(body)["result"]) == {"latest", "proven", "finalized"}
    finally:
        daemon.stop()
