"""A fake Aztec node that speaks the real JSON-RPC wire protocol, for tests, the demo and the bench.

The gateway's hard cases are protocol details (batches answered by position with the original ids,
"not found" without a ``result`` key in 4.x and as ``"result": null`` in 5.x, HTTP 400 for a failed
single call, gzip both ways, the ``x-aztec-*`` headers, the 4.x ``node_*`` and 5.x ``aztec_*`` method
names) and node pathologies (lagging, pruned world state, holes in the sentinel history, dead or
hanging upstreams).  The simulator reproduces both, deterministically, in either dialect
(``SimulatedNode(..., dialect="4" | "5")``, ``twistd sentinel-simnode --dialect``):

* ``chain``: parameters, scenarios and the chain model, a pure function of ``(ChainParams, Scenario,
  elapsed seconds)`` that takes no clock, so unit tests drive it with numbers or a ``task.Clock`` and
  several simulated nodes in one process agree on every block hash and committee;
* ``sentinel``: ``getValidatorsStats``; ``blocks``: pre-serialised blocks, checkpoints and logs;
* ``rpc``: the JSON-RPC envelope; ``methods4`` / ``methods5`` (+ ``params5``): the method handlers;
* ``resource``: ``SimulatedNode``, the only part that reads a clock (injected, ``IReactorTime``).

Wire behaviour follows ``docs/aztec-protocol.md`` (4.x vs 5.x, with the package sources),
``../shared/docs/aztec-node-api.md`` and the Go fake node in ``bench/gobench``.  Answers are assembled
from pre-serialised ``bytes`` (blocks cached per number, constant answers per tip, the ~2 MB validator
statistics once per processed slot), because the simulator sits under the gateway's benchmark and must
not be its bottleneck.  This module re-exports the public names of all of them.
"""

from __future__ import annotations

from sentinel_simnode.blocks import block_header_json, block_json
from sentinel_simnode.chain import (
    BLOCKS_PER_CHECKPOINT,
    CHECKPOINTED_LAG,
    DIALECTS,
    FAILURES,
    FINALIZED_LAG,
    GENESIS_TIME,
    PROVEN_LAG,
    SCENARIOS,
    ChainParams,
    ChainState,
    Scenario,
    SlotOutcome,
    archive_root,
    block_hash,
    block_number_for_archive,
    block_number_for_hash,
    block_slot,
    chain_salt,
    chain_state,
    checkpoint_of,
    committee,
    dropped_slots,
    get_scenario,
    hash32,
    initial_slot,
    public_log_tag,
    slot_outcome,
    tx_count,
    tx_hash,
    tx_location,
    validator_address,
)
from sentinel_simnode.methods4 import pruned_error_4
from sentinel_simnode.methods5 import pruned_error_5
from sentinel_simnode.resource import PACKAGE_VERSIONS, SimulatedNode, simulated_site
from sentinel_simnode.rpc import GZIP_MIN_BYTES, MAX_BATCH, MAX_BODY, REORDERINGS, RpcError, error_json
from sentinel_simnode.sentinel import STATUS_NAMES, validators_stats, validators_stats_json

__all__ = [
    "BLOCKS_PER_CHECKPOINT", "CHECKPOINTED_LAG", "DIALECTS", "FAILURES", "FINALIZED_LAG", "GENESIS_TIME",
    "GZIP_MIN_BYTES", "MAX_BATCH", "MAX_BODY", "PACKAGE_VERSIONS", "PROVEN_LAG", "REORDERINGS", "SCENARIOS",
    "STATUS_NAMES", "ChainParams", "ChainState", "RpcError", "Scenario", "SimulatedNode", "SlotOutcome",
    "archive_root", "block_hash", "block_header_json", "block_json", "block_number_for_archive",
    "block_number_for_hash", "block_slot", "chain_salt", "chain_state", "checkpoint_of", "committee",
    "dropped_slots", "error_json", "get_scenario", "hash32", "initial_slot", "pruned_error_4", "pruned_error_5",
    "public_log_tag", "simulated_site", "slot_outcome", "tx_count", "tx_hash", "tx_location",
    "validator_address", "validators_stats", "validators_stats_json",
]
