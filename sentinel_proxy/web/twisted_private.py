"""The one place the gateway depends on a non-public part of Twisted.

twisted.web offers no public way to bound a request body while it arrives: it buffers the whole
body in ``Request.content`` before any resource sees the request, so a 1 GB POST would be held in
memory (or a temporary file) just to be refused. ``HTTPChannel`` hands the body to its request
through ``Request.gotLength`` (once, before any data: the declared length, or None when chunked)
and ``Request.handleContentChunk`` (each piece as it arrives). Both have public names but are
documented "not intended for users" and declared only by the private
``twisted.web.http._IDeprecatedHTTPChannelToRequestInterface``. :class:`BoundedRequest`
overrides both; ``tests/test_web_hooks.py`` fails if a Twisted release stops calling them that way.
"""
from __future__ import annotations

from twisted.web.server import Request


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
