"""The fault matrix's moving parts: simulated nodes and a gateway as real ``twistd`` processes, a
bounded load of plain-socket callers that classifies every answer, and the table row of a fault.

Independent of Twisted on purpose: the callers must see exactly what a real client sees (resets,
refusals, ``Connection: close``), and ``bench/fault_matrix.py`` runs the same code without pytest.
Every process is started here and stopped by PID; every loop is bounded in count and time.
"""
from __future__ import annotations

import http.client
import json
import re
import resource
import select
import selectors
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tests.processes import Daemon

#: A small, slow chain: cheap integrity checks, and a tip that stays put during a run.
CHAIN_OPTIONS = ["--slots-per-epoch", "8", "--committee", "4", "--slot-seconds", "600", "--block-seconds", "600"]
#: The gateway reacts within a fraction of a second: short attempts, quick probes. A check once a
#: second leaves the request path (failover, breaker) to absorb a node fault before a check sees it.
GATEWAY_OPTIONS = {"slots-per-epoch": "8", "expected-validators": "4", "cache": "off",
                   "health-check-interval-ms": "1000", "health-check-timeout-ms": "500",
                   "integrity-check-interval-ms": "600000", "attempt-timeout-ms": "300",
                   "request-timeout-ms": "3000", "breaker-cooldown-ms": "500", "breaker-close-successes": "3",
                   "client-header-timeout-ms": "1000", "client-body-timeout-ms": "1000",
                   "drain-delay-ms": "300", "shutdown-grace-ms": "3000", "access-log": "off"}
LISTENING = r"listening on IPv4Address\(type='TCP', host='127\.0\.0\.1', port=(\d+)\)"
#: Source address of the attacking connections (slow drip, fd pressure): not the callers' one,
#: so a per-address cap can tell them apart. Linux answers all of 127/8 on loopback.
ATTACKER = "127.0.0.2"
#: What each method's result must look like: a reordered or mismatched answer fails this.
SHAPES: dict[str, Callable[[Any], bool]] = {
    "node_getBlockNumber": lambda r: isinstance(r, int),
    "node_getL2Tips": lambda r: isinstance(r, dict) and "proposed" in r,
    "node_getNodeInfo": lambda r: isinstance(r, dict) and "nodeVersion" in r,
}


def call(n: int) -> list[dict]:
    """Request ``n``: a one-item batch (the real client's shape) or, one in three, a three-item
    batch whose answers are told apart by shape, so a reordered batch shows up as a wrong answer."""
    if n % 3:
        return [{"jsonrpc": "2.0", "id": n, "method": "node_getBlockNumber", "params": []}]
    return [{"jsonrpc": "2.0", "id": f"{n}-{method}", "method": method, "params": []} for method in SHAPES]


def classify(status: int, body: bytes, sent: list[dict]) -> str:
    """One caller's verdict on one answer: ``ok``, ``wrong``, or the error it got."""
    try:
        items = json.loads(body)
    except ValueError:
        return f"HTTP {status}"
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list):
        return f"HTTP {status}"
    codes = sorted({item["error"].get("code") for item in items
                    if isinstance(item, dict) and isinstance(item.get("error"), dict)})
    if codes:
        return f"HTTP {status} rpc {','.join(map(str, codes))}" if status != 200 else f"rpc {codes[0]}"
    if status != 200:
        return f"HTTP {status}"
    if len(items) != len(sent):
        return "wrong"
    for asked, answer in zip(sent, items):
        if not isinstance(answer, dict) or answer.get("id") != asked["id"] \
                or not SHAPES[asked["method"]](answer.get("result")):
            return "wrong"
    return "ok"


#: Every way a connection ends without an answer is a cut request.
CUT = (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected, http.client.IncompleteRead,
       ConnectionAbortedError)


