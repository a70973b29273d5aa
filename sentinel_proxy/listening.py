"""Listening for callers: on Twisted endpoint strings (``tcp:``, ``ssl:`` for TLS, ``unix:``...), or,
with ``--workers``, on TCP ports that several processes bind together (SO_REUSEPORT, which endpoint
strings cannot ask for)."""
from __future__ import annotations

import ctypes
import socket
import struct
import sys
from typing import Any, Callable, Sequence

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IAddress, IListeningPort, IProtocolFactory, IStreamServerEndpoint
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


def server_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """Twisted's own endpoint parser, whatever it raises turned into one ``ValueError`` line.

    Parsing listens on nothing, and needs no reactor (it is only kept for listening), so the
    configuration check passes ``None``. For ``ssl:`` Twisted loads the key and certificate while
    parsing: a file that is missing or unreadable, one that is not PEM, or a key that does not match
    its certificate fails here, not at the first handshake.
    """
    try:
        return serverFromString(reactor, description)
    except OSError as exc:
        raise ValueError(f"{description!r}: cannot read {exc.filename}: {exc.strerror}") from None
    except Exception as exc:  # endpoint plugins raise what they like: ValueError, TypeError, OpenSSL errors
        raise ValueError(f"{description!r} is not a usable endpoint: {exc}") from None


def base_url(description: str, address: IAddress) -> str | None:
    """Where a browser on this host reaches a listener: loopback for a wildcard address; None when
    it is not an IP listener (a UNIX socket)."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None or port is None:
        return None
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    scheme = "https" if description.split(":", 1)[0] == "ssl" else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


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
    """Listens on every endpoint while running; exposes the bound ports so tests can listen on
    ``tcp:0``."""

    def __init__(self, descriptions: Sequence[str], factory: IProtocolFactory, reactor: Any,
                 reuse_port: bool = False, on_listening: Callable[[str], None] | None = None):
        """``on_listening`` is given the base URL of each IP listener once it listens."""
        self._descriptions = tuple(descriptions)
        self._factory = factory
        self._reactor = reactor
        self._reuse_port = reuse_port
        self._on_listening = on_listening
        self.ports: list[IListeningPort] = []

    @property
    def port(self) -> IListeningPort | None:
        """The first listener's port, while listening."""
        return self.ports[0] if self.ports else None

    def startService(self) -> None:
        super().startService()
        for description in self._descriptions:
            self._listen(description)

    def _listen(self, description: str) -> None:
        if self._reuse_port:
            interface, port = tcp_address(description)
            binding = makeBinding(interface, port, reuseAddress=True, reusePort=True)
            listening = defer.maybeDeferred(self._reactor.listenTCP, binding, self._factory)
        else:
            try:
                endpoint = server_endpoint(self._reactor, description)
            except ValueError as exc:  # the configuration check already refuses these: a file changed since
                raise SystemExit(f"sentinel-proxy: cannot listen on {exc}") from None
            listening = endpoint.listen(self._factory)
        failures: list[Failure] = []
        listening.addCallbacks(lambda port: self._listening(description, port), failures.append)
        if failures:  # TCP/SSL/UNIX endpoints fail synchronously: refuse to start rather than idle deaf
            raise SystemExit(f"sentinel-proxy: cannot listen on {description}: {failures[0].value}")

    def _listening(self, description: str, port: IListeningPort) -> None:
        self.ports.append(port)
        url = base_url(description, port.getHost())
        if url is None:
            log.info("sentinel-proxy listening on {address}", address=str(port.getHost()))
            return
        log.info("sentinel-proxy listening on {address}: dashboard at {url}/dashboard", address=str(port.getHost()),
                 url=url)
        if self._on_listening is not None:
            self._on_listening(url)

    def stopService(self) -> defer.Deferred[Any] | None:
        """Stop listening, after taking the connections the kernel already accepted for us (closing
        the socket would reset them, requests and all); they are served as any other."""
        super().stopService()
        ports, self.ports = self.ports, []
        for port in ports:
            refuse_handshakes(port)
            accept_queued(port)
        if not ports:
            return None
        return defer.gatherResults([defer.maybeDeferred(port.stopListening) for port in ports], consumeErrors=True)
