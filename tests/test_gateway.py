"""End-to-end: a real listening gateway in front of simulated nodes, over loopback HTTP."""
import gzip
import json

import pytest_twisted

from sentinel_proxy.core import jsonrpc
from sentinel_simnode.node import SCENARIOS
from tests.support import JSON, http, post_json, rpc, wait_for

ensure = pytest_twisted.ensureDeferred

#: A block every simulated node keeps (pruned nodes keep the last 64 below the tip of 1000).
RECENT = 950


async def both(cluster, scenario="pruned"):
    """One node and a gateway in front of it: answers via either must be identical."""
    node = cluster.node(scenario)
    _, gateway = await cluster.gateway([node])
    return node, gateway


@ensure
async def test_single_call_is_byte_identical_to_a_direct_call(cluster):
    node, gateway = await both(cluster)
    for call in (rpc("node_getBlockNumber"), rpc("node_getBlock", [RECENT], id_="five"), rpc("node_getL2Tips")):
        direct, proxied = await post_json(node.url, call), await post_json(gateway, call)
        assert (proxied.code, proxied.body) == (direct.code, direct.body)
        assert proxied.header("content-type") == "application/json"


@ensure
async def test_batch_keeps_ids_order_and_not_found(cluster):
    node, gateway = await both(cluster)
    batch = [rpc("node_getBlock", [RECENT], id_=0), rpc("node_getBlock", [10 ** 9], id_="missing"),
             rpc("node_getBlockNumber", id_=2), rpc("node_isReady", id_="x-3")]
    direct, proxied = await post_json(node.url, batch), await post_json(gateway, batch)
    assert proxied.code == 200 and proxied.body == direct.body
    items = proxied.json()
    assert [item["id"] for item in items] == [0, "missing", 2, "x-3"]
    assert "result" not in items[1] and "error" not in items[1]
    assert items[0]["result"]["number"] == RECENT


@ensure
async def test_aztec_headers_pass_through(cluster):
    node, gateway = await both(cluster)
    direct, proxied = await post_json(node.url, [rpc("node_getBlockNumber")]), await post_json(
        gateway, [rpc("node_getBlockNumber")])
    aztec = sorted(name for name, _ in direct.headers.getAllRawHeaders() if name.lower().startswith(b"x-aztec-"))
    assert len(aztec) >= 5
    for name in aztec:
        assert proxied.headers.getRawHeaders(name) == direct.headers.getRawHeaders(name)


@ensure
async def test_gzip_answers_pass_through_compressed(cluster):
    node, gateway = await both(cluster)
    headers = {**JSON, b"accept-encoding": [b"gzip"]}
    body = json.dumps([rpc("node_getBlocks", [RECENT, 5])]).encode()
    direct = await http("POST", node.url, body, headers)
    proxied = await http("POST", gateway, body, headers)
    assert proxied.header("content-encoding") == "gzip"
    assert gzip.decompress(proxied.body) == gzip.decompress(direct.body)
    assert len(json.loads(gzip.decompress(proxied.body))[0]["result"]) == 5


@ensure
async def test_gzipped_request_body_is_accepted(cluster):
    node, gateway = await both(cluster)
    body = gzip.compress(json.dumps([rpc("node_getBlockNumber")]).encode())
    answer = await http("POST", gateway, body, {**JSON, b"content-encoding": [b"gzip"]})
    assert answer.code == 200 and isinstance(answer.json()[0]["result"], int)


@ensure
async def test_routes_reach_the_right_node_types(cluster):
    archiver, pruned = cluster.node("archiver"), cluster.node("pruned")
    service, gateway = await cluster.gateway([archiver, pruned])
    assert {b.url: b.node_type for b in service.pool.backends} == {archiver.url: "archiver", pruned.url: "pruned"}
    for route, target, other in (("/archiver", archiver, pruned), ("/pruned", pruned, archiver)):
        before_target, before_other = target.node.calls["node_getBlock"], other.node.calls["node_getBlock"]
        for i in range(10):
            answer = await post_json(gateway + route, [rpc("node_getBlock", [RECENT + i])])
            assert answer.code == 200 and answer.json()[0]["result"]["number"] == RECENT + i
        assert target.node.calls["node_getBlock"] - before_target == 10
        assert other.node.calls["node_getBlock"] == before_other


