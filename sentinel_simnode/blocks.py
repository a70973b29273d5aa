"""Blocks, checkpoints and logs of the simulated chain, pre-serialised.

Blocks are immutable per number, so their JSON is built once and cached: the simulator sits under the
gateway's benchmark and must not be its bottleneck.  ``block_json`` is the 4.x ``node_getBlock`` result
(an ``L2Block``); the ``*_response``/``*_data`` builders are the 5.x shapes (``getBlock`` with include
options, ``getBlockData``, ``getCheckpoint(s)``, ``getCheckpointsData``, ``getPublicLogsByTags``).
Field names follow ``@aztec/stdlib`` (4.1.2 published; 5.x upstream source), see
``docs/aztec-protocol.md``.
"""

from __future__ import annotations

from functools import lru_cache

from sentinel_simnode.chain import (
    BLOCKS_PER_CHECKPOINT,
    GENESIS_TIME,
    ChainParams,
    archive_root,
    block_hash,
    block_slot,
    chain_salt,
    checkpoint_blocks,
    checkpoint_of,
    hash32,
    public_log_tag,
    slot_outcome,
    tx_count,
    tx_hash,
    validator_address,
)

#: A 65-byte ECDSA signature (0x + 130 hex), the same for every simulated attestation.
_SIGNATURE = "0x" + "ab" * 64 + "1b"


def tx_effect_json(number: int, index: int, salt: str) -> str:
    k = f"{number}:{index}"
    return (
        f'{{"revertCode":0,"txHash":"{tx_hash(number, index, salt)}","transactionFee":"1250000000",'
        f'"noteHashes":["{hash32("note", k + ":0", salt)}","{hash32("note", k + ":1", salt)}"],'
        f'"nullifiers":["{hash32("nullifier", k + ":0", salt)}","{hash32("nullifier", k + ":1", salt)}"],'
        f'"l2ToL1Msgs":[],"publicDataWrites":[{{"leafSlot":"{hash32("leaf", k, salt)}",'
        f'"value":"{hash32("value", k, salt)}"}}],"privateLogs":[],"publicLogs":[],"contractClassLogs":[]}}'
    )


@lru_cache(maxsize=4096)
def block_header_json(params: ChainParams, chain: tuple[int, int], number: int) -> str:
    """The ``node_getBlockHeader`` result of a block; ``chain`` = (l1 chain id, rollup version)."""
    chain_id, version = chain
    salt = chain_salt(chain)
    slot = block_slot(params, number)
    coinbase = validator_address(slot_outcome(params, slot).proposer)
    fees = 1250000000 * tx_count(number)

    def tree(kind: str, at: int, leaves: int) -> str:
        return f'{{"root":"{hash32(kind, at, salt)}","nextAvailableLeafIndex":{leaves}}}'

    return (
        f'{{"lastArchive":{tree("archive", number - 1, number)},'
        f'"state":{{"l1ToL2MessageTree":{tree("l1tol2", number, number * 16)},'
        f'"partial":{{"noteHashTree":{tree("notes", number, number * 64)},'
        f'"nullifierTree":{tree("nullifiers", number, number * 64 + 128)},'
        f'"publicDataTree":{tree("publicdata", number, number * 8 + 512)}}}}},'
        f'"spongeBlobHash":"{hash32("sponge", number, salt)}",'
        f'"globalVariables":{{"chainId":{chain_id},"version":{version},"blockNumber":{number},"slotNumber":{slot},'
        f'"timestamp":"{int(GENESIS_TIME + slot * params.slot_seconds)}","coinbase":"{coinbase}",'
        f'"feeRecipient":"{hash32("fee-recipient", 0, salt)}",'
        f'"gasFees":{{"feePerDaGas":"0","feePerL2Gas":"12000000"}}}},'
        f'"totalFees":"{fees}","totalManaUsed":"{208334 * tx_count(number)}"}}'
    )