class Load:
    """``callers`` threads posting :func:`call` requests to the gateway, ``total`` at most and
    until ``seconds`` have passed, each at most ``rate`` a second (so that a load spans its fault
    on a fast machine too); even-numbered callers keep their connection alive, odd ones open one
    per request (or all of one kind, with ``keepalive``). A caller whose connection is refused
    stops: the gateway is gone."""

    def __init__(self, port: int, callers: int = 12, total: int = 600, seconds: float = 20.0,
                 keepalive: bool | None = None, timeout: float = 5.0, rate: float = 40.0):
        self.port = port
        self.total = total
        self.pace = 1.0 / rate
        self.timeout = timeout
        self.keepalive = keepalive
        self.deadline = time.monotonic() + seconds
        self.outcomes: list[tuple[float, str]] = []  # (when the request started, outcome)
        self._claimed = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(callers)]
        for thread in self._threads:
            thread.start()

    @property
    def done(self) -> int:
        return len(self.outcomes)

    def wait(self, count: int, timeout: float = 20.0) -> bool:
        """Block until ``count`` requests have completed (or the load ended); False on time out."""
        deadline = time.monotonic() + timeout
        while self.done < count and any(t.is_alive() for t in self._threads):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return self.done >= count

    def finish(self) -> Counter[str]:
        """Wait for the callers to end (count and time bounded), and count their outcomes."""
        for thread in self._threads:
            thread.join(timeout=max(0.1, self.deadline - time.monotonic() + self.timeout + 1))
        return self.tally()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout + 2)

    def tally(self, since: float = 0.0) -> Counter[str]:
        with self._lock:
            return Counter(outcome for started, outcome in self.outcomes if started >= since)

    def _claim(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or self._claimed >= self.total or time.monotonic() > self.deadline:
                return None
            self._claimed += 1
            return self._claimed

    def _work(self, index: int) -> None:
        keepalive = index % 2 == 0 if self.keepalive is None else self.keepalive
        connection: http.client.HTTPConnection | None = None
        turn = time.monotonic()
        while (n := self._claim()) is not None:
            if connection is None:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            started = time.monotonic()
            outcome, reusable = exchange(connection, call(n))
            with self._lock:
                self.outcomes.append((started, outcome))
            if not (keepalive and reusable):
                connection.close()
                connection = None
            if outcome == "refused":
                break
            turn += self.pace
            time.sleep(max(0.0, turn - time.monotonic()))
        if connection is not None:
            connection.close()


def exchange(connection: http.client.HTTPConnection, sent: list[dict]) -> tuple[str, bool]:
    """POST one request: its outcome, and whether the connection may carry the next one."""
    try:
        connection.request("POST", "/", json.dumps(sent).encode(), {"Content-Type": "application/json"})
        response = connection.getresponse()
        body = response.read()
    except ConnectionRefusedError:
        return "refused", False
    except (TimeoutError, socket.timeout):
        return "timeout", False
    except CUT:
        return "reset", False
    except http.client.HTTPException:
        return "not HTTP", False
    except OSError as error:
        return f"{error.__class__.__name__}", False
    return classify(response.status, body, sent), not response.will_close


# ------------------------------------------------------------------------------- processes


class SimNode:
    """One ``twistd sentinel-simnode`` process; restarted on the same port after it was killed."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = 0
        self.daemon: Daemon | None = None

    def start(self, scenario: str = "pruned", reorder: str | None = None) -> None:
        listen = f"tcp:{self.port}:interface=127.0.0.1"
        extra = ["--reorder-batches", reorder] if reorder else []
        self.daemon = Daemon(["sentinel-simnode", "--scenario", scenario, "--listen", listen, *CHAIN_OPTIONS,
                              *extra], self.directory)

    def started(self) -> None:
        assert self.daemon is not None
        self.port = int(self.daemon.wait_for_line(r"starting on (\d+)").group(1))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def signal(self, number: int) -> None:
        assert self.daemon is not None
        self.daemon.process.send_signal(number)

    def restart(self) -> None:
        self.stop()
        self.start()
        self.started()

    def stop(self) -> None:
        if self.daemon is not None:
            if self.daemon.process.poll() is None:
                self.daemon.process.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            self.daemon.stop()
            self.daemon = None


class Relay:
    """A TCP relay in front of a node, so the node's behaviour can change in an instant: ``switch``
    sends new connections to another process and closes those relayed so far (the gateway sees
    its kept-alive connections end, as when a node restarts). One thread, bounded waits."""

    def __init__(self, target: int):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.listener.getsockname()[1]
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._waker, self._wake = socket.socketpair()
        self._selector.register(self._waker, selectors.EVENT_READ)
        self._cut = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def switch(self, target: int) -> None:
        self.target = target
        self._cut = True
        self._wake.send(b"x")

    def stop(self) -> None:
        self._stop = True
        self._wake.send(b"x")
        self._thread.join(timeout=5)
        for sock in [*self._pairs, self.listener, self._waker, self._wake]:
            sock.close()

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self._selector.select(0.5):
                sock = key.fileobj
                if sock is self.listener:
                    self._accept()
                elif sock is self._waker:
                    self._waker.recv(64)
                    if self._cut:
                        self._cut = False
                        for side in list(self._pairs):
                            self._close(side)
                elif sock in self._pairs:
                    self._pump(sock)

    def _accept(self) -> None:
        client, _ = self.listener.accept()
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=1.0)
        except OSError:
            client.close()  # the node is gone: the caller sees its connection end
            return
        for one, other in ((client, upstream), (upstream, client)):
            one.settimeout(2.0)
            self._pairs[one] = other
            self._selector.register(one, selectors.EVENT_READ)

    def _pump(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
            if data:
                self._pairs[sock].sendall(data)
                return
        except OSError:
            pass
        self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        """Close both sides of a relayed connection (once: the other side may come next)."""
        if sock not in self._pairs:
            return
        other = self._pairs.pop(sock)
        del self._pairs[other]
        for side in (sock, other):
            self._selector.unregister(side)
            side.close()


class Fleet:
    """Three simulated nodes, started together; the second behind a :class:`Relay`, so that it
    can turn into a failing node at once."""

    def __init__(self, directory: Path, size: int = 3):
        self.directory = directory
        self.nodes = []
        for i in range(size):
            (directory / f"node{i}").mkdir(exist_ok=True)
            self.nodes.append(SimNode(directory / f"node{i}"))
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.started()
        self.relay = Relay(self.nodes[1].port)

    @property
    def urls(self) -> list[str]:
        """The gateway's backends."""
        return [self.relay.url if i == 1 else node.url for i, node in enumerate(self.nodes)]

    def spare(self, scenario: str, reorder: str | None) -> SimNode:
        """Another node process, to switch the relay to; the caller stops it."""
        directory = self.directory / f"spare-{scenario}-{reorder}"
        directory.mkdir(exist_ok=True)
        node = SimNode(directory)
        node.start(scenario, reorder)
        node.started()
        return node

    def stop(self) -> None:
        self.relay.stop()
        for node in self.nodes:
            node.stop()


class Gateway:
    """One ``twistd sentinel-proxy`` process in front of a fleet, with its own working directory
    (its ``.env`` is what a SIGHUP reloads)."""

    def __init__(self, directory: Path, fleet: Fleet, **options: str):
        self.directory = directory
        directory.mkdir(exist_ok=True)
        self.fleet = fleet
        merged = {**GATEWAY_OPTIONS, **options}
        args = ["sentinel-proxy", "--listen", "tcp:0:interface=127.0.0.1",
                "--backends", ",".join(fleet.urls)]
        for name, value in merged.items():
            args += [f"--{name}", value]
        self.daemon = Daemon(args, directory)
        self.port = int(self.daemon.wait_for_line(LISTENING).group(1))
        self.exit_code: int | None = None

    @property
    def pid(self) -> int:
        return self.daemon.process.pid

    @property
    def log(self) -> str:
        return "".join(self.daemon.lines)

    def get(self, path: str, timeout: float = 3.0) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def health(self) -> dict | None:
        try:
            status, body = self.get("/health")
            return json.loads(body) if status == 200 else None
        except (OSError, http.client.HTTPException, ValueError):
            return None

    def ready(self, timeout: float = 20.0) -> bool:
        """Wait until every node is healthy, typed and has a closed breaker. A breaker closes only
        on successful calls, so each poll sends one."""
        def fit() -> bool:
            self.serves(1)
            document = self.health()
            return document is not None and all(
                b["healthy"] and b["nodeType"] != "" and b["breaker"]["state"] == "closed"
                for b in document["backends"])
        return wait_until(fit, timeout)

    def counters(self, name: str, by: str = "backend", **labels: str) -> dict[str, float]:
        """The ``{name}_total`` samples of /metrics that carry ``labels``, summed by their ``by``
        label ("" when they have none)."""
        try:
            status, body = self.get("/metrics")
        except (OSError, http.client.HTTPException):
            return {}
        found: dict[str, float] = {}
        for match in re.finditer(rf'^{name}_total(?:\{{([^}}]*)\}})? (\S+)$', body.decode(), re.MULTILINE):
            have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                key = have.get(by, "")
                found[key] = found.get(key, 0.0) + float(match.group(2))
        return found

    def breaker_opens(self) -> dict[str, float]:
        """Breaker openings so far per node URL."""
        return self.counters("sentinel_proxy_breaker_transitions", state="open")

    def serves(self, count: int = 20) -> bool:
        """``count`` requests in a row, each answered correctly: the gateway kept serving."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5.0)
        try:
            return all(exchange(connection, call(n))[0] == "ok" for n in range(count))
        finally:
            connection.close()

    def limit_files(self, limit: int) -> None:
        """Lower the running daemon's RLIMIT_NOFILE (soft and hard), as a tight ``ulimit -n`` would."""
        resource.prlimit(self.pid, resource.RLIMIT_NOFILE, (limit, limit))

    def stop(self) -> int:
        if self.exit_code is None:
            self.exit_code = self.daemon.stop()
        return self.exit_code


def wait_until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class HealthWatch:
    """Samples /health every 200 ms on one kept-alive connection (opened before any attack, so it
    needs no new file descriptor) and counts samples in which a node that should be healthy is not."""

    def __init__(self, gateway: Gateway, watched: list[str]):
        self.watched = set(watched)
        self.samples = 0
        self.marked_down = 0
        self._stop = threading.Event()
        self._connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=2.0)
        self._connection.connect()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self._connection.request("GET", "/health")
                document = json.loads(self._connection.getresponse().read())
            except (OSError, http.client.HTTPException, ValueError):
                continue
            self.samples += 1
            if any(not b["healthy"] for b in document["backends"] if b["url"] in self.watched):
                self.marked_down += 1

    def stop(self) -> Sightings:
        self._stop.set()
        self._thread.join(timeout=5)
        self._connection.close()
        return Sightings(self.marked_down, self.samples)


