"""Listening for callers: on a Twisted endpoint string, or, with ``--workers``, on a TCP port that
several processes bind together (SO_REUSEPORT, which endpoint strings cannot ask for)."""
from __future__ import annotations

import ctypes
import socket
import struct
import sys
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
from sentinel_proxy.twisted_private import accept_queued

log = Logger(observer=observer)

#: ``SO_ATTACH_FILTER`` (Linux): a classic BPF program run on every packet the socket receives.
_SO_ATTACH_FILTER = 26
#: One instruction, ``ret #0``: keep no byte of any packet.
_DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)


def refuse_handshakes(port: Any) -> None:
    """Make the kernel drop new connection attempts on ``port``'s socket (Linux; elsewhere nothing
    happens), so that the connections already queued are the last ones. A caller whose SYN is
    dropped retries it; by then the socket is closed (refused: nothing was sent) or, with
    ``--workers``, another worker's socket takes it. Without this, a handshake completed between
    taking the queue and closing the socket would be reset with its request."""
    fileno = getattr(port, "fileno", None)
    if not sys.platform.startswith("linux") or fileno is None:
        return
    program = ctypes.create_string_buffer(_DROP_ALL)
    fprog = struct.pack("HL", 1, ctypes.addressof(program))  # struct sock_fprog {len; *filter}
    try:
        with socket.socket(fileno=fileno()) as listening:
            try:
                listening.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
            finally:
                listening.detach()  # the port still owns the descriptor
    except OSError as error:
        log.warn("could not stop new connections before closing the listener: {error}", error=str(error))


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
        """Stop listening, after taking the connections the kernel already accepted for us (closing
        the socket would reset them, requests and all); they are served as any other."""
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            refuse_handshakes(port)
            accept_queued(port)
            return defer.maybeDeferred(port.stopListening)
        return None
