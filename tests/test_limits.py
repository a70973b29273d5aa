"""Rate limits through a real gateway: per address, per API key, X-Forwarded-For trust, shared in Redis."""
import pytest
import pytest_twisted

from sentinel_proxy.core import jsonrpc
from tests.support import JSON, http, post_json, rpc

ensure = pytest_twisted.ensureDeferred
KEY = "key-for-the-tests-0123456789"


def with_headers(**extra: bytes) -> dict:
    return {**JSON, **{name.replace("_", "-").encode(): [value] for name, value in extra.items()}}


@ensure
async def test_per_address_limit_with_batch_costs(cluster):
    node = cluster.node("pruned")
    service, url = await cluster.gateway([node], rate_limit="memory", rate_limit_rate="1", rate_limit_burst="5")
    assert (await post_json(url, [rpc("node_getBlockNumber", id_=i) for i in range(3)])).code == 200  # costs 3
    assert (await post_json(url, rpc("node_getBlockNumber"))).code == 200
    assert (await post_json(url, rpc("node_getBlockNumber"))).code == 200
    refused = await post_json(url, rpc("node_getBlockNumber"))
    assert refused.code == 429 and refused.json()["error"]["code"] == jsonrpc.RATE_LIMITED
    assert int(refused.header("retry-after")) >= 1
    assert (await http("GET", url + "/ready")).code == 200, "only the RPC routes are limited"
    metrics = (await http("GET", url + "/metrics")).body.decode()
    assert 'sentinel_proxy_ratelimit_limited_total{store="memory"} 1.0' in metrics
    assert 'sentinel_proxy_rpc_requests_total{outcome="rejected",route="/"} 1.0' in metrics


@ensure
async def test_forwarded_for_is_believed_only_from_trusted_proxies(cluster):
    node = cluster.node("pruned")
    _, url = await cluster.gateway([node], rate_limit="memory", rate_limit_rate="1", rate_limit_burst="1")
    assert (await post_json(url, rpc("node_getBlockNumber"), with_headers(x_forwarded_for=b"198.51.100.1"))).code == 200
    spoofed = await post_json(url, rpc("node_getBlockNumber"), with_headers(x_forwarded_for=b"198.51.100.2"))
    assert spoofed.code == 429, "an untrusted peer cannot choose its address with the header"

    trusting = cluster.node("pruned")
    _, behind = await cluster.gateway([trusting], rate_limit="memory", rate_limit_rate="1", rate_limit_burst="1",
                                      trusted_proxies="127.0.0.1")
    for client in (b"198.51.100.1", b"198.51.100.2", b"203.0.113.5, 198.51.100.3"):
        answer = await post_json(behind, rpc("node_getBlockNumber"), with_headers(x_forwarded_for=client))
        assert answer.code == 200, client
    again = await post_json(behind, rpc("node_getBlockNumber"), with_headers(x_forwarded_for=b"198.51.100.1"))
    assert again.code == 429, "the same client behind the proxy is limited"


@ensure
async def test_api_keys_have_their_own_limits_and_are_never_logged(cluster):
    node = cluster.node("pruned")
    service, url = await cluster.gateway([node], rate_limit="memory", rate_limit_rate="1", rate_limit_burst="1",
                                         api_keys=KEY, api_key_rate="1", api_key_burst="4")
    lines: list[str] = []
    service.access_log._stream = type("Capture", (), {"write": lines.append, "flush": lambda self=None: None})()
    assert (await post_json(url, rpc("node_getBlockNumber"))).code == 200
    assert (await post_json(url, rpc("node_getBlockNumber"))).code == 429, "the address's bucket is empty"
    for _ in range(3):
        assert (await post_json(url, rpc("node_getBlockNumber"), with_headers(x_api_key=KEY.encode()))).code == 200
    assert (await http("POST", url + f"/?key={KEY}", b'{"jsonrpc":"2.0","id":1,"method":"node_getBlockNumber"}')
            ).code == 200
    assert (await post_json(url, rpc("node_getBlockNumber"), with_headers(x_api_key=KEY.encode()))).code == 429
    unknown = await post_json(url, rpc("node_getBlockNumber"), with_headers(x_api_key=b"not-a-valid-key-at-all"))
    assert unknown.code == 429 and unknown.json()["error"]["code"] == jsonrpc.RATE_LIMITED, \
        "an unknown key costs a token of the address's bucket, emptied above"
    service.access_log.flush()
    assert lines and not any(KEY in line for line in lines)
    config = (await http("GET", url + "/admin/config")).code
    assert config == 404  # admin is off here; with it on the keys are masked (tests/test_admin.py)


@ensure
async def test_two_gateways_share_one_limit_in_redis(cluster, redis_server):  # noqa: F811
    node = cluster.node("pruned")
    shared = {"rate_limit": redis_server.url, "rate_limit_rate": "1", "rate_limit_burst": "4"}
    _, first = await cluster.gateway([node], **shared)
    _, second = await cluster.gateway([node], **shared)
    codes = [(await post_json(url, rpc("node_getBlockNumber"))).code for url in (first, second, first, second)]
    assert codes == [200, 200, 200, 200]
    assert (await post_json(first, rpc("node_getBlockNumber"))).code == 429
    assert (await post_json(second, rpc("node_getBlockNumber"))).code == 429, "the other gateway sees the same bucket"
    redis_server.kill()
    answers = [(await post_json(first, rpc("node_getBlockNumber"))).code for _ in range(5)]
    assert answers == [200] * 5, "Redis down: the limiter fails open, callers are not refused"


@pytest.mark.slow
def test_two_gateway_processes_share_one_limit(tmp_path, redis_server):  # noqa: F811
    """Two twistd processes against one redis-server: one client address, one bucket."""
    import time
    import urllib.error
    import urllib.request

    from tests.test_plugin import Daemon

    for i in range(2):
        (tmp_path / str(i)).mkdir()
    daemons = [Daemon(["sentinel-proxy", "--demo", "--listen", "tcp:0:interface=127.0.0.1", "--rate-limit",
                       redis_server.url, "--rate-limit-rate", "1", "--rate-limit-burst", "4"], tmp_path / str(i))
               for i in range(2)]
    try:
        listening = r"listening on .*port=(\d+)"
        bases = [f"http://127.0.0.1:{d.wait_for_line(listening).group(1)}" for d in daemons]
        for daemon in daemons:
            daemon.wait_for_line(r"demo-archiver.* is healthy|is healthy.*demo-archiver|integrity perfect")

        def call(base: str) -> int:
            request = urllib.request.Request(base + "/", data=b'[{"jsonrpc":"2.0","id":0,"method":'
                                             b'"node_getProvenBlockNumber","params":[]}]',
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status
            except urllib.error.HTTPError as error:
                return error.code

        started = time.monotonic()
        codes = [call(bases[i % 2]) for i in range(10)]
        elapsed = time.monotonic() - started
        allowed = codes.count(200)
        assert set(codes) <= {200, 429}, codes
        # One shared bucket: the burst of 4 plus what refilled at 1/s, whichever process was asked.
        assert 4 <= allowed <= 4 + int(elapsed) + 1, (codes, elapsed)
        assert 429 in codes[0::2] and 429 in codes[1::2], f"both processes must refuse: {codes}"
    finally:
        for daemon in daemons:
            daemon.stop()