@dataclass(frozen=True)
class Sightings:
    """/health samples in which a node that should be healthy was marked down, of all samples."""

    down: int
    samples: int

    def __str__(self) -> str:
        return f"{self.down} of {self.samples}"


# --------------------------------------------------------------------------- attackers


class Drip:
    """``count`` connections from :data:`ATTACKER`, each sending a request's headers one byte every
    ``interval`` seconds, never finishing them; notes when the gateway closes each one."""

    HEAD = b"POST / HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n" + b"X-Drip: " + b"a" * 4096

    def __init__(self, port: int, count: int, interval: float = 0.2):
        self.interval = interval
        self.opened = time.monotonic()
        self.sockets: list[socket.socket] = []
        self.closed_after: dict[int, float] = {}
        for _ in range(count):
            sock = socket.socket()
            sock.bind((ATTACKER, 0))
            sock.settimeout(2.0)
            sock.connect(("127.0.0.1", port))
            sock.setblocking(False)
            self.sockets.append(sock)

    def run(self, seconds: float) -> None:
        """Drip for ``seconds`` (bounded), then close whatever is still open."""
        deadline = time.monotonic() + seconds
        position = 0
        while time.monotonic() < deadline and len(self.closed_after) < len(self.sockets):
            for i, sock in enumerate(self.sockets):
                if i in self.closed_after:
                    continue
                try:
                    readable, _, _ = select.select([sock], [], [], 0)
                    if readable and sock.recv(65536) == b"":
                        raise ConnectionResetError
                    sock.send(self.HEAD[position % len(self.HEAD):][:1])
                except OSError:
                    self.closed_after[i] = time.monotonic() - self.opened
            position += 1
            time.sleep(self.interval)
        for sock in self.sockets:
            sock.close()


