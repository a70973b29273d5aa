"""The one place the gateway depends on non-public parts of Twisted: four hooks, each guarded by a
test that fails if a Twisted release changes what it relies on (tests/test_twisted_private.py,
tests/test_web_hooks.py, tests/test_drain.py).

**Writing at once** (:func:`write_now`). ``FileDescriptor.write`` never sends: it buffers, asks
epoll to watch the socket for writability (``epoll_ctl``), sends on the next reactor turn, then
stops watching (``epoll_ctl`` again). For a JSON-RPC answer of a few hundred bytes on an idle
socket that is three system calls and a reactor turn where one ``send`` does; profiled with py-spy
under wrk, the write path was ~28 % of the gateway's CPU per request (two writes per request: to
the node and to the caller). No public API sends at once, so :func:`write_now` does when Twisted
holds nothing unsent for that connection, and hands the rest (or everything, when anything is
pending, or on TLS, or on any other transport) to ``transport.write``, which keeps the order.

**Bounding a request body** (:class:`BoundedRequest`). twisted.web offers no public way to bound a request body while it arrives: it buffers the whole
body in ``Request.content`` before any resource sees the request, so a 1 GB POST would be held in
memory (or a temporary file) just to be refused. ``HTTPChannel`` hands the body to its request
through ``Request.gotLength`` (once, before any data: the declared length, or None when chunked)
and ``Request.handleContentChunk`` (each piece as it arrives). Both have public names but are
documented "not intended for users" and declared only by the private
``twisted.web.http._IDeprecatedHTTPChannelToRequestInterface``. :class:`BoundedRequest`
overrides both; ``tests/test_web_hooks.py`` fails if a Twisted release stops calling them that way.

**Taking the accept queue before closing a listener** (:func:`accept_queued`). The kernel completes
TCP handshakes on its own and queues the connections until ``accept``; ``stopListening`` closes the
socket, and the kernel resets every connection still queued: callers whose requests were already
sent. No public API accepts what is queued, so :func:`accept_queued` calls the port's ``doRead``
(what the reactor calls when the socket is readable: accept, build, connect) while ``poll`` says
the listening socket has connections waiting. ``doRead`` and ``fileno`` are public names on
``tcp.Port`` but meant for the reactor; ``tests/test_drain.py`` fails if they stop doing that.

**Dispatching I/O without the legacy log context** (:func:`dispatch_io_directly`). The epoll
reactor hands every I/O event to its connection through ``twisted.python.log.callWithLogger``,
which copies the legacy log context (a dict), pushes it on a thread-local stack and pops it, so
that old-style ``log.msg`` calls made meanwhile carry the connection's ``logPrefix`` as
"system". The gateway logs through twisted.logger with its own namespaces and never reads that
field; the push and pop cost 1.7 µs per event in a microbenchmark and 11–15 µs per proxied
request live (two or three events each; A/B with ``bench/live_cpu.py``, docs/performance.md).
No public API dispatches without it, so :func:`dispatch_io_directly` gives the daemon's reactor
its own ``doIteration``: Twisted's ``EPollReactor.doPoll`` minus that wrapper, calling the
reactor's ``_doReadOrWrite`` (which handles a failing ``doRead``/``doWrite`` itself) for each
event, with the same last-resort catch. ``tests/test_twisted_private.py`` fails if
``_poller``, ``_selectables`` or ``_doReadOrWrite`` go, and serves real connections through it.
"""
from __future__ import annotations

import select
from errno import EAGAIN, EINTR, ENOBUFS, EWOULDBLOCK
from typing import Any

from twisted.internet import tcp
from twisted.logger import Logger
from twisted.web.server import Request

from sentinel_proxy.ops.logs import observer

_log = Logger(observer=observer)

_RETRY_LATER = frozenset({EAGAIN, EWOULDBLOCK, ENOBUFS, EINTR})


def write_now(transport: Any, data: bytes) -> None:
    """Send ``data`` on ``transport`` now if the kernel takes it, else as ``transport.write`` does.

    Sends directly only on a plain TCP connection (``tcp.Connection``, not TLS) that is connected,
    not closing, and has nothing in Twisted's buffers; whatever the kernel does not take, and any
    error, goes through ``transport.write`` (which buffers it, or notices the lost connection on
    its own schedule), so bytes are never reordered or lost.
    """
    if (isinstance(transport, tcp.Connection) and not transport.TLS and transport.connected
            and not transport.disconnecting and not transport._writeDisconnected
            and not transport._tempDataLen and transport.offset == len(transport.dataBuffer)):
        try:
            sent = transport.socket.send(data)
        except OSError as error:
            if error.errno not in _RETRY_LATER:
                transport.write(data)  # Twisted's own write path sees the error and closes as usual
                return
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


#: Rounds of ``doRead`` at most (each accepts up to the port's growing batch): a socket that stays
#: readable because every accept fails (out of file descriptors) must not hold the shutdown.
_ACCEPT_ROUNDS = 64


def accept_queued(port: Any) -> None:
    """Accept, and hand to the port's factory, every connection the kernel holds for ``port`` (a
    ``tcp.Port``; any other listener is left as it is): called right before it stops listening."""
    if not isinstance(port, tcp.Port) or not port.connected:
        return
    waiting = select.poll()
    waiting.register(port.fileno(), select.POLLIN)
    for _ in range(_ACCEPT_ROUNDS):
        if not waiting.poll(0):
            return
        port.doRead()


class BoundedRequest(Request):
    """Stops buffering a body once it passes ``max_body`` bytes and remembers that it did."""

    max_body = 1 << 20
    body_too_large = False
    #: The head is in (``gotLength`` comes right after it): a deadline that passes now is the body's.
    head_in = False

    def gotLength(self, length: int | None) -> None:
        self.head_in = True
        if length is not None and length > self.max_body:
            self.body_too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        if self.content.tell() + len(data) > self.max_body:
            self.body_too_large = True
            self.content.seek(0)
            self.content.truncate()
            return
        super().handleContentChunk(data)


def dispatch_io_directly(reactor: Any) -> bool:
    """Give ``reactor``, when it is an epoll reactor, a ``doIteration`` that dispatches I/O events
    without ``log.callWithLogger``; True when it did, False (nothing changed) for any other reactor.
    Only the daemon's reactor gets it (``makeService``): a process that reads the legacy log
    context's "system" during I/O would see "-" there."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not Linux
        return False
    if not isinstance(reactor, EPollReactor):
        return False
    selectables = reactor._selectables
    dispatch = reactor._doReadOrWrite

    def do_poll(timeout: float | None) -> None:
        """``EPollReactor.doPoll`` (Twisted 26.10), each event handed to ``_doReadOrWrite`` directly."""
        try:
            events = reactor._poller.poll(-1 if timeout is None else timeout, len(selectables))
        except OSError as error:
            if error.errno == EINTR:
                return
            raise
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                dispatch(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:  # callWithLogger's net: one connection's failure is logged, the loop goes on
                _log.failure("I/O on {selectable!r} failed", selectable=selectable)

    reactor.doIteration = reactor.doPoll = do_poll
    return True
