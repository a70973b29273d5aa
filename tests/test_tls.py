"""TLS through ``ssl:`` endpoints: a gateway listening on plain HTTP and on TLS side by side, and the
configuration check of the key and certificate files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_twisted

from sentinel_proxy.config import ConfigError, load_settings
from tests.tls_support import self_signed, ssl_endpoint


def load(listen: str):
    return load_settings(cli={"backends": "http://a:1", "listen": listen}, environ={}, dotenv_path=None)


def test_the_configuration_check_loads_the_key_and_certificate(tmp_path):
    key, cert = self_signed(tmp_path)
    other_key, _ = self_signed(tmp_path, "other")
    assert load(f"tcp:0 {ssl_endpoint(key, cert)}").listen == ("tcp:0", ssl_endpoint(key, cert))
    (tmp_path / "garbage.pem").write_text("not PEM\n")
    unreadable = tmp_path / "unreadable.pem"
    unreadable.write_bytes(key.read_bytes())
    unreadable.chmod(0)
    cases = [
        (ssl_endpoint(tmp_path / "absent.pem", cert), "cannot read " + str(tmp_path / "absent.pem")
         + ": No such file or directory"),
        (ssl_endpoint(other_key, cert), "is not a usable endpoint: Certificate public and private keys do not match"),
        (ssl_endpoint(tmp_path / "garbage.pem", cert), "is not a usable endpoint: "),
    ]
    if not _readable(unreadable):
        cases.append((ssl_endpoint(unreadable, cert), "Permission denied"))
    for listen, fragment in cases:
        with pytest.raises(ConfigError) as caught:
            load(listen)
        assert str(caught.value).startswith(f"invalid --listen: {listen!r}"), caught.value
        assert fragment in str(caught.value) and "\n" not in str(caught.value)


def _readable(path: Path) -> bool:
    """False unless the tests run as root, who reads a mode-0 file anyway."""
    try:
        path.read_bytes()
    except PermissionError:
        return False
    return True


@pytest_twisted.ensureDeferred
async def test_json_rpc_and_health_over_tls_beside_plain_http(cluster, tmp_path):
    import treq
    from twisted.internet import reactor
    from twisted.internet.ssl import Certificate, optionsForClientTLS
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

    from tests.support import post_json, rpc

    key, cert = self_signed(tmp_path)
    node = cluster.node("archiver")
    service, plain = await cluster.gateway([node], listen=f"tcp:0:interface=127.0.0.1 {ssl_endpoint(key, cert)}")
    assert len(service.listener.ports) == 2
    tls_port = service.listener.ports[1].getHost().port

    class TrustOurCertificate(BrowserLikePolicyForHTTPS):
        def creatorForNetloc(self, hostname: bytes, port: int):
            return optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(cert.read_bytes()))

    client = treq.client.HTTPClient(Agent(reactor, contextFactory=TrustOurCertificate()))
    secure = f"https://127.0.0.1:{tls_port}"
    answer = await client.post(secure + "/", json.dumps([rpc("node_getBlockNumber", id_=7)]).encode(),
                               headers={"Content-Type": "application/json"}, timeout=10)
    body = json.loads(await answer.content())
    assert answer.code == 200 and body[0]["id"] == 7 and isinstance(body[0]["result"], int)
    health = await client.get(secure + "/health", timeout=10)
    assert health.code == 200 and json.loads(await health.content())["backends"][0]["healthy"] is True

    plain_answer = await post_json(plain + "/", rpc("node_getBlockNumber"))
    assert plain_answer.code == 200, "plain HTTP still serves beside TLS"
    refused = await client.get(f"https://127.0.0.1:{service.listener.ports[0].getHost().port}/health", timeout=10) \
        .addCallbacks(lambda response: response.code, lambda failure: "no TLS")
    assert refused == "no TLS", "the plain listener speaks no TLS"
