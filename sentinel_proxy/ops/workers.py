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
so they drain) when it stops. Cache and rate limits are shared only through Redis
(``CACHE``/``RATE_LIMIT`` = ``redis://…``); with the memory stores each worker has its own.
"""
from __future__ import annotations

import os
import pickle
import sys
from base64 import b64decode, b64encode
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, protocol, stdio, task
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver

from sentinel_proxy.state.backends import BackendPool
from sentinel_proxy.ops.logs import observer

log = Logger(observer=observer)

#: Set in a follower's environment: its worker number (1..N-1); absent in the leader.
WORKER_ENV = "SENTINEL_WORKER"
PUBLISH_INTERVAL = 0.5


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
    """This process's own command line, in the foreground: twistd's options are not all safe to
    repeat (a pid file, daemonising), the gateway's are."""
    argv = sys.argv
    plugin_args = argv[argv.index("sentinel-proxy") + 1:] if "sentinel-proxy" in argv else []
    return [sys.executable, argv[0], "-n", "--pidfile=", "sentinel-proxy", *plugin_args]


class Follower(protocol.ProcessProtocol):
    def __init__(self, number: int):
        self.number = number
        self.ended: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason: Any) -> None:
        log.info("worker {number} ended ({reason})", number=self.number, reason=reason.getErrorMessage())
        self.ended.callback(None)


class LeaderService(Service):
    """Starts the followers, hands them the node state, and stops them with the leader."""

    def __init__(self, count: int, pool: BackendPool, reactor: Any, grace: float):
        self._count = count
        self._pool = pool
        self._reactor = reactor
        self._grace = grace
        self.followers: list[Follower] = []
        self._loop = task.LoopingCall(self.publish)
        self._loop.clock = reactor

    def startService(self) -> None:
        super().startService()
        command = follower_command()
        for number in range(1, self._count):
            follower = Follower(number)
            self._reactor.spawnProcess(follower, command[0], command, env={**os.environ, WORKER_ENV: str(number)},
                                       childFDs={0: "w", 1: 1, 2: 2})
            self.followers.append(follower)
        log.info("started {count} more workers on the same port", count=self._count - 1)
        self._loop.start(PUBLISH_INTERVAL, now=True)

    def publish(self) -> None:
        line = b64encode(pickle.dumps(self._pool.snapshot())) + b"\n"
        for follower in self.followers:
            if not follower.ended.called and follower.transport is not None:
                follower.transport.writeToChild(0, line)

    async def _stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        running = [f for f in self.followers if not f.ended.called]
        for follower in running:
            follower.transport.signalProcess("TERM")  # they drain their own requests in flight
        ended = defer.DeferredList([f.ended for f in running])
        ended.addTimeout(self._grace + 5.0, self._reactor)
        try:
            await ended
        except defer.TimeoutError:
            for follower in running:
                if not follower.ended.called:
                    follower.transport.signalProcess("KILL")

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())


class StateReader(LineReceiver):
    """A follower's standard input: the leader's snapshots; its end means the leader is gone."""

    delimiter = b"\n"
    MAX_LENGTH = 256 * 1024 * 1024

    def __init__(self, pool: BackendPool, reactor: Any):
        self._pool = pool
        self._reactor = reactor

    def lineReceived(self, line: bytes) -> None:
        # The leader is this same program, started by this same process: its pickles are trusted.
        snapshot = pickle.loads(b64decode(line))
        entries = snapshot["entries"]
        if [url for _, url in entries] != [b.url for b in self._pool.backends]:
            self._pool.replace(entries)
        self._pool.apply(snapshot)

    def connectionLost(self, reason: Any = None) -> None:
        if self._reactor.running:
            log.info("the leading worker is gone: stopping")
            self._reactor.stop()


class FollowerService(Service):
    def __init__(self, pool: BackendPool, reactor: Any):
        self._pool = pool
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        stdio.StandardIO(StateReader(self._pool, self._reactor), reactor=self._reactor)