class Idle:
    """Up to ``count`` connections from :data:`ATTACKER` that never send a byte; counts how many
    the gateway accepted and kept."""

    def __init__(self, port: int, count: int):
        self.sockets: list[socket.socket] = []
        self.failed = 0
        for _ in range(count):
            sock = socket.socket()
            try:
                sock.bind((ATTACKER, 0))
                sock.settimeout(0.5)
                sock.connect(("127.0.0.1", port))
            except OSError:
                sock.close()
                self.failed += 1
                continue
            self.sockets.append(sock)

    def still_open(self) -> int:
        """Connections the gateway has not closed (a closed one reads as end of file)."""
        open_ = 0
        for sock in self.sockets:
            try:
                readable, _, _ = select.select([sock], [], [], 0)
                if not readable:
                    open_ += 1
                else:
                    sock.setblocking(False)
                    open_ += sock.recv(1, socket.MSG_PEEK) != b""
            except OSError:
                pass
        return open_

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


# ------------------------------------------------------------------------------ the table


ERRORS_SHOWN = 3


@dataclass
class Row:
    """What the callers saw under one fault, and whether the fault's promise held."""

    fault: str
    outcomes: Counter[str]
    #: The gateway answered correctly after the fault ("exit 0" for a signal that stops it).
    after: str
    #: Breaker openings of nodes that were not at fault (None: not applicable).
    healthy_opens: float | None = None
    #: /health samples in which a node that was not at fault was marked down (None: not applicable).
    health: Sightings | None = None
    notes: list[str] = field(default_factory=list)
    #: Promises that did not hold (empty: all held).
    broken: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    def count(self, *names: str) -> int:
        return sum(self.outcomes[n] for n in names)

    def errors(self) -> str:
        plain = {"ok", "wrong", "reset", "refused", "timeout"}
        others = sorted(((n, k) for k, n in self.outcomes.items() if k not in plain), reverse=True)
        return ", ".join(f"{k} ×{n}" for n, k in others) or "0"

    def cells(self) -> list[str]:
        opens = "–" if self.healthy_opens is None else f"{self.healthy_opens:g}"
        health = "–" if self.health is None else str(self.health)
        return [self.fault, str(self.requests), str(self.outcomes["ok"]), self.errors(),
                str(self.outcomes["reset"]), str(self.outcomes["refused"]), str(self.outcomes["timeout"]),
                str(self.outcomes["wrong"]), self.after, opens, health,
                "held" if not self.broken else "**not held**: " + "; ".join(self.broken),
                "; ".join(self.notes)]


