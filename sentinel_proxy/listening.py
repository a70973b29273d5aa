"""Listening for callers: on a Twisted endpoint string, or, with ``--workers``, on a TCP port that
several processes bind together (SO_REUSEPORT, which endpoint strings cannot ask for)."""
from __future__ import annotations

from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.tcp import makeBinding
from twisted.logger import Logger
from twisted.python.failure import Failure

from sentinel_proxy.ops.logs import observer
from sentinel_proxy.ops.workers import tcp_address

log = Logger(observer=observer)


class ListeningService(Service):
    """Listens while running; exposes the bound port so tests can listen on ``tcp:0``."""

    def __init__(self, description: str, factory: IProtocolFactory, reactor: Any, reuse_port: bool = False,
                 on_listening: Callable[[IListeningPort], None] | None = None):
        self._description = description
        self._factory = factory
        self._reactor = reactor
        self._reuse_port = reuse_port
        self._on_listening = on_listening
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        if self._reuse_port:
            interface, port = tcp_address(self._description)
            binding = makeBinding(interface, port, reuseAddress=True, reusePort=True)
            listening = defer.maybeDeferred(self._reactor.listenTCP, binding, self._factory)
        else:
            listening = serverFromString(self._reactor, self._description).listen(self._factory)
        failures: list[Failure] = []
        listening.addCallbacks(self._listening, failures.append)
        if failures:  # TCP/UNIX endpoints fail synchronously: refuse to start rather than idle deaf
            raise SystemExit(f"sentinel-proxy: cannot listen on {self._description}: {failures[0].value}")

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        log.info("sentinel-proxy listening on {address}", address=str(port.getHost()))
        if self._on_listening is not None:
            self._on_listening(port)

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)
        return None
