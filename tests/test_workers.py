"""--workers: several processes on one port, the first running the checks, all ending together."""
import json
import pickle
import signal
import socket
import urllib.request

import pytest

from sentinel_proxy.state.backends import BackendPool
from sentinel_proxy.config import ConfigError, load_settings
from sentinel_proxy.settings import core_count
from tests.processes import Daemon, fetch, poll

#: Every test here runs twistd as a subprocess.
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_workers_need_a_fixed_tcp_port():
    for listen in ("tcp:0:interface=127.0.0.1", "unix:/tmp/sentinel.sock"):
        with pytest.raises(ConfigError, match="workers need a fixed TCP port"):
            load_settings(cli={"backends": "http://a:1", "workers": "2", "listen": listen}, environ={},
                          dotenv_path=None)
    assert load_settings(cli={"backends": "http://a:1", "workers": "2"}, environ={}, dotenv_path=None).workers == 2


def test_the_node_state_crosses_to_another_pool():
    leader = BackendPool([("a", "http://a:1"), ("b", "http://b:1")])
    a, b = leader.backends
    leader.record_health(a, True, now=5.0, block_number=42, latency_ms=3.0, oldest_block=1, chain=("1", "1"))
    leader.record_health(b, False, now=5.0, error="node_isReady answered False")
    leader.reassess()
    follower = BackendPool([])
    snapshot = pickle.loads(pickle.dumps(leader.snapshot()))
    follower.replace(snapshot["entries"])
    follower.apply(snapshot)
    fa, fb = follower.backends
    assert (fa.name, fa.healthy, fa.block_number, fa.oldest_block, fa.node_type) == ("a", True, 42, 1, "archiver")
    assert (fb.healthy, fb.last_error) == (False, "node_isReady answered False")
    assert follower.pick("/").backend is fa
    assert fa.breaker is not a.breaker, "breakers stay each worker's own"


@pytest.mark.parametrize("workers", ["2", "auto"])
def test_workers_serve_one_port_and_end_together(tmp_path, workers):
    count = 2 if workers == "2" else core_count()
    if count < 2:
        pytest.skip("one core: --workers auto starts no second worker")
    port = free_port()
    daemon = Daemon(["sentinel-proxy", "--demo", "--listen", f"tcp:{port}:interface=127.0.0.1", "--workers", workers],
                    tmp_path)
    base = f"http://127.0.0.1:{port}"
    workers_seen: set[str] = set()
    try:
        daemon.wait_for_line(rf"started {count - 1} more workers on the same port")

        def seen_workers():
            for i in range(40):  # a new connection each time: the kernel spreads them over the workers
                request = urllib.request.Request(base + "/", data=json.dumps(
                    [{"jsonrpc": "2.0", "id": i, "method": "node_getProvenBlockNumber", "params": []}]).encode(),
                    headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=10) as response:
                        if response.status == 200 and "result" in json.loads(response.read())[0]:
                            workers_seen.add(response.headers["X-Sentinel-Worker"])
                except OSError:
                    pass
            return workers_seen == {str(n) for n in range(count)}

        assert poll(seen_workers, timeout=30), "every worker must answer, the followers with the leader's node state"
        assert fetch(base + "/ready")[0] == 200
    finally:
        daemon.process.send_signal(signal.SIGTERM)
        code = daemon.process.wait(timeout=30)
        daemon.stop()
    log = "".join(daemon.lines)
    assert code == 0, log
    assert all(f"worker {n} ended" in log for n in range(1, count)) and "exit code 0" in log, log
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