@ensure
async def test_malformed_inputs_get_json_rpc_errors_and_the_daemon_keeps_serving(cluster):
    node, gateway = await both(cluster)
    forwarded_before = node.node.requests
    cases = [
        (b"{broken", JSON, 400, jsonrpc.PARSE_ERROR),
        (b"[]", JSON, 400, jsonrpc.INVALID_REQUEST),
        (json.dumps([rpc("node_getBlockNumber", id_=i) for i in range(101)]).encode(), JSON, 400,
         jsonrpc.INVALID_REQUEST),
        (json.dumps(rpc("node_getBlockNumber")).encode(), {b"content-type": [b"text/plain"]}, 400,
         jsonrpc.INVALID_REQUEST),
        (b"[" + b" " * (1 << 20) + b"]", JSON, 413, jsonrpc.INVALID_REQUEST),
        (json.dumps(rpc("nodeAdmin_getConfig")).encode(), JSON, 400, jsonrpc.METHOD_NOT_FOUND),
        (json.dumps(rpc("eth_blockNumber")).encode(), JSON, 400, jsonrpc.METHOD_NOT_FOUND),
        (json.dumps({"jsonrpc": "2.0", "id": 1}).encode(), JSON, 400, jsonrpc.INVALID_REQUEST),
        (b"\x1f\x8bnot really gzip", {**JSON, b"content-encoding": [b"gzip"]}, 400, jsonrpc.PARSE_ERROR),
        (b"{}", {**JSON, b"content-encoding": [b"br"]}, 400, jsonrpc.INVALID_REQUEST),
        (gzip.compress(b"[" + b" " * (2 << 20) + b"]"), {**JSON, b"content-encoding": [b"gzip"]}, 413,
         jsonrpc.INVALID_REQUEST),
    ]
    for body, headers, status, code in cases:
        answer = await http("POST", gateway, body, headers)
        assert answer.code == status, (body[:40], answer.body)
        document = answer.json()  # a batch refused as a whole: one error per item
        assert (document[0] if isinstance(document, list) else document)["error"]["code"] == code
        assert answer.header("content-type") == "application/json"
    assert node.node.requests == forwarded_before, "a refused request reached the node"
    assert node.node.calls["nodeAdmin_getConfig"] == 0
    answer = await post_json(gateway, [rpc("node_getBlockNumber")])
    assert answer.code == 200 and isinstance(answer.json()[0]["result"], int)


@ensure
async def test_chunked_oversized_body_is_refused(cluster):
    """No Content-Length: the limit must hold while the body streams in."""
    from twisted.web.client import Agent

    from sentinel_proxy.upstream.client import read_body
    from twisted.web.iweb import UNKNOWN_LENGTH
    from twisted.internet import reactor, defer
    from twisted.web.http_headers import Headers

    node, gateway = await both(cluster)

    class Stream:
        length = UNKNOWN_LENGTH

        def startProducing(self, consumer):
            for _ in range(40):
                consumer.write(b" " * 65536)
            return defer.succeed(None)

        def pauseProducing(self):
            pass

        def resumeProducing(self):
            pass

        def stopProducing(self):
            pass

    response = await Agent(reactor).request(b"POST", gateway.encode(), Headers(JSON), Stream())
    body = await read_body(response)
    assert response.code == 413 and json.loads(body)["error"]["code"] == jsonrpc.INVALID_REQUEST


@ensure
async def test_batch_with_refused_items_is_merged_in_order(cluster):
    node, gateway = await both(cluster)
    batch = [rpc("node_getBlock", [RECENT], id_=0), rpc("nodeAdmin_rollbackTo", [1], id_=1), "junk",
             rpc("node_getBlockNumber", id_="last")]
    answer = await post_json(gateway, batch)
    assert answer.code == 200
    items = answer.json()
    assert [item["id"] for item in items] == [0, 1, None, "last"]
    assert items[0]["result"]["number"] == RECENT
    assert items[1]["error"]["code"] == jsonrpc.METHOD_NOT_FOUND
    assert items[2]["error"]["code"] == jsonrpc.INVALID_REQUEST
    assert node.node.calls["nodeAdmin_rollbackTo"] == 0
    only_refused = await post_json(gateway, [rpc("nodeAdmin_pauseSync")])
    assert only_refused.code == 200 and only_refused.json()[0]["error"]["code"] == jsonrpc.METHOD_NOT_FOUND


@ensure
async def test_backend_failures_give_502_with_json_rpc_errors(cluster):
    node = cluster.node("pruned")
    # Checks far apart: this test is about the request path, not about the health check reacting.
    _, gateway = await cluster.gateway([node], health_check_interval_ms="600000")
    for failure in ("failing-500", "failing-garbage", "failing-reset", "hang"):
        node.node.scenario = SCENARIOS[failure]
        answer = await post_json(gateway, [rpc("node_getBlockNumber")], timeout=10)
        assert answer.code == 502, (failure, answer.body)
        error = answer.json()[0]["error"]
        expected = jsonrpc.UPSTREAM_TIMEOUT if failure == "hang" else jsonrpc.UPSTREAM_FAILED
        assert error["code"] == expected, failure
    node.node.scenario = SCENARIOS["pruned"]
    answer = await post_json(gateway, [rpc("node_getBlockNumber")])
    assert answer.code == 200