HEADER = ["fault", "requests", "ok", "errors (HTTP / JSON-RPC)", "reset", "refused", "timeout", "wrong answers",
          "after", "breaker opens, healthy nodes", "/health samples with a healthy node down", "promise", "notes"]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row.cells()) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the faults

#: The load under each fault: small enough for two busy cores, long enough to span the fault.
LOAD_TOTAL = 1200
LOAD_SECONDS = 6.0
#: Fraction of the load after which the fault is injected.
INJECT_AT = 0.25


class Rig:
    """The processes of a matrix run: one fleet, one shared gateway (restarted if a fault killed
    it), and fresh gateways for the faults that damage theirs. Stops everything by PID."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.fleet = Fleet(directory)
        self._shared: Gateway | None = None
        self._fresh = 0

    def shared(self) -> Gateway:
        """The shared gateway, every node healthy again (restarted if it died)."""
        if self._shared is None or self._shared.daemon.process.poll() is not None:
            self._shared = self.fresh()
        assert self._shared.ready(), self._shared.log
        return self._shared

    def fresh(self, **options: str) -> Gateway:
        """A new gateway in front of the fleet, every node healthy; the caller stops it."""
        self._fresh += 1
        gateway = Gateway(self.directory / f"gateway{self._fresh}", self.fleet, **options)
        if not gateway.ready():
            gateway.stop()
            raise AssertionError(f"the gateway never saw its nodes healthy:\n{gateway.log}")
        return gateway

    def close(self) -> None:
        if self._shared is not None:
            self._shared.stop()
        self.fleet.stop()


def under_load(gateway: Gateway, inject: Callable[[], None], watched: list[str]) -> tuple[
        Counter[str], float, Sightings]:
    """Run the load, inject the fault a quarter of the way in, and return the outcomes, the breaker
    openings of the ``watched`` nodes and the /health samples in which one of them was down."""
    before = gateway.breaker_opens()
    watch = HealthWatch(gateway, watched)
    callers = Load(gateway.port, total=LOAD_TOTAL, seconds=LOAD_SECONDS)
    try:
        callers.wait(int(LOAD_TOTAL * INJECT_AT))
        inject()
        outcomes = callers.finish()
    finally:
        callers.stop()
        sightings = watch.stop()
    opened = gateway.breaker_opens()
    return outcomes, sum(opened.get(url, 0.0) - before.get(url, 0.0) for url in watched), sightings


def zero_promises(row: Row) -> Row:
    """The promise of every fault the gateway must absorb: every caller answered, and correctly."""
    failed = row.requests - row.outcomes["ok"]
    if failed:
        row.broken.append(f"{failed} callers did not get their answer")
    return nobody_blamed(row)


def nobody_blamed(row: Row) -> Row:
    """No node that was not at fault is blamed (seen by /health at all), and the gateway serves."""
    if row.healthy_opens:
        row.broken.append(f"{row.healthy_opens:g} breaker openings of healthy nodes")
    if row.health is not None and (row.health.down or not row.health.samples):
        row.broken.append(f"healthy nodes marked down in {row.health} /health samples")
    if row.after != "serving":
        row.broken.append("not serving after the fault")
    return row


def signalled(name: str, number: int, resume: Callable[[SimNode], None], note: str) -> Callable[[Rig], Row]:
    """The third node's process gets a signal (SIGKILL, SIGSTOP), and is resumed afterwards."""
    def run(rig: Rig) -> Row:
        node = rig.fleet.nodes[2]
        return node_fault(rig, name, node.url, lambda: node.signal(number), lambda: resume(node), note)
    return run


