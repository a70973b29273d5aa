"""Backend state, route candidates, credentials handling and the /health helpers (no I/O)."""
import base64

from sentinel_proxy.backends import Backend, BackendPool, LatencyWindow, display_url
from sentinel_proxy.status import NEVER, rfc3339


def test_latency_window_keeps_the_last_hundred():
    window = LatencyWindow()
    assert (window.average, window.minimum, window.maximum) == (0.0, 0.0, 0.0)
    for value in range(1, 151):
        window.add(float(value))
    assert (window.minimum, window.maximum, window.average) == (51.0, 150.0, 100.5)


def test_credentials_become_basic_auth_and_are_masked():
    backend = Backend("https://alice:s%40cret@node.example:8443/rpc")
    assert backend.name == "https://alice:***@node.example:8443/rpc"
    assert backend.target == b"https://node.example:8443/rpc"
    assert backend.authorization == b"Basic " + base64.b64encode(b"alice:s@cret")
    plain = Backend("http://node:8080")
    assert (plain.name, plain.target, plain.authorization) == ("http://node:8080", b"http://node:8080/", None)
    assert display_url("http://[::1]:8080") == "http://[::1]:8080"
    assert Backend("http://[::1]:8080").target == b"http://[::1]:8080/"


def test_only_healthy_nodes_of_the_route_type_are_candidates():
    pool = BackendPool(["http://a:1", "http://b:1", "http://c:1"], random=lambda: 0.0)
    a, b, c = pool.backends
    assert pool.pick("/") is None, "unchecked nodes get no traffic"
    pool.record_health(a, True, now=1.0, block_number=10, latency_ms=5.0)
    pool.record_health(b, True, now=1.0, block_number=10, latency_ms=5.0)
    pool.record_health(c, False, now=1.0, error="node_isReady answered False")
    a.node_type, b.node_type = "archiver", "pruned"
    assert pool.candidates("/") == [a, b]
    assert pool.candidates("/archiver") == [a] and pool.pick("/archiver") is a
    assert pool.candidates("/pruned") == [b]
    assert c.checked_down and not Backend("http://d:1").checked_down
    assert pool.any_healthy


def test_priority_follows_state_changes():
    pool = BackendPool(["http://a:1"])
    backend = pool.backends[0]
    assert backend.priority == 110  # unchecked: no latency samples, not healthy
    pool.record_health(backend, True, now=1.0, block_number=5, latency_ms=250.0)
    assert backend.priority == 125
    pool.record_health(backend, False, now=2.0, error="down")
    assert backend.priority == 105 and backend.last_error == "down" and backend.block_number == 5


def test_replace_keeps_the_state_of_nodes_that_stay():
    pool = BackendPool(["http://a:1", "http://b:1"])
    pool.record_health(pool.backends[0], True, now=1.0, block_number=7)
    kept = pool.backends[0]
    pool.replace(["http://c:1", "http://a:1"])
    assert [b.url for b in pool.backends] == ["http://c:1", "http://a:1"]
    assert pool.backends[1] is kept and kept.block_number == 7


def test_rfc3339():
    assert rfc3339(None) == NEVER
    assert rfc3339(0.5) == "1970-01-01T00:00:00.500Z"
