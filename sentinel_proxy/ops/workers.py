"""``--workers N``: N processes serving one TCP port, one of them running the checks.

Twisted is single-threaded, so one process uses one core (docs/performance.md); ``--workers auto``
(the production recommendation) is one process per core this process may run on
(:func:`sentinel_proxy.settings.core_count`, resolved when the settings are parsed, so the leader and
its followers agree on N). Every worker
binds the same port with SO_REUSEPORT and the kernel spreads connections over them. The first
process (the leader, started by twistd) runs the health and integrity checks and every
``PUBLISH_INTERVAL`` writes the node state the checks decided to each follower's standard input;
followers run no checks of their own, so the nodes see one gateway's checks, not N. A follower
whose standard input closes (the leader is gone) stops; the leader stops its followers (SIGTERM,
so they drain) when it stops.

What an operator or the traffic decides in one worker reaches the others the same way: a follower
writes its admin drains and its breaker openings, one JSON object a line, on file descriptor
:data:`UPLINK_FD`; the leader applies them and publishes them to every follower at once (within a
second, tests/test_workers_shared.py). Metrics are one set for the gateway through
prometheus_client's multiprocess files (ops/shared_metrics.py), in a directory the leader makes,
hands to its followers in :data:`METRICS_ENV`, and removes when it stops. Cache entries are
shared only through Redis (``CACHE=redis://…``); a memory rate limit is refused with more than one
worker (config.py), since each worker would allow the whole rate. With SHARED_STATE the leader's
node state is the fleet's (sentinel_proxy/fleet/), and its publications carry the fleet view too.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
import os
import pickle
import shutil
import sys
import tempfile
from base64 import b64decode, b64encode
from typing import Any, Callable

from prometheus_client.multiprocess import mark_process_dead
from twisted.application.service import Service
from twisted.internet import defer, protocol, stdio, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver

from sentinel_proxy.core.scoring import OPEN, CircuitBreaker
from sentinel_proxy.ops.metrics import Metrics
from sentinel_proxy.ops.shared_metrics import SYNC_INTERVAL
from sentinel_proxy.state.backends import Backend, BackendPool
from sentinel_proxy.ops.logs import observer

log = Logger(observer=observer)

#: Set in a follower's environment: its worker number (1..N-1); absent in the leader.
WORKER_ENV = "SENTINEL_WORKER"
PUBLISH_INTERVAL = 0.5
#: Set by the leader in its followers' environment: the gateway's metrics directory.
METRICS_ENV = "SENTINEL_METRICS_DIR"
#: A follower's channel to the leader: its drains and breaker openings, one JSON object a line.
UPLINK_FD = 3
#: The longest message line the leader reads from a follower; a longer one is not ours.
MAX_MESSAGE = 64 * 1024


def worker_number() -> int:
    return int(os.environ.get(WORKER_ENV, "0") or 0)


def tcp_address(listen: str) -> tuple[str, int]:
    """(interface, port) of a ``tcp:PORT[:interface=ADDR]`` endpoint string."""
    parts = listen.split(":")
    if parts[0] != "tcp" or len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"{listen!r}: --workers needs a tcp:PORT endpoint")
    interface = ""
    for option in parts[2:]:
        key, _, value = option.partition("=")
        if key == "interface":
            interface = value
    return interface, int(parts[1])


def follower_command() -> list[str]:
    """This process's gateway options, run in the foreground by ``sentinel-proxy run``: twistd's
    own options are not all safe to repeat (a pid file, daemonising), the gateway's are. Under
    ``twistd`` and under ``sentinel-proxy run`` alike the gateway's options follow the plugin name."""
    argv = sys.argv
    plugin_args = argv[argv.index("sentinel-proxy") + 1:] if "sentinel-proxy" in argv else []
    return [sys.executable, "-m", "sentinel_proxy.cli", "run", *plugin_args]


def trip(breaker: CircuitBreaker, now: float) -> None:
    """Open ``breaker`` because another worker's opened: fed failures, as that worker's was, until it
    opens (at most its consecutive-failure count). Only openings travel: each worker then probes and
    closes its own breaker on its own traffic."""
    while breaker.state != OPEN:
        breaker.record(False, now)


class _Link(ABC):
    """What the leader and the followers share beyond the checks' node state: drains and openings."""

    def __init__(self, pool: BackendPool, clock: IReactorTime):
        self._pool = pool
        self._clock = clock
        #: True while an opening from another worker is applied here: it must not travel back.
        self._applying = False

    def _find(self, url: object) -> Backend | None:
        return next((b for b in self._pool.backends if b.url == url), None)

    def _open(self, backend: Backend) -> None:
        self._applying = True
        try:
            trip(backend.breaker, self._clock.seconds())
        finally:
            self._applying = False

    def breaker_changed(self, backend: Backend, state: str) -> None:
        """Every breaker transition of this worker (BackendPool.on_breaker_change)."""
        if state == OPEN and not self._applying:
            self._opened_here(backend)

    @abstractmethod
    def _opened_here(self, backend: Backend) -> None: ...

    @abstractmethod
    def drained(self, backend: Backend) -> None:
        """An operator drained or undrained ``backend`` in this worker (ops/admin.py)."""