def switched(name: str, scenario: str, reorder: str | None = None) -> Callable[[Rig], Row]:
    """The second node turns into a process that answers with a simulator failure scenario (or
    reorders batch answers) at once, through its relay, and back afterwards."""
    def run(rig: Rig) -> Row:
        relay = rig.fleet.relay
        spare = rig.fleet.spare(scenario, reorder)
        try:
            return node_fault(rig, name, relay.url, lambda: relay.switch(spare.port),
                              lambda: relay.switch(rig.fleet.nodes[1].port),
                              f"simnode --scenario {scenario}" + (f" --reorder-batches {reorder}" if reorder else ""),
                              must_fail=reorder is None)
        finally:
            spare.stop()
    return run


def node_fault(rig: Rig, name: str, url: str, inject: Callable[[], None], restore: Callable[[], None], note: str,
               must_fail: bool = True) -> Row:
    """One node in three fails under load: no caller may notice, no other node may be blamed.
    The node's failed attempts (its answered ones, for a fault that is no failure) prove that the
    fault met the load."""
    gateway = rig.shared()
    others = [other for other in rig.fleet.urls if other != url]
    before = attempts(gateway, url)
    try:
        outcomes, opens, down = under_load(gateway, inject, others)
    finally:
        met = attempts(gateway, url) - before
        restore()
    after = "serving" if gateway.ready(timeout=15) and gateway.serves() else "not serving"
    seen = ", ".join(f"{result} {n:g}" for result, n in sorted(met.items()))
    row = zero_promises(Row(name, outcomes, after, opens, down, [note, f"its attempts: {seen or 'none'}"]))
    wanted = sum(n for result, n in met.items() if result != "ok") if must_fail else met["ok"]
    if not wanted:
        row.broken.append("the fault never met the load")
    return row


def attempts(gateway: Gateway, url: str) -> Counter[str]:
    """Attempts on one node so far, by result."""
    return Counter(gateway.counters("sentinel_proxy_upstream_attempts", by="result", backend=url))


