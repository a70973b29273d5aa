"""Pure: which block a call needs, so calls about old state go to a node that still keeps it.

A pruned node drops world state below its ``oldestHistoricBlockNumber`` and answers questions
about older blocks with an error; an archiver keeps it all. A block *number* names a height, in
any form the node reads as one (``990``, ``{"number": 990}``, ``{"number": "990"}``, the anchored
``{"number": 990, "hash": h}``; the first param of ``getBlocks`` also as ``"990"``). A hash,
``{archive}``, a tag or ``"latest"`` does not, and a bare decimal string is a hash
(docs/aztec-protocol.md), so none of them restricts where the call may go.

Which methods take a block first is the method table's routing class (core/methods.py).
"""
from __future__ import annotations

from typing import Any

from sentinel_proxy.core import methods
from sentinel_proxy.core.jsonrpc import BLOCK_UNAVAILABLE, Call, error_item

#: Wire names whose first parameter names a block (derived from the method table, kept for readers).
BLOCK_PARAM_METHODS = frozenset(
    name for name in methods.full_names() if methods.routing_class(name) is not None)


def block_needed(call: Call) -> int | None:
    """The block number this call reads at, if its params name one in any form."""
    if methods.routing_class(call.method) is None:
        return None
    return methods.block_number(call.method, call.request.get("params"))


def unavailable_error(call: Call, block: int, floor: int) -> dict[str, Any]:
    return error_item(call.request.get("id"), BLOCK_UNAVAILABLE,
                      f"Block {block} is older than any available node keeps (oldest: {floor}); "
                      "no archiver node is healthy")
