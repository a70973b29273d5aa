"""The drain that cuts nothing (issue 12, item 1): from its start every answer says
``Connection: close``, idle connections close only after a short window, the listener takes what
the kernel queued before it closes, and, end to end under SIGTERM, callers on new connections and
on keep-alive see no request cut off.

In memory where it can be (real loopback sockets, a ``task.Clock`` for the server's time: the
``serve`` fixture of tests/lean_support.py); a real gateway for the delay; a real ``twistd``
daemon under load for the promise itself.
"""
from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from collections import Counter

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from sentinel_proxy.listening import refuse_handshakes
from sentinel_proxy.twisted_private import accept_queued
from sentinel_proxy.web.handoff import DRAIN_WINDOW
from tests.http_raw import answers
from tests.processes import Daemon, poll
from tests.support import rpc, wait_for
from tests.lean_support import by_site, failures, get, post, serve

ensure = pytest_twisted.ensureDeferred
#: Fixtures of tests/lean_support.py, used by name.
__all__ = ["failures", "serve"]
LISTENING = r"listening on IPv4Address\(type='TCP', host='127\.0\.0\.1', port=(\d+)\)"


def drain(served) -> None:
    served.factory.connections.drain(served.clock)


@ensure
async def test_from_the_drain_every_lean_answer_says_close(serve):
    served = await serve(clock=task.Clock())
    client = await served.client()
    client.send(post(b"before"))
    (before,) = await client.answer_count(1)
    assert b"connection" not in before.headers, "the answer bytes do not change until the drain"
    drain(served)
    client.send(post(b"after"))
    answered = answers(await client.wait_closed())
    assert [a.status for a in answered] == [200, 200]
    assert answered[1].headers[b"connection"] == b"close"


@ensure
async def test_an_idle_connection_is_closed_only_after_the_window(serve):
    served = await serve(clock=task.Clock())
    late, idle = await served.client(), await served.client()
    await wait_for(lambda: len(served.connections) == 2, what="both connections")
    drain(served)
    served.clock.advance(DRAIN_WINDOW - 0.1)
    assert not late.is_closed and not idle.is_closed
    late.send(post(b"sent before the caller could know"))
    (answer,) = answers(await late.wait_closed())
    assert answer.status == 200 and answer.headers[b"connection"] == b"close"
    assert not idle.is_closed
    served.clock.advance(0.1)
    assert await idle.wait_closed() == b"", "idle for the whole window: closed without a word"
    await served.factory.connections.settle(reactor, 1.0)
    assert not served.connections


@ensure
async def test_requests_in_flight_and_pipelined_are_all_answered_the_last_with_close(serve):
    served = await serve(clock=task.Clock())
    client = await served.client()
    client.send(post(b"hold-1") + post(b"hold-2"))
    await wait_for(lambda: len(served.path.held) == 2, what="both requests held")
    drain(served)
    served.path.held[1].callback(None)
    served.path.held[0].callback(None)
    first, second = answers(await client.wait_closed())
    assert (first.status, second.status) == (200, 200)
    assert b"connection" not in first.headers, "a request already read follows: the first keeps the connection"
    assert second.headers[b"connection"] == b"close"


@ensure
async def test_a_request_arriving_while_the_last_answer_goes_out_keeps_the_connection(serve):
    """A request whose first bytes are in when the last answer owed leaves: that answer keeps the
    connection, the request is served, and its answer closes it."""
    served = await serve(clock=task.Clock())
    client = await served.client()
    client.send(post(b"hold"))
    await wait_for(lambda: served.path.held, what="the held request")
    drain(served)
    request = post(b"next")
    client.send(request[:10])
    await wait_for(lambda: served.server_protocol()._in_message, what="the next request begun")
    served.path.held[0].callback(None)
    await client.answer_count(1)
    client.send(request[10:])
    first, second = answers(await client.wait_closed())
    assert b"connection" not in first.headers and second.headers[b"connection"] == b"close"
    assert [call.body for call in served.path.calls] == [b"hold", b"next"]