def redis_killed(rig: Rig, redis: Any) -> Row:
    """The shared cache dies under load: answers come from the nodes, no caller notices."""
    gateway = rig.fresh(cache=redis.url)
    try:
        outcomes, opens, down = under_load(gateway, redis.kill, rig.fleet.urls)
        after = "serving" if gateway.serves() else "not serving"
        calls = gateway.counters("sentinel_proxy_cache_calls", by="result")
    finally:
        gateway.stop()
    seen = ", ".join(f"{result} {n:g}" for result, n in sorted(calls.items()))
    return zero_promises(Row("Redis killed (SIGKILL)", outcomes, after, opens, down,
                             [f"CACHE=redis; cacheable calls: {seen or 'none'}"]))


RELOADS = 3


def sighup(rig: Rig) -> Row:
    """Three reloads under load, each changing a reloadable setting: nothing is dropped."""
    gateway = rig.shared()
    nodes = rig.fleet.urls
    seen = gateway.log.count("reload: ")

    def reload() -> None:
        for i in range(RELOADS):
            (gateway.directory / ".env").write_text(f"MAX_IN_FLIGHT={1000 + i}\n")
            gateway.daemon.process.send_signal(signal.SIGHUP)
            wait_until(lambda: gateway.log.count("reload: ") > seen + i, timeout=5)

    outcomes, opens, down = under_load(gateway, reload, nodes)
    reloads = gateway.log.count("reload: ") - seen
    row = zero_promises(Row("SIGHUP (reload) ×3", outcomes, "serving" if gateway.serves() else "not serving",
                            opens, down, [f"{reloads} reloads logged"]))
    if reloads < RELOADS:
        row.broken.append(f"only {reloads} of {RELOADS} reloads happened")
    return row


def sigterm(keepalive: bool) -> Callable[[Rig], Row]:
    """SIGTERM under load: every request is answered or its connection refused, none cut, exit 0."""
    kind = "keep-alive clients" if keepalive else "a new connection per request"

    def run(rig: Rig) -> Row:
        gateway = rig.fresh()
        try:
            callers = Load(gateway.port, total=20 * LOAD_TOTAL, seconds=LOAD_SECONDS, keepalive=keepalive)
            try:
                callers.wait(int(LOAD_TOTAL * INJECT_AT))
                signalled = time.monotonic()
                gateway.daemon.process.send_signal(signal.SIGTERM)
                try:
                    gateway.daemon.process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass  # stop() below ends it; the exit status tells
                outcomes = callers.finish()
            finally:
                callers.stop()
        finally:
            code = gateway.stop()
        served_after = callers.tally(since=signalled)["ok"]
        row = Row(f"SIGTERM, {kind}", outcomes, f"exit {code}", notes=[f"{served_after} answered after the signal"])
        cut = row.requests - row.count("ok", "refused")
        if cut:
            row.broken.append(f"{cut} requests cut")
        if code != 0:
            row.broken.append(f"exit status {code}")
        return row
    return run


DRIPS = 40
DRIP_SECONDS = 4.0


def slow_drip(rig: Rig) -> Row:
    """Clients drip request headers a byte at a time beside the normal load: the header deadline
    (CLIENT_HEADER_TIMEOUT_MS=1000) closes every one of them, and the normal callers see nothing."""
    gateway = rig.shared()
    nodes = rig.fleet.urls
    drips: list[Drip] = []

    def attack() -> None:
        drips.append(Drip(gateway.port, DRIPS))
        drips[0].run(DRIP_SECONDS)

    outcomes, opens, down = under_load(gateway, attack, nodes)
    closed = sorted(drips[0].closed_after.values()) if drips else []
    row = zero_promises(Row(f"slow-drip clients ×{DRIPS}", outcomes,
                            "serving" if gateway.serves() else "not serving", opens, down,
                            [f"{len(closed)}/{DRIPS} dripping connections closed"
                             + (f", the last after {closed[-1]:.1f} s" if closed else "")]))
    deadline = float(GATEWAY_OPTIONS["client-header-timeout-ms"]) / 1000 + 2.0
    late = DRIPS - sum(after <= deadline for after in closed)
    if late:
        row.broken.append(f"{late} dripping connections still open {deadline:g} s in")
    return row


