"""JSON-RPC requests as raw bytes, ids exactly as written (tests/test_id_echo.py,
test_caller_errors.py)."""
from __future__ import annotations

from typing import Union

import msgspec
from msgspec import UNSET

from sentinel_proxy.core.answers import Answer


def call(raw_id: bytes | None, method: str = "node_getBlock", params: bytes = b"[60]") -> bytes:
    """One call, its id written exactly as given (None: no id)."""
    id_part = b"" if raw_id is None else b'"id":' + raw_id + b","
    return b'{"jsonrpc":"2.0",' + id_part + b'"method":"' + method.encode() + b'","params":' + params + b"}"


def batch(*calls: bytes) -> bytes:
    return b"[" + b",".join(calls) + b"]"


def ids_of(body: bytes) -> list[bytes | None] | bytes | None:
    """The id bytes of each answer item (None: the item has no id), or of the one item."""
    document = msgspec.json.decode(body, type=Union[list[Answer], Answer])
    items = document if isinstance(document, list) else [document]
    ids = [None if item.id is UNSET else bytes(item.id) for item in items]
    return ids if isinstance(document, list) else ids[0]
