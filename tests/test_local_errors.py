"""The gateway's own failures to open a connection (no file descriptor, no local port, no kernel
memory): told from a node's by errno, counted and logged as the gateway's, and never charged to a
node. In memory (``MemoryReactorClock``, in-memory clients, ``task.Clock``), and once end to end
against a daemon whose descriptor limit is lowered."""
from __future__ import annotations

import errno
import json
import os
import resource
import socket
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.internet.error import (ConnectBindError, ConnectError, ConnectionRefusedError, DNSLookupError,
                                    TCPTimedOutError, getConnectError)
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer

from sentinel_proxy.checks import CheckClient, HealthService, IntegrityService
from sentinel_proxy.core import jsonrpc
from sentinel_proxy.core.integrity import IntegrityParams
from sentinel_proxy.interfaces import ICheckClient
from sentinel_proxy.ops.metrics import Metrics
from sentinel_proxy.proxy.failover import Failover
from sentinel_proxy.proxy.guard import check, plan
from sentinel_proxy.proxy.values import Caller, Inbound, Limits
from sentinel_proxy.state.backends import BackendPool
from sentinel_proxy.upstream.client import PooledAgent, bounded
from sentinel_proxy.upstream.http11 import FastForwardingClient
from sentinel_proxy.upstream.response import LocalError, UpstreamError, local_error

from tests.stages_support import (JSON, TRIGGER_HAPPY, MemoryClient, Verdict, answer, body_of, result, rig, rpc, sample, settled,
                                  trusted_pool)


def local_lines(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if "local error" in e.get("log_format", "")]


def error_of(deferred: defer.Deferred[Any]) -> BaseException:
    failures: list[Failure] = []
    deferred.addErrback(failures.append)
    assert failures, "the call has not failed"
    return failures[0].value


# ------------------------------------------------------------------------------ classification


@pytest.mark.parametrize("error, number", [
    (ConnectBindError(errno.EMFILE, "Too many open files"), errno.EMFILE),  # socket() failed
    (getConnectError((errno.ENFILE, "Too many open files in system")), errno.ENFILE),
    (getConnectError((errno.EADDRNOTAVAIL, "Cannot assign requested address")), errno.EADDRNOTAVAIL),
    (getConnectError((errno.ENOBUFS, "No buffer space available")), errno.ENOBUFS),
    (getConnectError((errno.ENOMEM, "Cannot allocate memory")), errno.ENOMEM),
    (OSError(errno.EMFILE, "Too many open files"), errno.EMFILE),
])
def test_local_errnos_are_the_gateway_s(error, number):
    found = local_error(error)
    assert isinstance(found, LocalError) and found.errno == number
    assert not isinstance(found, UpstreamError), "every except UpstreamError blames the node"


@pytest.mark.parametrize("error", [
    ConnectionRefusedError(errno.ECONNREFUSED, "refused"), TCPTimedOutError(errno.ETIMEDOUT, "timed out"),
    getConnectError((errno.EHOSTUNREACH, "No route to host")), DNSLookupError("no such host"),
    ConnectError(string="odd"), OSError(errno.ECONNRESET, "reset"), ValueError("bug"),
])
def test_the_node_s_failures_stay_the_node_s(error):
    assert local_error(error) is None


# ------------------------------------------------------------------------------ the clients


def test_the_fast_client_reports_a_socket_it_cannot_open_as_local():
    """The real endpoint path: Twisted reports a failed socket() as ConnectBindError."""
    reactor = MemoryReactorClock()
    client = FastForwardingClient(reactor)
    backend = BackendPool(["http://127.0.0.1:8545"]).backends[0]
    out_of_fds = client.post(backend, b"{}", (), 5.0)
    refused = client.post(backend, b"{}", (), 5.0)
    (*_, first, _, _), (*_, second, _, _) = reactor.tcpClients
    first.clientConnectionFailed(None, Failure(ConnectBindError(errno.EMFILE, "Too many open files")))
    second.clientConnectionFailed(None, Failure(ConnectionRefusedError(errno.ECONNREFUSED, "refused")))
    failure = error_of(out_of_fds)
    assert isinstance(failure, LocalError) and failure.errno == errno.EMFILE
    assert "EMFILE" in str(failure)
    failure = error_of(refused)
    assert isinstance(failure, UpstreamError) and failure.kind == "connect"
    assert not reactor.getDelayedCalls(), "the deadline is cancelled either way"