def _block_meta(params: ChainParams, chain: tuple[int, int], number: int) -> str:
    """Everything of a block but its body, as an unclosed JSON object (the key order of ``block_json``)."""
    salt = chain_salt(chain)
    return (
        f'{{"number":{number},"hash":"{block_hash(number, salt)}","checkpointNumber":{checkpoint_of(number)},'
        f'"indexWithinCheckpoint":{(number - 1) % BLOCKS_PER_CHECKPOINT},'
        f'"archive":{{"root":"{archive_root(number, salt)}","nextAvailableLeafIndex":{number + 1}}},'
        f'"header":{block_header_json(params, chain, number)}'
    )


def _block_body(number: int, salt: str) -> str:
    effects = ",".join(tx_effect_json(number, i, salt) for i in range(tx_count(number)))
    return f'{{"txEffects":[{effects}]}}'


@lru_cache(maxsize=4096)
def block_json(params: ChainParams, chain: tuple[int, int], number: int) -> bytes:
    """The 4.x ``node_getBlock`` result (~2-3 KB); immutable per number, hence cached."""
    body = _block_body(number, chain_salt(chain))
    return f'{_block_meta(params, chain, number)},"body":{body}}}'.encode()


def l1_published_json(params: ChainParams, number: int, salt: str) -> str:
    """``L1PublishedData`` of the checkpoint holding a block: {blockNumber, timestamp, blockHash}."""
    c = checkpoint_of(number)
    ts = int(GENESIS_TIME + block_slot(params, checkpoint_blocks(c)[1]) * params.slot_seconds) + 12
    return f'{{"blockNumber":"{20_000_000 + c}","timestamp":"{ts}","blockHash":"{hash32("l1-block", c, salt)}"}}'


def attestations_json(params: ChainParams, number: int) -> str:
    """``CommitteeAttestation[]`` of a block's slot: the committee members that attested."""
    outcome = slot_outcome(params, block_slot(params, number))
    voters = [outcome.proposer, *(m for m in outcome.attesters if m not in outcome.missed_attesters)]
    return "[" + ",".join(
        f'{{"address":"{validator_address(v)}","signature":"{_SIGNATURE}"}}' for v in voters) + "]"


def block_response_json(params: ChainParams, chain: tuple[int, int], number: int,
                        body: bool = False, l1: bool = False, attestations: bool = False) -> bytes:
    """The 5.x ``getBlock`` / ``getBlocks`` item: no ``body`` unless ``includeTransactions``."""
    if not l1 and not attestations:
        return block_json(params, chain, number) if body else _bare_block_json(params, chain, number)
    salt = chain_salt(chain)
    parts = [_block_meta(params, chain, number)]
    if body:
        parts.append(f',"body":{_block_body(number, salt)}')
    if l1:
        parts.append(f',"l1":{l1_published_json(params, number, salt)}')
    if attestations:
        parts.append(f',"attestations":{attestations_json(params, number)}')
    return ("".join(parts) + "}").encode()


@lru_cache(maxsize=4096)
def _bare_block_json(params: ChainParams, chain: tuple[int, int], number: int) -> bytes:
    return (_block_meta(params, chain, number) + "}").encode()


@lru_cache(maxsize=4096)
def block_data_json(params: ChainParams, chain: tuple[int, int], number: int) -> bytes:
    """The 5.x ``getBlockData`` result: ``{header, archive, blockHash, checkpointNumber, indexWithinCheckpoint}``."""
    salt = chain_salt(chain)
    return (
        f'{{"header":{block_header_json(params, chain, number)},'
        f'"archive":{{"root":"{archive_root(number, salt)}","nextAvailableLeafIndex":{number + 1}}},'
        f'"blockHash":"{block_hash(number, salt)}","checkpointNumber":{checkpoint_of(number)},'
        f'"indexWithinCheckpoint":{(number - 1) % BLOCKS_PER_CHECKPOINT}}}'
    ).encode()


