"""Node credentials in SENTINEL_BACKENDS reach the node and nothing else: no header, /metrics label,
/health field, dashboard, error body or log line shows them; /metrics behind a token."""
import base64
import io
import json
from dataclasses import dataclass, field

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.test.requesthelper import DummyRequest

from sentinel_proxy.config import load_settings
from sentinel_proxy.ops import logs
from sentinel_proxy.web.auth import Access
from tests.support import JSON, http, post_json, rpc, wait_for

ensure = pytest_twisted.ensureDeferred

ADMIN = "an-admin-token-for-the-secrets-tests"
SCRAPER = "a-metrics-token-for-prometheus-only"
BEARER = {b"authorization": [f"Bearer {ADMIN}".encode()]}
#: What the three nodes are given: user and password, a token as the user, path keys.
USER, PASSWORD, TOKEN = "opsuser7", "hunter2pass7", "TOKENSECRET7"
PATH_KEYS = ("PATHKEYAAAA7", "PATHKEYCCCC7", "PATHKEYDEAD7")
SECRETS = (USER, PASSWORD, TOKEN, *PATH_KEYS, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
           base64.b64encode(f"{TOKEN}:".encode()).decode())


@dataclass
class KeyedNode(Resource):
    """A node that answers only on its path keys, each with its own Basic credentials (as a hosted
    node provider does), in front of a simulated node."""

    node: Resource
    keys: dict[bytes, bytes]
    seen: list[tuple[bytes, bytes | None]] = field(default_factory=list)
    refused: int = 0
    isLeaf = True

    def __post_init__(self) -> None:
        Resource.__init__(self)

    def render(self, request: Request) -> bytes | int:
        authorization = request.getHeader(b"authorization")
        self.seen.append((request.path, authorization))
        prefix = next((p for p in self.keys if request.path == p or request.path.startswith(p + b"/")), None)
        if prefix is None or authorization != self.keys[prefix]:
            self.refused += 1
            request.setResponseCode(401)
            return b"unauthorized"
        request.path = request.path[len(prefix):] or b"/"
        return self.node.render(request)


class QuietSite(Site):
    """The node's own access log shows its path keys, as a provider's log does: not the gateway's."""

    def log(self, request: Request) -> None:
        pass


def basic(credentials: str) -> bytes:
    return b"Basic " + base64.b64encode(credentials.encode())


@pytest.fixture
def captured():
    """Every log event as the JSON-lines observer writes it, Twisted's own included."""
    stream = io.StringIO()
    observer = logs.JsonLinesObserver(stream)
    globalLogPublisher.addObserver(observer)
    yield stream
    globalLogPublisher.removeObserver(observer)
    logs.set_level("info")


async def keyed_fleet(cluster, **settings):
    """Two nodes behind one host:port with different path keys (one with user:pass, one with a token
    as the user) and a third, dead, with its own credentials; the gateway in front of them."""
    simulated = cluster.node("pruned")
    keyed = KeyedNode(simulated.port.factory.resource, {
        b"/v1/" + PATH_KEYS[0].encode(): basic(f"{USER}:{PASSWORD}"),
        b"/v1/" + PATH_KEYS[1].encode(): basic(f"{TOKEN}:")})
    port = reactor.listenTCP(0, QuietSite(keyed), interface="127.0.0.1")
    cluster.nodes.append(type(simulated)(simulated.node, port))  # stopped with the cluster
    number = port.getHost().port
    dead = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
    dead_number = dead.getHost().port
    await dead.stopListening()
    backends = [f"http://{USER}:{PASSWORD}@127.0.0.1:{number}/v1/{PATH_KEYS[0]}",
                f"http://{TOKEN}@127.0.0.1:{number}/v1/{PATH_KEYS[1]}",
                f"http://{USER}:{PASSWORD}@127.0.0.1:{dead_number}/v1/{PATH_KEYS[2]}"]
    service, url = await cluster.gateway(backends, wait_healthy=2, admin_token=ADMIN, **settings)
    await wait_for(lambda: service.pool.backends[2].last_error is not None, what="the dead node's first check")
    return service, url, keyed, number


@ensure
async def test_credentials_still_reach_the_node(cluster):
    service, url, keyed, number = await keyed_fleet(cluster)
    for _ in range(6):
        assert (await post_json(url, rpc("node_getBlockNumber"))).code == 200
    assert keyed.refused == 0
    paths = {(path, authorization) for path, authorization in keyed.seen}
    assert (b"/v1/" + PATH_KEYS[0].encode(), basic(f"{USER}:{PASSWORD}")) in paths
    assert (b"/v1/" + PATH_KEYS[1].encode(), basic(f"{TOKEN}:")) in paths
    names = [b.name for b in service.pool.backends]
    assert names[:2] == [f"http://127.0.0.1:{number}", f"http://127.0.0.1:{number}#2"], "one host:port, told apart"