class LeaderLink(_Link):
    """The leader's side: it applies what followers report and says what every publication carries.

    Drains are state: each publication carries the leader's drained nodes and, per follower, the
    last of its drain messages applied (``acks``), so that a follower keeps its own newer drain until
    the leader has it instead of flapping back. Openings are events, each published once.
    """

    def __init__(self, pool: BackendPool, clock: IReactorTime, changed: Callable[[], None]):
        super().__init__(pool, clock)
        self._changed = changed
        self._acks: dict[int, int] = {}
        #: (URL, the worker whose breaker opened) since the last publication.
        self._opened: list[tuple[str, int]] = []

    def state(self) -> dict[str, Any]:
        """The next publication (it takes the openings it carries)."""
        opened, self._opened = self._opened, []
        return {"pool": self._pool.snapshot(), "drained": [b.url for b in self._pool.backends if b.drained],
                "acks": dict(self._acks), "opened": opened, "fleet": self._pool.fleet}

    def received(self, number: int, line: bytes) -> None:
        """One message line from follower ``number``."""
        try:
            message = json.loads(line)
            kind, url = message["kind"], message["url"]
        except (ValueError, TypeError, KeyError):
            log.warn("worker {number} sent a message that is not ours: {line!r}", number=number, line=line[:200])
            return
        backend = self._find(url)
        if kind == "drain" and isinstance(message.get("seq"), int) and isinstance(message.get("drained"), bool):
            if backend is not None and backend.drained != message["drained"]:
                self._pool.drain(backend, message["drained"])
            self._acks[number] = max(self._acks.get(number, 0), message["seq"])
        elif kind == "opened":
            if backend is None:
                return
            self._open(backend)
            self._opened.append((backend.url, number))
        else:
            log.warn("worker {number} sent a message that is not ours: {line!r}", number=number, line=line[:200])
            return
        self._changed()

    def _opened_here(self, backend: Backend) -> None:
        self._opened.append((backend.url, 0))
        self._changed()

    def drained(self, backend: Backend) -> None:
        self._changed()


class FollowerLink(_Link):
    """A follower's side: it applies the leader's publications and reports its own drains and openings."""

    def __init__(self, pool: BackendPool, number: int, clock: IReactorTime, send: Callable[[bytes], None]):
        super().__init__(pool, clock)
        self._number = number
        self._send = send
        #: Number of the last drain message sent: the leader's drained nodes are taken once it has it.
        self._sent = 0

    def apply(self, state: dict[str, Any]) -> None:
        snapshot = state["pool"]
        entries = snapshot["entries"]
        if [url for _, url in entries] != [b.url for b in self._pool.backends]:
            self._pool.replace(entries)
        self._pool.apply(snapshot)
        self._pool.fleet = state.get("fleet")
        if state["acks"].get(self._number, 0) >= self._sent:
            drained = set(state["drained"])
            for backend in self._pool.backends:
                if backend.drained != (backend.url in drained):
                    self._pool.drain(backend, backend.url in drained)
        for url, origin in state["opened"]:
            backend = self._find(url)
            if backend is not None and origin != self._number:
                self._open(backend)

    def _message(self, **fields: object) -> None:
        self._send(json.dumps(fields).encode() + b"\n")

    def _opened_here(self, backend: Backend) -> None:
        self._message(kind="opened", url=backend.url)

    def drained(self, backend: Backend) -> None:
        self._sent += 1
        self._message(kind="drain", url=backend.url, drained=backend.drained, seq=self._sent)


class Follower(protocol.ProcessProtocol):
    """The leader's end of one follower: its exit, and its message lines on :data:`UPLINK_FD`."""

    def __init__(self, number: int, link: LeaderLink):
        self.number = number
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._link = link
        self._partial = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != UPLINK_FD:
            return
        *lines, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > MAX_MESSAGE:
            log.warn("worker {number} sent a line of over {limit} bytes: dropped", number=self.number,
                     limit=MAX_MESSAGE)
            self._partial = b""
        for line in lines:
            self._link.received(self.number, line)

    def processEnded(self, reason: Any) -> None:
        log.info("worker {number} ended ({reason})", number=self.number, reason=reason.getErrorMessage())
        self.ended.callback(None)