def _checkpoint_fields(params: ChainParams, chain: tuple[int, int], checkpoint: int) -> str:
    """The fields ``CheckpointData`` and the 5.x ``getCheckpoint`` result share (unclosed, no braces)."""
    salt = chain_salt(chain)
    first, last = checkpoint_blocks(checkpoint)
    slot = block_slot(params, first)
    mana = sum(208334 * tx_count(n) for n in range(first, last + 1))
    header = (
        f'{{"lastArchiveRoot":"{archive_root(first - 1, salt)}",'
        f'"blockHeadersHash":"{hash32("headers", checkpoint, salt)}",'
        f'"blobsHash":"{hash32("blobs", checkpoint, salt)}","inHash":"{hash32("in", checkpoint, salt)}",'
        f'"epochOutHash":"{hash32("epoch-out", slot // params.slots_per_epoch, salt)}","slotNumber":{slot},'
        f'"timestamp":"{int(GENESIS_TIME + slot * params.slot_seconds)}",'
        f'"coinbase":"{validator_address(slot_outcome(params, slot).proposer)}",'
        f'"feeRecipient":"{hash32("fee-recipient", 0, salt)}",'
        f'"gasFees":{{"feePerDaGas":"0","feePerL2Gas":"12000000"}},"totalManaUsed":"{hex(mana)}"}}'
    )
    return (
        f'"header":{header},'
        f'"archive":{{"root":"{archive_root(last, salt)}","nextAvailableLeafIndex":{last + 1}}},'
        f'"checkpointOutHash":"{hash32("checkpoint-out", checkpoint, salt)}","startBlock":{first},'
        f'"blockCount":{last - first + 1},"feeAssetPriceModifier":"0"'
    )


@lru_cache(maxsize=1024)
def checkpoint_data_json(params: ChainParams, chain: tuple[int, int], checkpoint: int) -> bytes:
    """A 5.x ``getCheckpointsData`` item (``CheckpointData``: header, archive, blocks, attestations, l1)."""
    last = checkpoint_blocks(checkpoint)[1]
    return (
        f'{{"checkpointNumber":{checkpoint},{_checkpoint_fields(params, chain, checkpoint)},'
        f'"attestations":{attestations_json(params, last)},'
        f'"l1":{l1_published_json(params, last, chain_salt(chain))}}}'
    ).encode()


def checkpoint_response_json(params: ChainParams, chain: tuple[int, int], checkpoint: int,
                             blocks: bool = False, l1: bool = False, attestations: bool = False) -> bytes:
    """The 5.x ``getCheckpoint`` result: number, hash and ``CheckpointData`` fields; more on request."""
    salt = chain_salt(chain)
    first, last = checkpoint_blocks(checkpoint)
    parts = [f'{{"number":{checkpoint},"hash":"{hash32("checkpoint", checkpoint, salt)}",',
             _checkpoint_fields(params, chain, checkpoint)]
    if blocks:
        parts.append(',"blocks":[' + ",".join(
            block_response_json(params, chain, n).decode() for n in range(first, last + 1)) + "]")
    if l1:
        parts.append(f',"l1":{l1_published_json(params, last, salt)}')
    if attestations:
        parts.append(f',"attestations":{attestations_json(params, last)}')
    return ("".join(parts) + "}").encode()


def log_result_json(params: ChainParams, number: int, salt: str, effects: bool) -> str:
    """The ``LogResult`` of block ``number``'s public log (its first tx, tag ``public_log_tag``)."""
    k = f"{number}:0"
    out = (
        f'{{"logData":["{public_log_tag(number, salt)}","{hash32("log-data", number, salt)}"],'
        f'"blockNumber":{number},"blockHash":"{block_hash(number, salt)}",'
        f'"blockTimestamp":"{int(GENESIS_TIME + block_slot(params, number) * params.slot_seconds)}",'
        f'"txHash":"{tx_hash(number, 0, salt)}","txIndexWithinBlock":0,"logIndexWithinTx":0'
    )
    if effects:
        out += (f',"noteHashes":["{hash32("note", k + ":0", salt)}","{hash32("note", k + ":1", salt)}"],'
                f'"nullifiers":["{hash32("nullifier", k + ":0", salt)}","{hash32("nullifier", k + ":1", salt)}"]')
    return out + "}"
