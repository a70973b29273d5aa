"""Method policy, admin endpoints behind ADMIN_TOKEN, draining under load, protected status."""
import json

import pytest
import pytest_twisted
from twisted.internet import defer

from sentinel_proxy.core import jsonrpc
from sentinel_proxy.core.jsonrpc import MethodPolicy, RequestError, parse_request
from tests.support import JSON, http, post_json, rpc, wait_for

ensure = pytest_twisted.ensureDeferred
TOKEN = "a-long-admin-token-for-tests-0123"
BEARER = {b"authorization": [f"Bearer {TOKEN}".encode()]}


def test_policy_patterns_and_the_admin_namespace():
    policy = MethodPolicy(allow=("node_*", "p2p_getPeers"), deny=("node_sendTx",))
    assert policy.allows("node_getBlock") and policy.allows("p2p_getPeers")
    assert not policy.allows("node_sendTx"), "deny wins"
    assert not policy.allows("p2p_getPendingTxs") and not policy.allows("eth_call")
    assert not MethodPolicy(allow=("nodeAdmin_*", "nodeAdmin_getConfig")).allows("nodeAdmin_getConfig"), \
        "the admin namespace is never forwarded"
    with pytest.raises(RequestError) as refused:
        parse_request(json.dumps(rpc("node_sendTx", [{}])).encode(), 100, policy)
    assert refused.value.code == jsonrpc.METHOD_NOT_FOUND


@pytest.mark.parametrize("method", ["aztecAdmin_getConfig", "nodeDebug_x", "aztecDebug_x", "NODEADMIN_x",
                                    "aztecadmin_x", "NodeAdmin_getConfig"])
def test_every_admin_and_debug_namespace_is_refused_in_any_case(method):
    namespace = method.split("_")[0]
    for policy in (MethodPolicy(), MethodPolicy(allow=("*",)), MethodPolicy(allow=(f"{namespace}_*", method))):
        assert not policy.allows(method)
        with pytest.raises(RequestError) as refused:
            parse_request(json.dumps(rpc(method)).encode(), 100, policy)
        assert refused.value.code == jsonrpc.METHOD_NOT_FOUND


def test_the_default_policy_speaks_both_dialects():
    policy = MethodPolicy()
    assert all(policy.allows(m) for m in ("node_getBlock", "aztec_getBlock", "aztec_getChainTips", "p2p_getPeers"))
    assert not policy.allows("eth_call")


@ensure
async def test_method_policy_per_route(cluster):
    node = cluster.node("archiver")
    _, url = await cluster.gateway([node], method_deny="node_sendTx",
                                   archiver_method_allow="node_getBlock,node_getBlockNumber")
    assert (await post_json(url, rpc("node_sendTx", [{}]))).json()["error"]["code"] == jsonrpc.METHOD_NOT_FOUND
    assert (await post_json(url, rpc("node_getL2Tips"))).code == 200
    narrowed = await post_json(url + "/archiver", [rpc("node_getL2Tips", id_=0), rpc("node_getBlockNumber", id_=1)])
    items = narrowed.json()
    assert items[0]["error"]["code"] == jsonrpc.METHOD_NOT_FOUND and "result" in items[1]
    assert node.node.calls["node_sendTx"] == 0


@ensure
async def test_admin_is_off_without_a_token(cluster):
    node = cluster.node("pruned")
    _, url = await cluster.gateway([node])
    for method, path in (("POST", "/admin/check"), ("GET", "/admin/config"), ("POST", "/admin/drain/x")):
        assert (await http(method, url + path, headers=BEARER)).code == 404