@ensure
async def test_a_node_that_goes_down_gets_no_traffic(cluster):
    good, bad = cluster.node("pruned"), cluster.node("pruned")
    service, gateway = await cluster.gateway([good, bad])
    bad.node.scenario = SCENARIOS["not-ready"]
    await wait_for(lambda: not next(b for b in service.pool.backends if b.url == bad.url).healthy,
                   what="the not-ready node to be marked unhealthy")
    before = bad.node.calls["node_getBlock"]
    for i in range(40):
        assert (await post_json(gateway, [rpc("node_getBlock", [RECENT + i])])).code == 200
    assert bad.node.calls["node_getBlock"] == before
    assert good.node.calls["node_getBlock"] >= 40


@ensure
async def test_no_healthy_node_gives_503_and_not_ready(cluster):
    node = cluster.node("not-ready")
    service, gateway = await cluster.gateway([node], wait_healthy=0)
    await wait_for(lambda: service.pool.backends[0].last_check is not None, what="the first health check")
    answer = await post_json(gateway, [rpc("node_getBlockNumber")])
    assert answer.code == 503 and answer.json()[0]["error"]["code"] == jsonrpc.NO_BACKEND
    ready = await http("GET", gateway + "/ready")
    assert ready.code == 503
    health = (await http("GET", gateway + "/health")).json()
    assert health["status"] == "unhealthy" and health["backends"][0]["healthy"] is False


@ensure
async def test_health_has_the_prototype_shape(cluster):
    node, gateway = await both(cluster)
    await post_json(gateway, [rpc("node_getBlockNumber")])
    await http("POST", gateway, b"{oops")
    answer = await http("GET", gateway + "/health")
    assert answer.code == 200 and answer.header("content-type") == "application/json"
    health = answer.json()
    assert health["status"] == "healthy" and isinstance(health["uptime"], float)
    assert set(health["metrics"]) == {"totalRequests", "totalErrors", "errorRate"}
    assert health["metrics"]["totalRequests"] == 2 and health["metrics"]["totalErrors"] == 1
    assert health["metrics"]["errorRate"] == 0.5
    backend = health["backends"][0]
    assert {"url", "healthy", "blockNumber", "lastCheck", "nodeType", "integrityStats", "epochStats",
            "requestStats"} <= set(backend)
    assert backend["url"] == node.url and backend["healthy"] is True and backend["nodeType"] == "pruned"
    assert isinstance(backend["blockNumber"], int) and backend["blockNumber"] > 0
    assert backend["lastCheck"].endswith("Z") and backend["lastCheck"][:2] == "20"
    assert set(backend["integrityStats"]) == {"missingEpochs", "inconsistentEpochs", "integrityScore",
                                              "integrityStatus", "priority"}
    assert isinstance(backend["integrityStats"]["integrityScore"], int)
    assert backend["integrityStats"]["integrityStatus"] in ("perfect", "good", "bad")
    assert set(backend["epochStats"]) == {"currentEpoch", "totalEpochs", "oldestSlot", "lastProcessedSlot"}
    assert backend["epochStats"]["currentEpoch"] > 0
    assert set(backend["requestStats"]) == {"avgLatency", "maxLatency", "minLatency", "totalRequests", "totalErrors"}
    assert backend["requestStats"]["totalRequests"] == 1
    ready = await http("GET", gateway + "/ready")
    assert (ready.code, ready.body) == (200, b"READY")


@ensure
async def test_metrics_has_the_prototype_names(cluster):
    node, gateway = await both(cluster)
    await post_json(gateway, [rpc("node_getBlockNumber")])
    text = (await http("GET", gateway + "/metrics")).body.decode()
    assert f'sentinel_proxy_requests_total{{backend="{node.url}",method="proxy",status="200"}} 1.0' in text
    assert f'sentinel_proxy_request_duration_seconds_count{{backend="{node.url}",method="proxy"}} 1.0' in text
    assert f'sentinel_proxy_backend_health{{url="{node.url}"}} 1.0' in text
    assert f'sentinel_proxy_backend_integrity_score{{url="{node.url}"}}' in text
    assert f'sentinel_proxy_backend_block_number{{url="{node.url}"}}' in text


@ensure
async def test_cors_preflight(cluster):
    node, gateway = await both(cluster)
    answer = await http("OPTIONS", gateway + "/archiver", headers={})
    assert answer.code == 204 and answer.header("access-control-allow-origin") == "*"


@ensure
async def test_dashboard_assets_are_served_without_a_listing(cluster):
    node, gateway = await both(cluster)
    page = await http("GET", gateway + "/dashboard")
    assert page.code == 200 and page.header("content-type").startswith("text/html")
    assert b"static/dashboard.js" in page.body
    script = await http("GET", gateway + "/static/dashboard.js")
    assert script.code == 200 and len(script.body) > 1000
    assert (await http("GET", gateway + "/static/")).code == 404
    assert (await http("GET", gateway + "/static/../config.py")).code == 404