@ensure
async def test_no_public_surface_shows_a_node_credential(cluster, captured, capsys):
    service, url, _, number = await keyed_fleet(cluster, log_level="debug")
    answers = [await post_json(url, rpc("node_getBlockNumber", id_=i)) for i in range(4)]
    answers.append(await post_json(url, [rpc("node_getBlockNumber", id_=1), rpc("node_getL2Tips", id_=2)]))
    answers.append(await http("POST", url, b"{not json", headers=JSON))
    answers.append(await post_json(url, rpc("nodeAdmin_getConfig")))
    answers.append(await http("OPTIONS", url + "/"))
    for path in ("/health", "/metrics", "/ready", "/dashboard", "/static/dashboard.js", "/nothing-here"):
        answers.append(await http("GET", url + path))
    answers.append(await http("GET", url + "/admin/config", headers=BEARER))
    for name in (f"127.0.0.1:{number}", f"127.0.0.1:{number}%232"):
        drained = await http("POST", url + "/admin/drain/" + name, headers=BEARER)
        assert drained.code == 200, name
        answers.append(drained)
    refused = await post_json(url, rpc("node_getBlockNumber"))
    assert refused.code == 503
    answers.append(refused)
    answers.append(await http("GET", url + "/ready"))
    assert answers[-1].code == 503
    service.access_log.flush()

    shown = [answer.body.decode("utf-8", "replace") for answer in answers]
    shown += [(name + b": " + value).decode("latin-1") for answer in answers
              for name, values in answer.headers.getAllRawHeaders() for value in values]
    access_log, events = capsys.readouterr().out, captured.getvalue()
    shown += [access_log, events]
    assert any("x-sentinel-backend: http://127.0.0.1:" in line.lower() for line in shown), "the scan sees headers"
    assert f"-> http://127.0.0.1:{number}" in access_log and "drained by an operator" in events, "the scan sees logs"
    metrics = next(answer.body.decode() for answer in answers if b"sentinel_proxy_backend_health" in answer.body)
    assert f'url="http://127.0.0.1:{number}#2"' in metrics, "the metric labels are the display names"
    health = next(json.loads(answer.body) for answer in answers if answer.body.startswith(b'{"status"'))
    assert [b["url"] for b in health["backends"]] == [b.name for b in service.pool.backends]
    for text in shown:
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} shown in: {text[:300]!r}"
            assert secret.lower() not in text.lower(), f"{secret!r} shown (other case) in: {text[:300]!r}"


def metrics_refusal(headers: dict[bytes, bytes], **settings: str):
    current = load_settings(cli={"backends": "http://a:1", **settings}, environ={}, dotenv_path=None)
    request = DummyRequest([b"metrics"])
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name, [value])
    refusal = Access(lambda: current).metrics_refusal(request)
    return None if refusal is None else (refusal.status, refusal.challenge)


@pytest.mark.parametrize("settings, headers, expected", [
    ({}, {}, None),
    ({"admin_token": ADMIN}, {}, None),
    ({"protect_metrics": "on", "admin_token": ADMIN}, {}, (401, True)),
    ({"protect_metrics": "on", "admin_token": ADMIN}, {b"authorization": b"Bearer wrong-token"}, (403, False)),
    ({"protect_metrics": "on", "admin_token": ADMIN}, {b"authorization": f"Bearer {ADMIN}".encode()}, None),
    ({"protect_metrics": "on", "admin_token": ADMIN}, {b"x-admin-token": ADMIN.encode()}, None),
    ({"metrics_token": SCRAPER}, {}, (401, True)),
    ({"metrics_token": SCRAPER}, {b"authorization": f"Bearer {SCRAPER}".encode()}, None),
    ({"metrics_token": SCRAPER, "admin_token": ADMIN}, {b"authorization": f"Bearer {ADMIN}".encode()}, None),
    ({"metrics_token": SCRAPER}, {b"authorization": b"Bearer "}, (401, True)),
], ids=["open", "admin-token-leaves-metrics-open", "protected-no-token", "protected-wrong", "protected-admin",
        "protected-admin-header", "scraper-token-no-token", "scraper-token", "scraper-or-admin", "empty-bearer"])
def test_metrics_need_a_token_when_protected(settings, headers, expected):
    assert metrics_refusal(headers, **settings) == expected


@ensure
async def test_the_metrics_token_opens_metrics_and_nothing_else(cluster):
    node = cluster.node("pruned")
    _, url = await cluster.gateway([node], admin_token=ADMIN, metrics_token=SCRAPER)
    anonymous = await http("GET", url + "/metrics")
    assert anonymous.code == 401 and anonymous.header("www-authenticate") == 'Bearer realm="sentinel-proxy"'
    assert b"sentinel_proxy" not in anonymous.body
    assert (await http("GET", url + "/metrics", headers={b"authorization": [b"Bearer nope"]})).code == 403
    scraped = await http("GET", url + "/metrics", headers={b"authorization": [f"Bearer {SCRAPER}".encode()]})
    assert scraped.code == 200 and b"sentinel_proxy_backend_health" in scraped.body
    admin = await http("GET", url + "/metrics", headers={b"authorization": [f"Bearer {ADMIN}".encode()]})
    assert admin.code == 200
    assert (await http("GET", url + "/admin/config", headers={b"authorization": [f"Bearer {SCRAPER}".encode()]})).code \
        == 403, "the scraper's token is no admin token"
    assert (await http("GET", url + "/health")).code == 200, "PROTECT_STATUS is off"


@ensure
async def test_the_cors_preflight_lets_a_browser_send_its_api_key(cluster):
    _, url = await cluster.gateway([cluster.node("archiver")])
    for route in ("/", "/archiver", "/pruned"):
        answer = await http("OPTIONS", url + route, headers={b"origin": [b"https://wallet.example"],
                                                             b"access-control-request-method": [b"POST"],
                                                             b"access-control-request-headers": [b"x-api-key"]})
        allowed = {h.strip() for h in answer.header("access-control-allow-headers").split(",")}
        assert answer.code == 204 and answer.header("access-control-allow-origin") == "*"
        assert {"x-api-key", "content-type", "content-encoding", "accept-encoding", "x-request-id"} <= allowed, route
