"""The fleet on loopback: three gateway processes sharing one redis-server (SHARED_STATE), in front of
three simulated nodes, each behind a relay that counts what the gateways ask it.

One test, in steps, since the processes take seconds to start: a drain on one gateway reaches all
three; a node made unready (SIGSTOP) is avoided by all; the nodes see one prober's checks; killing
the prober hands the lease over within two check intervals; killing Redis under load costs the
callers nothing.
"""
from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.fault_load import Gateway, Relay, SimNode, wait_until

INTERVAL = 2.0  # the health check interval, s
ADMIN = "a" * 32
pytestmark = pytest.mark.slow


class CountingRelay(Relay):
    """A relay that counts the JSON-RPC method names the gateways send the node."""

    def __init__(self, target: int):
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        super().__init__(target)

    def _pump(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
            if data:
                with self._lock:
                    for method in ("node_isReady", "node_getBlockNumber"):
                        self.counts[method] += data.count(method.encode())
                self._pairs[sock].sendall(data)
                return
        except OSError:
            pass
        self._close(sock)

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)


class Nodes:
    def __init__(self, directory: Path):
        self.nodes = [SimNode(directory / f"node{i}") for i in range(3)]
        for node in self.nodes:
            node.directory.mkdir()
            node.start()
        for node in self.nodes:
            node.started()
        self.relays = [CountingRelay(node.port) for node in self.nodes]

    @property
    def urls(self) -> list[str]:
        return [relay.url for relay in self.relays]

    def stop(self) -> None:
        for relay in self.relays:
            relay.stop()
        for node in self.nodes:
            node.stop()


def call(gateway: Gateway, connection: http.client.HTTPConnection | None = None) -> int:
    """One node_getBlockNumber through ``gateway``: its HTTP status, 0 for a broken answer."""
    connection = connection or http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5.0)
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "node_getBlockNumber", "params": []})
    try:
        connection.request("POST", "/", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
        return response.status if "result" in answer else 0
    except (OSError, http.client.HTTPException, ValueError):
        connection.close()
        return 0


def fleet_of(gateway: Gateway) -> dict | None:
    document = gateway.health()
    return document.get("fleet") if document else None


def routing(gateway: Gateway) -> list[str]:
    document = gateway.health()
    return [b["routing"] for b in document["backends"]] if document else []


def test_a_fleet_shares_its_state_and_one_prober(tmp_path, redis_server):
    nodes = Nodes(tmp_path)
    gateways: list[Gateway] = []
    try:
        options = {"shared-state": redis_server.url, "health-check-interval-ms": str(int(INTERVAL * 1000)),
                   "admin-token": ADMIN}
        gateways = [Gateway(tmp_path / f"gateway{i}", nodes, **options) for i in range(3)]
        assert wait_until(lambda: all(g.ready(timeout=1.0) for g in gateways), 20), [g.log for g in gateways]
        fleets = [fleet_of(g) for g in gateways]
        probers = {f["prober"] for f in fleets}
        assert len(probers) == 1 and sorted(f["role"] for f in fleets) == ["follower", "follower", "prober"], fleets

        # (c) the nodes see one prober's checks: one health batch per node per interval.
        before = [relay.snapshot()["node_isReady"] for relay in nodes.relays]
        started = time.monotonic()
        time.sleep(3 * INTERVAL)
        rounds = [relay.snapshot()["node_isReady"] - b for relay, b in zip(nodes.relays, before)]
        window = time.monotonic() - started
        for count in rounds:
            assert window / INTERVAL - 1 <= count <= window / INTERVAL + 1, (rounds, window)

        # (a) a drain on one gateway stops that node's traffic from all three.
        drained = nodes.relays[0]
        request = http.client.HTTPConnection("127.0.0.1", gateways[1].port, timeout=5.0)
        request.request("POST", f"/admin/drain/127.0.0.1:{drained.port}", headers={"Authorization": f"Bearer {ADMIN}"})
        assert request.getresponse().status == 200
        request.close()
        assert wait_until(lambda: all(routing(g)[0] == "drained" for g in gateways), 3.0)
        seen = drained.snapshot()
        for gateway in gateways:
            assert all(call(gateway) == 200 for _ in range(20))
        after = drained.snapshot()
        traffic = (after["node_getBlockNumber"] - after["node_isReady"]) - (seen["node_getBlockNumber"] - seen["node_isReady"])
        assert traffic == 0

        # (b) a node made unready is avoided by all.
        nodes.nodes[1].signal(signal.SIGSTOP)
        assert wait_until(lambda: all(routing(g)[1] == "down" for g in gateways), 3 * INTERVAL), \
            [routing(g) for g in gateways]
        nodes.nodes[1].signal(signal.SIGCONT)

        # (d) killing the prober hands the lease over within two intervals.
        prober = next(g for g, f in zip(gateways, fleets) if f["role"] == "prober")
        others = [g for g in gateways if g is not prober]
        prober.daemon.process.kill()
        killed = time.monotonic()
        assert wait_until(lambda: any((fleet_of(g) or {}).get("role") == "prober" for g in others), 2 * INTERVAL)
        handover = time.monotonic() - killed
        assert handover <= 2 * INTERVAL, handover
        def agreed() -> set:
            return {(fleet_of(g) or {}).get("prober") for g in others}
        assert wait_until(lambda: len(agreed()) == 1, 1.0), agreed()  # the follower's next round
        assert agreed() != probers

        # (e) killing Redis under load costs the callers nothing.
        statuses: Counter[int] = Counter()
        lock = threading.Lock()

        def load(gateway: Gateway, count: int) -> None:
            connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5.0)
            for _ in range(count):
                status = call(gateway, connection)
                with lock:
                    statuses[status] += 1
            connection.close()

        callers = [threading.Thread(target=load, args=(g, 150)) for g in others for _ in range(2)]
        for caller in callers:
            caller.start()
        assert wait_until(lambda: sum(statuses.values()) >= 100, 10)
        redis_server.kill()
        for caller in callers:
            caller.join(timeout=20)
        assert statuses == Counter({200: 600}), statuses
        assert wait_until(lambda: all((fleet_of(g) or {}).get("redis") == "down" for g in others), 5)
        assert all(fleet_of(g)["role"] == "alone" for g in others)
    finally:
        for gateway in gateways:
            gateway.stop()
        nodes.stop()