@ensure
async def test_handed_off_connections_say_close_and_idle_ones_close_after_the_window(serve):
    served = await serve(clock=task.Clock())
    asking, idle = await served.client(), await served.client()
    for client in (asking, idle):
        client.send(get(b"/health"))
        (answer,) = await client.answer_count(1)
        assert by_site(answer) and b"close" not in answer.headers.get(b"connection", b"")
    drain(served)
    asking.send(get(b"/health"))
    first, second = answers(await asking.wait_closed())
    assert by_site(second) and second.status == 200 and second.headers[b"connection"] == b"close"
    served.clock.advance(DRAIN_WINDOW - 0.1)
    assert not idle.is_closed
    served.clock.advance(0.1)
    assert len(answers(await idle.wait_closed())) == 1
    await served.factory.connections.settle(reactor, 1.0)
    assert not served.connections and not served.factory.site.connections.protocols


@ensure
async def test_a_connection_made_while_draining_is_served_once_and_closed(serve):
    served = await serve(clock=task.Clock())
    drain(served)
    client = await served.client()
    client.send(post(b"new"))
    (answer,) = answers(await client.wait_closed())
    assert answer.status == 200 and answer.headers[b"connection"] == b"close"
    silent = await served.client()
    await wait_for(lambda: len(served.connections) == 1, what="the silent connection")
    served.clock.advance(DRAIN_WINDOW)
    assert await silent.wait_closed() == b""


# --------------------------------------------------------------------------- the accept queue


def connect_blocking(port: int, timeout: float) -> socket.socket:
    """A plain connect: it completes in the kernel (the handshake) whether or not anyone accepts."""
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_until_closed(connection: socket.socket) -> bytes:
    data = b""
    while chunk := connection.recv(65536):
        data += chunk
    return data


@ensure
async def test_connections_queued_in_the_kernel_are_taken_before_the_listener_closes(serve):
    """Guards the private hook: ``tcp.Port.doRead`` and ``fileno`` still take what the kernel queued."""
    served = await serve()
    served.port.stopReading()  # as if the reactor had not come round to accepting yet
    port = served.port.getHost().port
    queued = [connect_blocking(port, 5.0) for _ in range(3)]
    for connection in queued:
        connection.sendall(post(b"queued", extra=b"Connection: close\r\n"))
    assert not served.connections
    accept_queued(served.port)
    assert len(served.connections) == 3, "every queued connection was accepted, at once"
    await served.port.stopListening()
    for connection in queued:
        (answer,) = answers(await deferred_in_thread(read_until_closed, connection))
        assert answer.status == 200
        connection.close()


@ensure
async def test_after_refuse_handshakes_no_new_connection_completes(serve):
    served = await serve()
    served.port.stopReading()
    port = served.port.getHost().port
    queued = connect_blocking(port, 5.0)
    refuse_handshakes(served.port)
    with pytest.raises(socket.timeout):
        connect_blocking(port, 0.3).close()  # its SYN is dropped: not accepted, not reset
    accept_queued(served.port)
    assert len(served.connections) == 1, "what was queued before is still taken"
    queued.sendall(post(b"x", extra=b"Connection: close\r\n"))
    (answer,) = answers(await deferred_in_thread(read_until_closed, queued))
    assert answer.status == 200
    queued.close()


def deferred_in_thread(function, *args) -> defer.Deferred:
    from twisted.internet import threads

    reading = threads.deferToThread(function, *args)
    reading.addTimeout(10.0, reactor)
    return reading


# -------------------------------------------------------------------------------- a gateway