class LeaderService(Service):
    """Starts the followers, hands them the node state, shares the metrics directory with them, and
    stops them with the leader."""

    def __init__(self, count: int, pool: BackendPool, metrics: Metrics, reactor: Any, grace: float):
        """``grace``: how long a follower may take to drain (DRAIN_DELAY_MS + SHUTDOWN_GRACE_MS)."""
        self._count = count
        self._metrics = metrics
        self._reactor = reactor
        self._grace = grace
        self.link = LeaderLink(pool, reactor, self._publish_soon)
        self.followers: list[Follower] = []
        #: The gateway's metrics directory while the leader runs.
        self.directory: str | None = None
        self._soon: IDelayedCall | None = None
        self._terminated = False
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = reactor

    def startService(self) -> None:
        super().startService()
        self.directory = tempfile.mkdtemp(prefix="sentinel-proxy-metrics-")
        self._metrics.share(self.directory, os.getpid())
        command = follower_command()
        for number in range(1, self._count):
            follower = Follower(number, self.link)
            env = {**os.environ, WORKER_ENV: str(number), METRICS_ENV: self.directory}
            process = self._reactor.spawnProcess(follower, command[0], command, env=env,
                                                 childFDs={0: "w", 1: 1, 2: 2, UPLINK_FD: "r"})
            follower.ended.addCallback(self._dead, process.pid)
            self.followers.append(follower)
        log.info("started {count} more workers on the same port (metrics in {directory})", count=self._count - 1,
                 directory=self.directory)
        self._loop.start(PUBLISH_INTERVAL, now=True)

    def _tick(self) -> None:
        self._metrics.sync()
        self.publish()

    def _publish_soon(self) -> None:
        """A drain or an opening: publish now rather than at the next tick (once for a burst)."""
        if self.running and (self._soon is None or not self._soon.active()):
            self._soon = self._reactor.callLater(0, self.publish)

    def _dead(self, _: None, pid: int) -> None:
        """A worker's gauges (its requests in flight) leave the sums with it; its counts stay."""
        if self.directory is not None:
            mark_process_dead(pid, self.directory)

    def publish(self) -> None:
        line = b64encode(pickle.dumps(self.link.state())) + b"\n"
        for follower in self.followers:
            if not follower.ended.called and follower.transport is not None:
                follower.transport.writeToChild(0, line)

    def terminate_followers(self) -> None:
        """SIGTERM every follower still running, once: called as the leader's own drain begins, so
        all workers drain side by side instead of the followers after the leader."""
        if self._terminated:
            return
        self._terminated = True
        for follower in self.followers:
            if not follower.ended.called and follower.transport is not None:
                follower.transport.signalProcess("TERM")  # they drain their own requests in flight

    async def _stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self.terminate_followers()
        running = [f for f in self.followers if not f.ended.called]
        ended = defer.DeferredList([f.ended for f in running])
        ended.addTimeout(self._grace + 5.0, self._reactor)
        try:
            await ended
        except defer.TimeoutError:
            for follower in running:
                if not follower.ended.called:
                    follower.transport.signalProcess("KILL")
        self._metrics.unshare()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())


class StateReader(LineReceiver):
    """A follower's standard input: the leader's publications; its end means the leader is gone."""

    delimiter = b"\n"
    MAX_LENGTH = 256 * 1024 * 1024

    def __init__(self, link: FollowerLink, reactor: Any):
        self._link = link
        self._reactor = reactor

    def lineReceived(self, line: bytes) -> None:
        # The leader is this same program, started by this same process: its pickles are trusted
        # (the other way, follower to leader, is JSON).
        self._link.apply(pickle.loads(b64decode(line)))

    def connectionLost(self, reason: Any = None) -> None:
        if self._reactor.running:
            log.info("the leading worker is gone: stopping")
            self._reactor.stop()


class FollowerService(Service):
    """A follower's ends of the links: the leader's publications on standard input, its own
    messages on :data:`UPLINK_FD`, its metrics into the leader's directory."""

    def __init__(self, pool: BackendPool, metrics: Metrics, reactor: Any, number: int):
        self._metrics = metrics
        self._reactor = reactor
        self._stdio: stdio.StandardIO | None = None
        self.link = FollowerLink(pool, number, reactor, self._send)
        self._loop = task.LoopingCall(metrics.sync)
        self._loop.clock = reactor

    def _send(self, line: bytes) -> None:
        if self._stdio is not None:
            self._stdio.write(line)

    def startService(self) -> None:
        super().startService()
        self._metrics.share(os.environ[METRICS_ENV], os.getpid())
        self._loop.start(SYNC_INTERVAL, now=False)
        self._stdio = stdio.StandardIO(StateReader(self.link, self._reactor), stdout=UPLINK_FD, reactor=self._reactor)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        self._metrics.unshare()