def test_the_checks_agent_reports_a_port_it_cannot_get_as_local():
    """treq over the checks' PooledAgent: the connect failure comes through the agent's pool."""
    reactor = MemoryReactorClock()
    client = CheckClient.over(PooledAgent(reactor).agent, reactor)
    backend = BackendPool(["http://127.0.0.1:8545"]).backends[0]
    call = defer.Deferred.fromCoroutine(client.fetch(backend, b"{}", 5.0))
    (*_, factory, _, _), = reactor.tcpClients
    factory.clientConnectionFailed(None, Failure(getConnectError((errno.EADDRNOTAVAIL, "no port"))))
    failure = error_of(call)
    assert isinstance(failure, LocalError) and failure.errno == errno.EADDRNOTAVAIL


def test_bounded_leaves_other_connect_failures_to_the_node():
    clock = task.Clock()
    call = defer.Deferred.fromCoroutine(bounded(defer.fail(ConnectionRefusedError()), 1.0, clock))
    assert isinstance(error_of(call), UpstreamError)
    call = defer.Deferred.fromCoroutine(bounded(defer.fail(ConnectBindError(errno.ENFILE, "x")), 1.0, clock))
    assert isinstance(error_of(call), LocalError)


# ------------------------------------------------------------------------------ the request path


class Nodes:
    def __init__(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1000.0)
        self.pool = trusted_pool(3, TRIGGER_HAPPY)
        self.client = MemoryClient(self.clock)
        self.metrics = Metrics(self.pool)
        self.failover = Failover(self.pool, self.client, self.metrics, self.clock)

    def forward(self, value: Any, **limits: Any) -> Any:
        bounds = Limits(**limits)
        inbound = Inbound("/", body_of(value), JSON, False, Caller("rid"))
        parsed = check(inbound, bounds, None)
        assert isinstance(parsed, jsonrpc.ParsedRequest)
        return settled(self.failover.forward(plan(inbound, parsed, bounds, self.clock.seconds() + bounds.timeout)))

    def local_errors(self, where: str = "upstream") -> float:
        return sample(self.metrics, "sentinel_proxy_local_errors_total", where=where)


def test_a_local_error_answers_503_and_charges_no_node(logged):
    nodes = Nodes()
    n0 = nodes.pool.backends[0]
    nodes.client.script(n0.name, defer.fail(LocalError(errno.EMFILE)))
    reply = nodes.forward(rpc("node_getBlockNumber"))
    assert reply.status == 503 and (b"retry-after", b"1") in reply.headers
    body = json.loads(reply.body)
    assert body["error"]["code"] == jsonrpc.OVERLOADED and "retry shortly" in body["error"]["message"]
    assert reply.backend is None, "/health must not count the reply against the node"
    assert [sent.node for sent in nodes.client.sent] == [n0.name], "another node would fail the same way"
    assert n0.breaker.state == "closed" and not n0.breaker.transitions
    assert nodes.local_errors() == 1.0
    for kind in ("connect", "local", "ok"):
        assert sample(nodes.metrics, "sentinel_proxy_upstream_attempts_total", backend=n0.label, result=kind) == 0
    (line,) = local_lines(logged)
    assert (line["where"], line["backend"], line["errno"], line["count"]) == ("upstream", n0.name, "EMFILE", 1)


