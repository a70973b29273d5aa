"""Pure: which block a call needs, so calls about old state go to a node that still keeps it.

A pruned node drops world state below its ``oldestHistoricBlockNumber`` and answers questions
about older blocks with an error; an archiver keeps it all. Only an explicit block number (a JSON
number) names a height: a hash or ``"latest"`` does not, and a decimal string is a hash
(aztec-node-api.md), so neither restricts where the call may go.
"""
from __future__ import annotations

from typing import Any, Iterable

from sentinel_proxy.core.jsonrpc import BLOCK_UNAVAILABLE, Call, error_item

#: Methods whose first parameter is a block parameter (4.x names; the list changes between versions,
#: so an unknown method simply places no requirement).
BLOCK_PARAM_METHODS = frozenset({
    "node_getBlock",
    "node_getBlocks",
    "node_getBlockHeader",
    "node_getPublicStorageAt",
    "node_findLeavesIndexes",
    "node_getNullifierMembershipWitness",
    "node_getLowNullifierMembershipWitness",
    "node_getPublicDataWitness",
    "node_getPublicDataTreeWitness",
    "node_getArchiveMembershipWitness",
    "node_getNoteHashMembershipWitness",
    "node_getL1ToL2MessageMembershipWitness",
    "node_getBlockHashMembershipWitness",
    "node_getArchiveSiblingPath",
    "node_getNoteHashSiblingPath",
    "node_getNullifierSiblingPath",
    "node_getPublicDataSiblingPath",
    "node_getL1ToL2MessageSiblingPath",
})


def block_needed(call: Call) -> int | None:
    """The explicit block number this call reads at, if any."""
    if call.method not in BLOCK_PARAM_METHODS:
        return None
    params = call.request.get("params")
    if not isinstance(params, list) or not params:
        return None
    block = params[0]
    if isinstance(block, int) and not isinstance(block, bool) and block >= 0:
        return block
    return None


def oldest_needed(calls: Iterable[Call]) -> int | None:
    """The oldest block any of the calls reads at: the node that serves them all must keep it."""
    needed = [block for block in map(block_needed, calls) if block is not None]
    return min(needed) if needed else None


def unavailable_error(call: Call, block: int, floor: int) -> dict[str, Any]:
    return error_item(call.request.get("id"), BLOCK_UNAVAILABLE,
                      f"Block {block} is older than any available node keeps (oldest: {floor}); "
                      "no archiver node is healthy")