@ensure
async def test_admin_auth_and_actions(cluster):
    node = cluster.node("pruned")
    secret_url = node.url.replace("http://", "http://ops:hunter2@")
    service, url = await cluster.gateway([f"pruned-1={secret_url}"], admin_token=TOKEN)
    assert (await http("GET", url + "/admin/config", headers={})).code == 401
    assert (await http("GET", url + "/admin/config", headers={b"authorization": [b"Bearer wrong-token"]})).code == 403
    assert (await http("GET", url + "/admin/config", headers={b"x-admin-token": [b"nope"]})).code == 403
    config = await http("GET", url + "/admin/config", headers=BEARER)
    assert config.code == 200
    text = config.body.decode()
    assert "hunter2" not in text and TOKEN not in text
    document = config.json()
    assert document["admin_token"] == "***" and document["backends"][0] == {"name": "pruned-1", "url": node.url}
    assert document["max_attempts"] == 3

    checked = await http("POST", url + "/admin/check", headers=BEARER)
    assert checked.code == 200 and checked.json()["backends"][0]["healthy"] is True

    assert (await http("POST", url + "/admin/drain/nobody", headers=BEARER)).code == 404
    drained = await http("POST", url + "/admin/drain/pruned-1", headers=BEARER)
    assert drained.code == 200 and drained.json()["routing"] == "drained"
    assert (await post_json(url, rpc("node_getBlockNumber"))).code == 503, "the only node is drained"
    health = (await http("GET", url + "/health")).json()
    assert health["backends"][0]["routing"] == "drained"
    assert (await http("POST", url + "/admin/undrain/pruned-1", headers=BEARER)).code == 200
    assert (await post_json(url, rpc("node_getBlockNumber"))).code == 200


@ensure
@pytest.mark.slow
async def test_drain_under_load_fails_no_request(cluster):
    first, second = cluster.node("slow"), cluster.node("pruned")
    service, url = await cluster.gateway([f"first={first.url}", f"second={second.url}"], admin_token=TOKEN)
    codes: list[int] = []
    drained_at: list[int] = []

    async def caller(worker: int) -> None:
        for i in range(25):
            answer = await post_json(url, [rpc("node_getProvenBlockNumber", id_=i)])
            codes.append(answer.code)
            if worker == 0 and i == 5:
                assert (await http("POST", url + "/admin/drain/first", headers=BEARER)).code == 200
                drained_at.append(first.node.calls["node_getProvenBlockNumber"] + first.node.in_flight)

    await defer.gatherResults([defer.Deferred.fromCoroutine(caller(w)) for w in range(8)])
    assert len(codes) == 200 and set(codes) == {200}, "draining fails no request"
    await wait_for(lambda: first.node.in_flight == 0, what="requests in flight at the drained node to finish")
    assert first.node.calls["node_getProvenBlockNumber"] <= drained_at[0], "no new traffic after the drain"
    assert second.node.calls["node_getProvenBlockNumber"] > 100


@ensure
async def test_protected_status_needs_the_token(cluster):
    node = cluster.node("pruned")
    _, url = await cluster.gateway([node], admin_token=TOKEN, protect_status="on")
    assert (await http("GET", url + "/health")).code == 401
    assert (await http("GET", url + "/health", headers=BEARER)).code == 200
    assert (await http("GET", url + "/ready")).code == 200, "load balancers need no token"
    assert (await http("GET", url + "/metrics")).code == 200
    page = await http("GET", url + "/dashboard")
    assert page.code == 200 and b"sentinel" in page.body.lower(), "the page has no data; its /health call does"
    assert (await post_json(url, rpc("node_getBlockNumber"), headers=JSON)).code == 200


def test_secrets_are_masked_wherever_settings_are_shown():
    from sentinel_proxy.ops.admin import masked
    from sentinel_proxy.config import load_settings

    settings = load_settings(cli={"backends": "n=http://u:hunter2@a:1", "admin_token": TOKEN,
                                  "api_keys": "k" * 20, "cache": "redis://:pw@r:6379/0"}, environ={},
                             dotenv_path=None)
    shown = repr([masked(name, getattr(settings, name)) for name in ("backends", "admin_token", "api_keys", "cache")])
    assert "hunter2" not in shown and TOKEN not in shown and "k" * 20 not in shown and ":pw@" not in shown