def test_local_errors_are_logged_at_most_every_ten_seconds_and_all_counted(logged):
    nodes = Nodes()
    n0 = nodes.pool.backends[0]
    for _ in range(5):
        nodes.client.script(n0.name, defer.fail(LocalError(errno.EMFILE)))
        assert nodes.forward(rpc("node_getBlockNumber")).status == 503
        nodes.clock.advance(1.0)
    assert nodes.local_errors() == 5.0 and len(local_lines(logged)) == 1
    nodes.clock.advance(6.0)
    nodes.client.script(n0.name, defer.fail(LocalError(errno.ENOBUFS)))
    nodes.forward(rpc("node_getBlockNumber"))
    lines = local_lines(logged)
    assert len(lines) == 2 and (lines[1]["count"], lines[1]["errno"]) == (5, "ENOBUFS"), "the 4 unlogged + this one"
    assert n0.breaker.state == "closed"


def test_a_local_error_frees_a_half_open_probe_without_a_verdict():
    nodes = Nodes()
    n0 = nodes.pool.backends[0]
    n0.breaker.record(False, nodes.clock.seconds())
    nodes.clock.advance(5.0)
    assert n0.breaker.available(nodes.clock.seconds()) and n0.breaker.state == "half-open"
    nodes.client.script(n0.name, defer.fail(LocalError(errno.EMFILE)))
    assert nodes.forward(rpc("node_getBlockNumber")).status == 503
    assert n0.breaker.state == "half-open" and n0.breaker.available(nodes.clock.seconds())


def test_the_caller_gets_503_and_the_next_request_is_served():
    path = rig(3, breaker=TRIGGER_HAPPY)
    n0 = path.node(0)
    path.client.script(n0.name, defer.fail(LocalError(errno.EMFILE)), answer(result(7)))
    refused = settled(path.handle(rpc("node_getBlockNumber", id_=41)))
    assert refused.status == 503 and json.loads(refused.body)["error"]["code"] == jsonrpc.OVERLOADED
    assert n0.total_errors == 0 and n0.breaker.state == "closed"
    served = settled(path.handle(rpc("node_getBlockNumber")))
    assert served.status == 200 and json.loads(served.body)["result"] == 7


# ------------------------------------------------------------------------------ the checks


@implementer(ICheckClient)
class OutOfDescriptors:
    """A check client that cannot open a socket."""

    def __init__(self) -> None:
        self.calls = 0

    async def batch(self, backend: Any, calls: Any, timeout: float) -> Any:
        self.calls += 1
        raise LocalError(errno.EMFILE)

    async def fetch(self, backend: Any, body: bytes, timeout: float) -> Any:
        self.calls += 1
        raise LocalError(errno.EMFILE)


def test_a_health_check_that_fails_locally_leaves_every_node_as_it_was(logged):
    clock = task.Clock()
    clock.advance(100.0)
    pool = trusted_pool(2)
    up, down = pool.backends
    pool.record_health(down, False, now=50.0, error="HTTP 500")
    before = [(b.healthy, b.last_check, b.last_error, b.block_number) for b in pool.backends]
    metrics = Metrics(pool)
    client = OutOfDescriptors()
    service = HealthService(pool, client, 30.0, 5.0, clock, metrics)
    service.startService()
    assert client.calls == 2
    assert [(b.healthy, b.last_check, b.last_error, b.block_number) for b in pool.backends] == before
    assert sample(metrics, "sentinel_proxy_local_errors_total", where="check") == 2.0
    assert sample(metrics, "sentinel_proxy_check_failures_total", check="health", backend=up.label) == 0.0
    assert [line["where"] for line in local_lines(logged)] == ["check"]
    service.stopService()


def test_an_integrity_check_that_fails_locally_keeps_the_verdict():
    clock = task.Clock()
    pool = trusted_pool(1)
    verdict = pool.backends[0].verdict
    metrics = Metrics(pool)
    service = IntegrityService(pool, OutOfDescriptors(), 60.0, 30.0, clock,
                               IntegrityParams(slots_per_epoch=8, expected_validators=4), metrics=metrics)
    service.startService()
    assert pool.backends[0].verdict is verdict and isinstance(verdict, Verdict)
    assert sample(metrics, "sentinel_proxy_local_errors_total", where="check") == 1.0
    service.stopService()