@ensure
async def test_the_gateway_keeps_serving_for_the_drain_delay_then_stops(cluster):
    node = cluster.node("pruned")
    service, url = await cluster.gateway([node], drain_delay_ms="400")
    cluster.gateways.remove(service)  # stopped here
    began = reactor.seconds()
    stopping = service.stopService()
    assert service.draining, "draining from the very start of the stop (/ready reads it)"
    from tests.http_raw import connect

    client = await connect(service.listener.port.getHost().port)
    client.send(b"POST / HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(json.dumps(rpc("node_getBlockNumber"))), json.dumps(rpc("node_getBlockNumber")).encode()))
    (answer,) = answers(await client.wait_closed())
    assert answer.status == 200 and answer.headers[b"connection"] == b"close"
    assert "result" in answer.json()
    ready = await connect(service.listener.port.getHost().port)
    ready.send(b"GET /ready HTTP/1.1\r\nHost: g\r\n\r\n")
    (answer,) = answers(await ready.wait_closed())
    assert (answer.status, answer.body) == (503, b"NOT READY: draining: the gateway is shutting down")
    assert not stopping.called
    stopping.addTimeout(5.0, reactor)
    await stopping
    assert reactor.seconds() - began >= 0.4
    assert service.listener.port is None


# ------------------------------------------------------------------ under SIGTERM, for real

#: Callers of each kind, and the bounds of the run.
CALLERS = 8
WARM_UP = 5.0


class Callers:
    """Threads calling the gateway until it refuses connections: ``keep_alive`` ones on one
    http.client connection each (reopened after a ``Connection: close``), the others on a new
    connection per request. Every request sent is counted as answered (200 with a result) or cut
    (any other outcome once it was sent); a refused connect ends the thread."""

    def __init__(self, port: int, count: int, keep_alive: bool):
        self.port = port
        self.keep_alive = keep_alive
        self.outcomes: Counter[str] = Counter()
        self.cut: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]
        for thread in self._threads:
            thread.start()

    def _record(self, outcome: str) -> None:
        with self._lock:
            self.outcomes[outcome] += 1
            if outcome not in ("ok", "refused"):
                self.cut.append(outcome)

    def _run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        body = json.dumps([rpc("node_getBlockNumber")]).encode()
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            if not self.keep_alive:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
            try:
                connection.connect() if connection.sock is None else None
            except ConnectionRefusedError:
                self._record("refused")
                return
            try:
                connection.request("POST", "/", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                data = response.read()
                ok = response.status == 200 and "result" in json.loads(data)[0]
                self._record("ok" if ok else f"HTTP {response.status}: {data[:100]!r}")
            except Exception as exc:  # noqa: BLE001 - a reset, an EOF, a timeout: each is a cut request
                self._record(f"{type(exc).__name__}: {exc}")
                connection.close()
            if not self.keep_alive:
                connection.close()

    def answered(self) -> int:
        with self._lock:
            return self.outcomes["ok"]

    def join(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


@pytest.mark.slow
def test_sigterm_cuts_no_request_on_new_or_kept_alive_connections(tmp_path):
    node = Daemon(["sentinel-simnode", "--scenario", "slow", "--listen", "tcp:0:interface=127.0.0.1"],
                  tmp_path)
    node_port = int(node.wait_for_line(r"starting on (\d+)").group(1))
    gateway = Daemon(["sentinel-proxy", "--backends", f"http://127.0.0.1:{node_port}", "--listen",
                      "tcp:0:interface=127.0.0.1", "--expected-validators", "48", "--cache", "off",
                      "--access-log", "off", "--drain-delay-ms", "300", "--shutdown-grace-ms", "5000"], tmp_path)
    callers = []
    try:
        port = int(gateway.wait_for_line(LISTENING).group(1))
        ready = http_ready(port)
        assert poll(ready, timeout=30), "".join(gateway.lines)
        callers = [Callers(port, CALLERS, keep_alive=True), Callers(port, CALLERS, keep_alive=False)]
        assert poll(lambda: all(c.answered() >= 2 * CALLERS for c in callers), timeout=WARM_UP * 4), \
            [c.outcomes for c in callers]
        gateway.process.send_signal(signal.SIGTERM)
        code = gateway.process.wait(timeout=30)
    finally:
        for group in callers:
            group.join()
        code = gateway.stop()
        node.stop()
    log = "".join(gateway.lines)
    kept, fresh = callers
    print(f"\nkeep-alive callers: {dict(kept.outcomes)}; new-connection callers: {dict(fresh.outcomes)}")
    assert code == 0, log
    assert kept.cut == [] and fresh.cut == [], (kept.cut[:5], fresh.cut[:5])
    assert kept.outcomes["refused"] == fresh.outcomes["refused"] == CALLERS, "every caller ran until refused"
    assert "Traceback" not in log


def http_ready(port: int):
    def ready() -> bool:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/ready")
            return connection.getresponse().status == 200
        except OSError:
            return False

    return ready
