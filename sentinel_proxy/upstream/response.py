"""What a forwarding client brings back from a node: an answer, or why there is none.

Both clients (:mod:`.http11`, the default, and :mod:`.treq_client`, for measurement) and the
request path share these; they are also importable from :mod:`sentinel_proxy.upstream.client`.
"""
from __future__ import annotations

from dataclasses import dataclass

#: Header pairs in the order received: (name, value), a name repeated for each of its values.
HeaderPairs = tuple[tuple[bytes, bytes], ...]


class UpstreamError(Exception):
    """The node gave no usable answer: ``kind`` is "timeout", "connect", "transport" or "too_large".

    Only "connect" proves the request never reached the node (what makes a write safe to retry).
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    """A node's answer: its status, its headers as (lower-cased name, value) pairs in the order
    received, without the headers that describe the connection (content-length, connection,
    keep-alive, transfer-encoding, ...), and its body as sent (gzip stays gzip with the fast
    client)."""

    code: int
    headers: HeaderPairs
    body: bytes