# ------------------------------------------------------------------------------ end to end


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def closed_by_server(connection: socket.socket) -> bool:
    """Whether the server closed a connection it has just accepted (bounded wait: 0.3 s)."""
    connection.settimeout(0.3)
    try:
        return connection.recv(1) == b""
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def read_answer(connection: socket.socket) -> tuple[bytes, bytes]:
    """One answer with a Content-Length: (head, body); bounded by the socket's timeout."""
    connection.settimeout(10.0)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        chunk = connection.recv(65536)
        assert chunk, data
        body += chunk
    return head, body


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_a_daemon_out_of_descriptors_answers_503_and_blames_no_node(tmp_path):
    """A real gateway whose RLIMIT_NOFILE is lowered to a few above what it holds: callers'
    connections take the rest (until Twisted's accept closes one at once: the table is full), a
    request on the first then needs a socket to the node and gets 503 -32005. With the limit back,
    it serves again; the node stays healthy with its breaker closed, and the metric counts it."""
    from tests.processes import Daemon, fetch, free_port, poll

    node_port, port = free_port(), free_port()
    node = Daemon(["sentinel-simnode", "--listen", f"tcp:{node_port}:interface=127.0.0.1", "--slots-per-epoch", "8",
                   "--committee", "4"], tmp_path)
    gateway = None
    held: list[socket.socket] = []
    try:
        node.wait_for_line("listening|Site starting|starting on")
        gateway = Daemon(["sentinel-proxy", "--backends", f"http://127.0.0.1:{node_port}", "--listen",
                          f"tcp:{port}:interface=127.0.0.1", "--slots-per-epoch", "8", "--expected-validators", "4",
                          "--cache", "off", "--access-log", "off", "--health-check-interval-ms", "600000",
                          "--integrity-check-interval-ms", "600000", "--upstream-idle-timeout-ms", "100",
                          "--max-connections", "100000", "--max-connections-per-client", "100000"], tmp_path)
        gateway.wait_for_line("listening on")
        url = f"http://127.0.0.1:{port}"
        assert poll(lambda: json.loads(fetch(f"{url}/health")[1])["backends"][0]["healthy"], 30), \
            "".join(gateway.lines)
        pid = gateway.process.pid
        hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_descriptors(pid) + 4, hard))
        for _ in range(64):
            connection = socket.create_connection(("127.0.0.1", port), timeout=10)
            if closed_by_server(connection):
                connection.close()
                break
            held.append(connection)
        else:
            raise AssertionError(f"64 connections and the gateway still has descriptors ({open_descriptors(pid)})")
        assert held, "not even one connection was accepted"
        call = json.dumps(rpc("node_getBlockNumber", id_=7)).encode()
        held[0].sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(call), call))
        head, body = read_answer(held[0])
        assert head.startswith(b"HTTP/1.1 503") and b"\r\nretry-after: 1" in head.lower(), head + body
        assert json.loads(body)["error"]["code"] == jsonrpc.OVERLOADED
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
        for connection in held:
            connection.close()
        held.clear()
        assert poll(lambda: fetch(url, call)[0] == 200, 20), "the gateway did not serve again"
        backend = json.loads(fetch(f"{url}/health")[1])["backends"][0]
        assert backend["healthy"] is True and backend["breaker"]["state"] == "closed", backend
        metrics = fetch(f"{url}/metrics")[1].decode()
        assert 'sentinel_proxy_local_errors_total{where="upstream"} 1.0' in metrics
        assert any("local error (upstream)" in line and "EMFILE" in line for line in gateway.lines)
    finally:
        for connection in held:
            connection.close()
        if gateway is not None:
            gateway.stop()
        node.stop()
