"""The one place the gateway depends on non-public parts of Twisted: two hooks, each guarded by a
test that fails if a Twisted release changes what it relies on (tests/test_twisted_private.py,
tests/test_web_hooks.py).

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
"""
from __future__ import annotations

from errno import EAGAIN, EINTR, ENOBUFS, EWOULDBLOCK
from typing import Any

from twisted.internet import tcp
from twisted.web.server import Request

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


class BoundedRequest(Request):
    """Stops buffering a body once it passes ``max_body`` bytes and remembers that it did."""

    max_body = 1 << 20
    body_too_large = False

    def gotLength(self, length: int | None) -> None:
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