#: Files the fd-pressure gateway may open beyond those it holds when the attack starts, and the
#: idle connections the attacker opens (more than that).
FD_HEADROOM = 120
IDLE_CONNECTIONS = 180
#: MAX_CONNECTIONS_PER_CLIENT of the capped case: below the headroom, so the files never run out.
FD_CAP = 60
IDLE_SECONDS = 2.0


def fd_pressure(cap: int | None) -> Callable[[Rig], Row]:
    """Idle connections from one address press on a gateway whose RLIMIT_NOFILE is lowered to what
    it holds + FD_HEADROOM. With MAX_CONNECTIONS_PER_CLIENT below the headroom (``cap``), the
    attacker is held to it and the callers see nothing. Without, the files run out: that shortage
    is the gateway's own, so no node is marked down or has its breaker opened, and the gateway
    serves at once when the connections go."""
    def run(rig: Rig) -> Row:
        # Idle connections to the nodes are dropped at once, so each health check needs new files.
        gateway = rig.fresh(**({"upstream-idle-timeout-ms": "100"} if cap is None
                               else {"max-connections-per-client": str(cap)}))
        nodes = rig.fleet.urls
        idle: list[Idle] = []
        kept = 0

        def attack() -> None:
            nonlocal kept
            held = len(list(Path(f"/proc/{gateway.pid}/fd").iterdir()))
            gateway.limit_files(held + FD_HEADROOM)
            idle.append(Idle(gateway.port, IDLE_CONNECTIONS))
            time.sleep(IDLE_SECONDS)  # how long the attack lasts: what happens meanwhile is measured
            kept = idle[0].still_open()
            idle[0].close()

        local = gateway.counters("sentinel_proxy_local_errors", by="where")
        try:
            outcomes, opens, down = under_load(gateway, attack, nodes)
            after = "serving" if gateway.serves() else "not serving"
            local = Counter(gateway.counters("sentinel_proxy_local_errors", by="where")) - Counter(local)
        finally:
            for attacker in idle:
                attacker.close()
            gateway.stop()
        refused = idle[0].failed if idle else IDLE_CONNECTIONS
        if cap is None:
            row = nobody_blamed(Row(f"fd exhaustion: {IDLE_CONNECTIONS} idle connections, "
                                    f"RLIMIT_NOFILE +{FD_HEADROOM}", outcomes, after, opens, down))
        else:
            row = zero_promises(Row(f"fd pressure: {IDLE_CONNECTIONS} idle connections, "
                                    f"MAX_CONNECTIONS_PER_CLIENT={cap}", outcomes, after, opens, down))
            if kept > cap:
                row.broken.append(f"the attacker kept {kept} connections, more than {cap}")
        row.notes.append(f"attacker: {kept} connections kept open, {refused} not connected")
        row.notes.append("local errors counted: " + (", ".join(f"{where} {n:g}" for where, n in sorted(local.items()))
                                                     or "none"))
        return row
    return run


#: Every fault of the matrix, in the order it runs: the shared gateway's first, then those that
#: need a gateway of their own. ``redis-killed`` also takes the redis server to kill.
FAULTS: dict[str, Callable[..., Row]] = {
    "node-killed": signalled("node killed (SIGKILL)", signal.SIGKILL, lambda n: n.restart(),
                             "restarted on its port afterwards"),
    "node-hung": signalled("node hung (SIGSTOP)", signal.SIGSTOP, lambda n: n.signal(signal.SIGCONT),
                           "SIGCONT afterwards"),
    "node-500": switched("node answers 500", "failing-500"),
    "node-reset": switched("node resets connections", "failing-reset"),
    "node-garbage": switched("node answers garbage", "failing-garbage"),
    "node-reorders": switched("node reorders batch answers", "pruned", reorder="reverse"),
    "sighup": sighup,
    "slow-drip": slow_drip,
    "redis-killed": redis_killed,
    "fd-pressure": fd_pressure(cap=FD_CAP),
    "fd-exhaustion": fd_pressure(cap=None),
    "sigterm-new-connections": sigterm(keepalive=False),
    "sigterm-keepalive": sigterm(keepalive=True),
}
