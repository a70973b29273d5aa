"""A fake Aztec node that speaks the real JSON-RPC wire protocol, for tests, the demo and the bench.

The gateway's hard cases are protocol details (batches answered by position with the original ids,
"not found" without a ``result`` key, HTTP 400 for a failed single call, gzip both ways, the
``x-aztec-*`` headers) and node pathologies (lagging, pruned world state, holes in the sentinel
history, dead or hanging upstreams).  This module reproduces both, deterministically:

* The chain is a pure function of ``(ChainParams, Scenario, elapsed seconds)``: ``chain_state``,
  ``validators_stats`` and the block builders take no clock, so unit tests drive them with numbers or
  a ``task.Clock`` and several simulated nodes in one process agree on every block hash and
  committee.  Only ``SimulatedNode`` reads a clock (injected, ``IReactorTime``).
* Wire behaviour follows ``docs/aztec-node-api.md`` and the Go fake node in ``bench/gobench``.
* Answers are assembled from pre-serialised ``bytes`` (blocks cached per number, constant answers per
  tip, the ~2 MB validator statistics once per processed slot), because the simulator sits under
  the gateway's benchmark and must not be its bottleneck.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any, Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

log = Logger()

MAX_BATCH = 100  # RPC_MAX_BATCH_SIZE of a real node
MAX_BODY = 1 << 20  # RPC_MAX_BODY_SIZE of a real node (1 MB), before and after decompression
GZIP_MIN_BYTES = 1024  # answers above this are gzipped when the client accepts it
GENESIS_TIME = 1_760_000_000  # L1 timestamp of slot 0 (same as gobench)

# Finality lags behind the proposed tip, as in gobench.
CHECKPOINTED_LAG = 2
PROVEN_LAG = 10
FINALIZED_LAG = 20
BLOCKS_PER_CHECKPOINT = 4  # checkpoint c holds blocks 4c-3 .. 4c (gobench)

FAILURES = (None, "500", "reset", "garbage", "hang")

# Proposer outcomes and how often they happen; the rest of the slots are mined.
_MISSED_RATE = 0.05
_PROPOSED_RATE = 0.02  # proposed (attested) but not mined
_ATTESTATION_MISSED_RATE = 0.02

_STATUS_4X = {"mined": "checkpoint-mined", "proposed": "checkpoint-proposed", "missed": "checkpoint-missed"}
_STATUS_LEGACY = {"mined": "block-mined", "proposed": "block-proposed", "missed": "block-missed"}

_HEX64 = re.compile(r"0x[0-9a-fA-F]{64}")
_HEX_FIELD = re.compile(r"0x[0-9a-fA-F]{1,64}")

_dumps = json.JSONEncoder(separators=(",", ":")).encode


# ---------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ChainParams:
    """Network parameters of the simulated chain (4.x mainnet defaults).

    ``start_slot`` defaults to ``slots_per_epoch * 400 + slots_per_epoch // 2``: far enough from slot 0
    for a 128-epoch archiver history plus a lag, and in the middle of an epoch so that, as on a real
    node, the oldest and the current epoch of the sentinel window are partial.
    """

    slots_per_epoch: int = 32
    committee_size: int = 48
    slot_seconds: float = 72.0
    block_seconds: float = 2.0  # the proposed tip advances by one block this often
    start_block: int = 1000  # node_getBlockNumber at elapsed 0
    start_slot: int | None = None

    def __post_init__(self) -> None:
        if self.slots_per_epoch < 1 or self.committee_size < 1:
            raise ValueError("slots_per_epoch and committee_size must be >= 1")
        if self.slot_seconds <= 0 or self.block_seconds <= 0:
            raise ValueError("slot_seconds and block_seconds must be > 0")
        if self.start_block < 1:
            raise ValueError("start_block must be >= 1")
        if self.start_slot is None:
            object.__setattr__(self, "start_slot", self.slots_per_epoch * 400 + self.slots_per_epoch // 2)
        elif self.start_slot < 0:
            raise ValueError("start_slot must be >= 0")

    @property
    def validator_pool_size(self) -> int:
        """Twice the committee, so the set of addresses in the stats changes from epoch to epoch."""
        return 2 * self.committee_size


@dataclass(frozen=True)
class Scenario:
    """How one simulated node behaves.  Frozen so it can key the caches; swap it whole at runtime."""

    name: str
    ready: bool = True
    lag_blocks: int = 0  # the tip trails a healthy node by this many blocks
    lag_epochs: int = 0  # the slot clock (sentinel) trails by this many epochs
    history_epochs: int = 24  # sentinel window, in epochs
    # Sentinel holes, counted back from the epoch of lastProcessedSlot so that they stay in the middle
    # of the window however long the node runs: whole epochs, and (epochs back, slot index) pairs.
    dropped_epochs: tuple[int, ...] = ()
    dropped_slots: tuple[tuple[int, int], ...] = ()
    legacy: bool = False  # Aztec 2.x/3.x shapes
    delay_seconds: float = 0.0  # added to every answer (clock.callLater)
    failure: str | None = None  # one of FAILURES
    rollup_version: int = 1
    l1_chain_id: int = 31337
    sentinel_enabled: bool = True
    # World-state history kept below the tip, in blocks; None keeps all of it (oldest block 1).
    oldest_historic: int | None = 64

    def __post_init__(self) -> None:
        if self.failure not in FAILURES:
            raise ValueError(f"failure must be one of {FAILURES}, not {self.failure!r}")
        if self.history_epochs < 1:
            raise ValueError("history_epochs must be >= 1")


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("archiver", history_epochs=128, oldest_historic=None),
        Scenario("pruned"),
        Scenario("missing-epochs", dropped_epochs=(8, 9), dropped_slots=((4, 3), (4, 11), (4, 20))),
        Scenario("lagging", lag_blocks=50, lag_epochs=2),
        Scenario("not-ready", ready=False),
        Scenario("legacy", legacy=True),
        Scenario("slow", delay_seconds=0.2),
        Scenario("failing-500", failure="500"),
        Scenario("failing-reset", failure="reset"),
        Scenario("failing-garbage", failure="garbage"),
        Scenario("hang", failure="hang"),
        Scenario("other-rollup", rollup_version=2),
        Scenario("sentinel-disabled", sentinel_enabled=False),
    )
}


def get_scenario(scenario: Scenario | str) -> Scenario:
    """Accept a ``Scenario`` or its name (CLI, tests); unknown names raise ``ValueError``."""
    if isinstance(scenario, Scenario):
        return scenario
    try:
        return SCENARIOS[scenario]
    except KeyError:
        raise ValueError(f"unknown scenario {scenario!r} (choose from: {', '.join(SCENARIOS)})") from None


# ---------------------------------------------------------------------------------- chain model


@dataclass(frozen=True)
class ChainState:
    """What one node reports at one instant; computed once per HTTP request (one tip per batch)."""

    tip: int
    checkpointed: int
    proven: int
    finalized: int
    oldest_historic: int
    slot: int
    last_processed_slot: int


def chain_state(params: ChainParams, scenario: Scenario, elapsed: float) -> ChainState:
    """The node's view after ``elapsed`` seconds: tip +1 per block, slot +1 per slot, finality lags."""
    tip = max(0, params.start_block - scenario.lag_blocks + int(elapsed // params.block_seconds))
    first_slot = params.start_slot - scenario.lag_epochs * params.slots_per_epoch
    slot = max(0, first_slot + int(elapsed // params.slot_seconds))
    if scenario.oldest_historic is None:
        oldest = 1
    else:
        oldest = max(1, tip - scenario.oldest_historic)
    return ChainState(
        tip=tip,
        checkpointed=max(0, tip - CHECKPOINTED_LAG),
        proven=max(0, tip - PROVEN_LAG),
        finalized=max(0, tip - FINALIZED_LAG),
        oldest_historic=oldest,
        slot=slot,
        last_processed_slot=slot - 1,
    )


def chain_salt(chain: tuple[int, int]) -> str:
    """Hash prefix for ``(l1 chain id, rollup version)``: another rollup is another chain, so its
    hashes differ; empty for the default chain so that hashes match gobench's."""
    return "" if chain == (31337, 1) else f"{chain[0]}/{chain[1]}/"


def hash32(kind: str, n: int | str, salt: str = "") -> str:
    """A deterministic 0x+64-hex field; equals gobench's ``hash32`` for the default chain."""
    return "0x" + hashlib.sha256(f"{salt}{kind}:{n}".encode()).hexdigest()


def block_hash(number: int, salt: str = "") -> str:
    """Block hash with the number in its last 12 hex digits, so a lookup by hash needs no index."""
    return hash32("block", number, salt)[:54] + f"{number:012x}"


def block_number_for_hash(value: str, salt: str = "") -> int | None:
    """Invert ``block_hash``; any string that is not one of ours (``"5"`` included) gives None."""
    if not _HEX64.fullmatch(value):
        return None
    number = int(value[54:], 16)
    return number if block_hash(number, salt) == value.lower() else None


def tx_count(number: int) -> int:
    """Each block holds one to three transactions."""
    return 1 + number % 3


def tx_hash(number: int, index: int, salt: str = "") -> str:
    """Tx hash carrying its block number and index, so receipts need no index either."""
    return hash32("tx", f"{number}:{index}", salt)[:50] + f"{number:012x}{index:04x}"


def tx_location(value: str, salt: str = "") -> tuple[int, int] | None:
    """Invert ``tx_hash`` to ``(block number, index)``; None for a hash this chain never made."""
    if not _HEX64.fullmatch(value):
        return None
    number, index = int(value[50:62], 16), int(value[62:], 16)
    if number < 1 or index >= tx_count(number) or tx_hash(number, index, salt) != value.lower():
        return None
    return number, index


def checkpoint_of(number: int) -> int:
    """Checkpoint number holding a block."""
    return (number + BLOCKS_PER_CHECKPOINT - 1) // BLOCKS_PER_CHECKPOINT


def block_slot(params: ChainParams, number: int) -> int:
    """The slot a block was built in, from the same clock as the tip (fixed per block, any lag)."""
    offset = int(((number - params.start_block) * params.block_seconds) // params.slot_seconds)
    return max(0, params.start_slot + offset)


@lru_cache(maxsize=1024)
def validator_address(index: int) -> str:
    """Validator ``index`` of the pool: 0x+40 lowercase hex (gobench's ``ethAddr``)."""
    return "0x" + hashlib.sha256(f"validator:{index}".encode()).hexdigest()[:40]


@lru_cache(maxsize=1024)
def committee(params: ChainParams, epoch: int) -> tuple[int, ...]:
    """Pool indices of the epoch's committee (``committee_size`` distinct validators)."""
    rng = random.Random(f"committee:{epoch}")
    return tuple(rng.sample(range(params.validator_pool_size), params.committee_size))


@dataclass(frozen=True)
class SlotOutcome:
    """What happened in one slot: the proposer's result and which attesters missed."""

    proposer: int  # pool index
    proposal: str  # "mined" | "proposed" | "missed"
    attesters: tuple[int, ...]  # the committee minus the proposer
    missed_attesters: frozenset[int]


@lru_cache(maxsize=16384)
def slot_outcome(params: ChainParams, slot: int) -> SlotOutcome:
    """Deterministic per slot; cached because the sentinel window re-reads every slot once a slot."""
    members = committee(params, slot // params.slots_per_epoch)
    rng = random.Random(f"slot:{slot}")
    proposer = members[rng.randrange(len(members))]
    draw = rng.random()
    if draw < _MISSED_RATE:
        proposal = "missed"
    elif draw < _MISSED_RATE + _PROPOSED_RATE:
        proposal = "proposed"
    else:
        proposal = "mined"
    attesters = tuple(m for m in members if m != proposer)
    if proposal == "missed":
        missed: frozenset[int] = frozenset()
    else:
        missed = frozenset(m for m in attesters if rng.random() < _ATTESTATION_MISSED_RATE)
    return SlotOutcome(proposer, proposal, attesters, missed)


def initial_slot(params: ChainParams, scenario: Scenario) -> int:
    """Slot at which the node's sentinel started: just before the window it shows at elapsed 0.

    It stays fixed while the window slides on, as on a long-running real node.
    """
    window = scenario.history_epochs * params.slots_per_epoch
    return params.start_slot - scenario.lag_epochs * params.slots_per_epoch - 1 - window


def dropped_slots(params: ChainParams, scenario: Scenario, last_processed_slot: int) -> frozenset[int]:
    """Slots the scenario leaves out of the sentinel history (relative to the current epoch)."""
    spe = params.slots_per_epoch
    current = last_processed_slot // spe
    slots = {(current - back) * spe + i for back in scenario.dropped_epochs for i in range(spe)}
    slots.update((current - back) * spe + index % spe for back, index in scenario.dropped_slots)
    return frozenset(slots)


def _time_stat(params: ChainParams, slot: int, legacy: bool) -> dict[str, Any]:
    ts = int(GENESIS_TIME + slot * params.slot_seconds)
    date = datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    return {"timestamp": str(ts), "slot": str(slot) if legacy else slot, "date": date}


def _missed(streak: int, count: int, total: int) -> dict[str, Any]:
    if total == 0:
        return {"currentStreak": streak, "count": count, "total": total}
    return {"currentStreak": streak, "rate": count / total, "count": count, "total": total}


class _Tally:
    """Per-validator accumulator while walking the window once."""

    __slots__ = ("history", "proposals", "missed_proposals", "proposal_streak", "last_proposal",
                 "attestations", "missed_attestations", "attestation_streak", "last_attestation")

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self.proposals = self.missed_proposals = self.proposal_streak = 0
        self.attestations = self.missed_attestations = self.attestation_streak = 0
        self.last_proposal: int | None = None
        self.last_attestation: int | None = None


def validators_stats(params: ChainParams, scenario: Scenario, last_processed_slot: int) -> dict[str, Any]:
    """The ``node_getValidatorsStats`` result for a node whose sentinel processed up to that slot.

    Per processed slot in the window: the proposer's entry, and ``committee_size - 1`` attestation
    entries unless the proposal was missed.  The history entry dicts of one slot are shared between
    validators (JSON output is the same), which keeps a 128-epoch archiver window cheap to build.
    """
    if not scenario.sentinel_enabled:
        return {"stats": {}, "slotWindow": 0}
    legacy = scenario.legacy
    names = _STATUS_LEGACY if legacy else _STATUS_4X
    window = scenario.history_epochs * params.slots_per_epoch
    initial = initial_slot(params, scenario)
    first = max(last_processed_slot - window + 1, initial + 1, 0)
    holes = dropped_slots(params, scenario, last_processed_slot)
    tallies: dict[int, _Tally] = {}
    for slot in range(first, last_processed_slot + 1):
        if slot in holes:
            continue
        outcome = slot_outcome(params, slot)
        slot_value: int | str = str(slot) if legacy else slot
        t = tallies.get(outcome.proposer)
        if t is None:
            t = tallies[outcome.proposer] = _Tally()
        t.history.append({"slot": slot_value, "status": names[outcome.proposal]})
        t.proposals += 1
        if outcome.proposal == "missed":
            t.missed_proposals += 1
            t.proposal_streak += 1
            continue
        t.proposal_streak = 0
        t.last_proposal = slot
        sent = {"slot": slot_value, "status": "attestation-sent"}
        missed = {"slot": slot_value, "status": "attestation-missed"}
        missed_set = outcome.missed_attesters
        for member in outcome.attesters:
            t = tallies.get(member)
            if t is None:
                t = tallies[member] = _Tally()
            t.attestations += 1
            if member in missed_set:
                t.history.append(missed)
                t.missed_attestations += 1
                t.attestation_streak += 1
            else:
                t.history.append(sent)
                t.attestation_streak = 0
                t.last_attestation = slot
    stats: dict[str, Any] = {}
    for index, t in tallies.items():
        address = validator_address(index)
        entry: dict[str, Any] = {"address": address}
        if t.last_proposal is not None:
            entry["lastProposal"] = _time_stat(params, t.last_proposal, legacy)
        if t.last_attestation is not None:
            entry["lastAttestation"] = _time_stat(params, t.last_attestation, legacy)
        entry["totalSlots"] = len(t.history)
        entry["missedProposals"] = _missed(t.proposal_streak, t.missed_proposals, t.proposals)
        entry["missedAttestations"] = _missed(t.attestation_streak, t.missed_attestations, t.attestations)
        entry["history"] = t.history
        stats[address] = entry
    return {
        "stats": stats,
        "lastProcessedSlot": str(last_processed_slot) if legacy else last_processed_slot,
        "initialSlot": str(initial) if legacy else initial,
        "slotWindow": window,
    }


@lru_cache(maxsize=8)
def validators_stats_json(params: ChainParams, scenario: Scenario, last_processed_slot: int) -> bytes:
    """Serialised ``validators_stats``, built once per processed slot and shared by all nodes alike."""
    return _dumps(validators_stats(params, scenario, last_processed_slot)).encode()


# ---------------------------------------------------------------------------------- blocks


def _tx_effect_json(number: int, index: int, salt: str) -> str:
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


@lru_cache(maxsize=4096)
def block_json(params: ChainParams, chain: tuple[int, int], number: int) -> bytes:
    """The ``node_getBlock`` result (~2-3 KB); immutable per number, hence cached."""
    salt = chain_salt(chain)
    effects = ",".join(_tx_effect_json(number, i, salt) for i in range(tx_count(number)))
    return (
        f'{{"number":{number},"hash":"{block_hash(number, salt)}","checkpointNumber":{checkpoint_of(number)},'
        f'"indexWithinCheckpoint":{(number - 1) % BLOCKS_PER_CHECKPOINT},'
        f'"archive":{{"root":"{hash32("archive", number, salt)}","nextAvailableLeafIndex":{number + 1}}},'
        f'"header":{block_header_json(params, chain, number)},'
        f'"body":{{"txEffects":[{effects}]}}}}'
    ).encode()


# ---------------------------------------------------------------------------------- JSON-RPC


class RpcError(Exception):
    """A JSON-RPC error answer (code and message go on the wire)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_NULL_ID = b"null"
_HEAD = b'{"jsonrpc":"2.0"'


def _head(id_json: bytes | None) -> bytes:
    # A notification (no "id" key) is answered without an id, like gobench.
    return _HEAD if id_json is None else _HEAD + b',"id":' + id_json


def error_json(id_json: bytes | None, code: int, message: str) -> bytes:
    """One serialised JSON-RPC error response."""
    return _head(id_json) + b',"error":' + _dumps({"code": code, "message": message}).encode() + b"}"


def _params_error(what: str) -> RpcError:
    return RpcError(-32701, f"Invalid params: {what}")


def _param(params: list[Any], index: int) -> Any:
    """Positional parameter or None; JS clients send ``undefined`` optionals as null or omit them."""
    return params[index] if index < len(params) else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tx_hash_param(params: list[Any]) -> str:
    value = _param(params, 0)
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise _params_error("expected a tx hash (0x + 64 hex)")
    return value


def _accepts_gzip(header: bytes | None) -> bool:
    """True when ``Accept-Encoding`` lists gzip with a non-zero quality."""
    if not header:
        return False
    for part in header.lower().split(b","):
        coding, *options = part.split(b";")
        if coding.strip() != b"gzip":
            continue
        for option in options:
            key, _, value = option.partition(b"=")
            if key.strip() == b"q":
                try:
                    return float(value) > 0
                except ValueError:
                    return False
        return True
    return False


def _inflate(data: bytes) -> bytes | None:
    """Decompress a gzip/deflate request body; None when it inflates beyond ``MAX_BODY``."""
    decompressor = zlib.decompressobj(wbits=47)  # 32 + 15: gzip or zlib header, auto-detected
    out = decompressor.decompress(data, MAX_BODY + 1)
    if len(out) > MAX_BODY:
        return None
    if not decompressor.eof:
        raise zlib.error("truncated compressed body")
    return out


_PEERS = _dumps([
    {"status": "connected", "score": 10 - i, "id": "16Uiu2HAm" + hash32("peer", i)[2:46]} for i in range(3)
]).encode()

# Methods a 2.x/3.x node does not have.
_V4_ONLY = frozenset({"node_getCheckpointedBlockNumber"})


class SimulatedNode(Resource):
    """The fake node as a ``twisted.web`` root resource: ``POST /``, ``GET /status``, 404 elsewhere.

    ``scenario`` may be replaced at runtime (a ``Scenario`` or its name) to turn a healthy node into a
    failing one mid-test.  ``requests`` counts HTTP POSTs and ``calls`` counts JSON-RPC method names,
    so tests can check what the gateway actually sent upstream.
    """

    isLeaf = True

    def __init__(
        self,
        scenario: Scenario | str = "pruned",
        chain: ChainParams = ChainParams(),
        clock: IReactorTime | None = None,
    ) -> None:
        super().__init__()
        if clock is None:
            from twisted.internet import reactor  # here, so importing this module installs no reactor

            clock = reactor
        self.chain = chain
        self._clock: IReactorTime = clock
        self._started = clock.seconds()
        self.requests = 0
        self.calls: Counter[str] = Counter()
        self._held: set[Request] = set()
        self._tip_cache: dict[str, bytes] = {}
        self._tip_cache_tip = -1
        self._methods: dict[str, Callable[[list[Any], ChainState], bytes | None]] = {
            "node_isReady": self._is_ready,
            "node_getBlockNumber": lambda p, s: str(s.tip).encode(),
            "node_getProvenBlockNumber": lambda p, s: str(s.proven).encode(),
            "node_getCheckpointedBlockNumber": lambda p, s: str(s.checkpointed).encode(),
            "node_getL2Tips": lambda p, s: self._per_tip("tips", s, self._build_l2_tips),
            "node_getWorldStateSyncStatus": lambda p, s: self._per_tip("sync", s, self._build_sync_status),
            "node_getCurrentMinFees": lambda p, s: self._per_tip("fees", s, self._build_min_fees),
            "node_getNodeInfo": lambda p, s: self._node_info,
            "p2p_getPeers": lambda p, s: _PEERS,
            "node_getBlock": self._get_block,
            "node_getBlockByHash": self._get_block_by_hash,
            "node_getBlockHeader": self._get_block_header,
            "node_getBlocks": self._get_blocks,
            "node_getTxReceipt": self._get_tx_receipt,
            "node_getTxEffect": self._get_tx_effect,
            "node_getPublicStorageAt": self._get_public_storage_at,
            "node_getValidatorsStats": self._get_validators_stats,
        }
        self.scenario = scenario

    # -- scenario and state

    @property
    def scenario(self) -> Scenario:
        """The current behaviour; assigning one (or a name) resets every per-scenario cache."""
        return self._scenario

    @scenario.setter
    def scenario(self, value: Scenario | str) -> None:
        scenario = get_scenario(value)
        self._scenario = scenario
        self._chain_key = (scenario.l1_chain_id, scenario.rollup_version)
        self._salt = chain_salt(self._chain_key)
        self._tip_cache.clear()
        self._tip_cache_tip = -1
        self._headers = self._build_headers(scenario)
        self._node_info = self._build_node_info(scenario)
        log.info("simulated node scenario is now {scenario}", scenario=scenario.name)

    def chain_state(self) -> ChainState:
        """The node's view of the chain now, from the injected clock."""
        return chain_state(self.chain, self._scenario, self._clock.seconds() - self._started)

    @property
    def in_flight(self) -> int:
        """Requests held open (delayed or hanging), so tests can see the gateway give up on them."""
        return len(self._held)

    def _rollup_address(self, scenario: Scenario) -> str:
        return "0x" + hash32("rollup", f"{scenario.l1_chain_id}:{scenario.rollup_version}")[2:42]

    def _package_version(self, scenario: Scenario) -> str:
        return "2.1.2" if scenario.legacy else "4.1.2"

    def _build_headers(self, scenario: Scenario) -> tuple[tuple[bytes, bytes], ...]:
        generation = 2 if scenario.legacy else 1
        headers = {
            "Access-Control-Allow-Origin": "*",
            "x-aztec-l1ChainId": str(scenario.l1_chain_id),
            "x-aztec-rollupVersion": str(scenario.rollup_version),
            "x-aztec-l2ProtocolContractsHash": hash32("protocol-contracts", generation),
            "x-aztec-l2CircuitsVkTreeRoot": hash32("vk-tree", generation),
            "x-aztec-packageVersion": self._package_version(scenario),
            "x-aztec-l1RollupAddress": self._rollup_address(scenario),
        }
        return tuple((k.encode(), v.encode()) for k, v in headers.items())

    def _build_node_info(self, scenario: Scenario) -> bytes:
        chain = f"{scenario.l1_chain_id}:{scenario.rollup_version}"
        l1 = {
            f"{name}Address": "0x" + hash32(name, chain)[2:42]
            for name in ("registry", "inbox", "outbox", "feeJuice", "feeJuicePortal", "stakingAsset")
        }
        return _dumps({
            "nodeVersion": self._package_version(scenario),
            "l1ChainId": scenario.l1_chain_id,
            "rollupVersion": scenario.rollup_version,
            "enr": "enr:-" + hash32("enr", chain)[2:],
            "l1ContractAddresses": {"rollupAddress": self._rollup_address(scenario), **l1},
            "protocolContractAddresses": {
                name: "0x" + f"{i + 1:064x}"
                for i, name in enumerate(("classRegistry", "feeJuice", "instanceRegistry", "multiCallEntrypoint"))
            },
            "realProofs": True,
        }).encode()

    def _per_tip(self, name: str, state: ChainState, build: Callable[[ChainState], bytes]) -> bytes:
        """Answers that only change with the tip are built once per tip."""
        if self._tip_cache_tip != state.tip:
            self._tip_cache.clear()
            self._tip_cache_tip = state.tip
        body = self._tip_cache.get(name)
        if body is None:
            body = self._tip_cache[name] = build(state)
        return body

    def _ref(self, number: int) -> dict[str, Any]:
        return {"number": number, "hash": block_hash(number, self._salt)}

    def _checkpoint_ref(self, number: int) -> dict[str, Any]:
        c = checkpoint_of(number)
        return {"block": self._ref(number), "checkpoint": {"number": c, "hash": hash32("checkpoint", c, self._salt)}}

    def _build_l2_tips(self, state: ChainState) -> bytes:
        if self._scenario.legacy:
            tips = {"latest": self._ref(state.tip), "proven": self._ref(state.proven),
                    "finalized": self._ref(state.finalized)}
        else:
            tips = {"proposed": self._ref(state.tip), "checkpointed": self._checkpoint_ref(state.checkpointed),
                    "proven": self._checkpoint_ref(state.proven), "finalized": self._checkpoint_ref(state.finalized)}
        return _dumps(tips).encode()

    def _build_sync_status(self, state: ChainState) -> bytes:
        return _dumps({
            "finalizedBlockNumber": state.finalized,
            "latestBlockNumber": state.tip,
            "latestBlockHash": block_hash(state.tip, self._salt),
            "oldestHistoricBlockNumber": state.oldest_historic,
            "treesAreSynched": True,
        }).encode()

    def _build_min_fees(self, state: ChainState) -> bytes:
        return _dumps({"feePerDaGas": "0", "feePerL2Gas": str(12_000_000 + (state.tip % 10) * 10_000)}).encode()

    # -- method handlers: (params, state) -> result JSON, None for "not found", or raise RpcError

    def _is_ready(self, params: list[Any], state: ChainState) -> bytes:
        return b"true" if self._scenario.ready else b"false"

    def _block_param(self, value: Any, state: ChainState) -> int | None:
        """Block number | block hash | "latest"; any other string is a hash we do not know."""
        if _is_int(value):
            if value < 0:
                raise _params_error("block number must be >= 0")
            return value
        if isinstance(value, str):
            return state.tip if value == "latest" else block_number_for_hash(value, self._salt)
        raise _params_error("expected a block number, a block hash or 'latest'")

    def _existing(self, number: int | None, state: ChainState) -> int | None:
        return number if number is not None and 1 <= number <= state.tip else None

    def _get_block(self, params: list[Any], state: ChainState) -> bytes | None:
        number = self._existing(self._block_param(_param(params, 0), state), state)
        return None if number is None else block_json(self.chain, self._chain_key, number)

    def _get_block_by_hash(self, params: list[Any], state: ChainState) -> bytes | None:
        value = _param(params, 0)
        if not isinstance(value, str):
            raise _params_error("expected a block hash")
        number = self._existing(block_number_for_hash(value, self._salt), state)
        return None if number is None else block_json(self.chain, self._chain_key, number)

    def _get_block_header(self, params: list[Any], state: ChainState) -> bytes | None:
        value = _param(params, 0)
        number = state.tip if value is None else self._block_param(value, state)
        number = self._existing(number, state)
        return None if number is None else block_header_json(self.chain, self._chain_key, number).encode()

    def _get_blocks(self, params: list[Any], state: ChainState) -> bytes:
        start, limit = _param(params, 0), _param(params, 1)
        if not _is_int(start) or start < 1:
            raise _params_error("from must be an integer >= 1")
        if not _is_int(limit) or not 1 <= limit <= 50:
            raise _params_error("limit must be an integer between 1 and 50")
        end = min(start + limit - 1, state.tip)
        return b"[" + b",".join(block_json(self.chain, self._chain_key, n) for n in range(start, end + 1)) + b"]"

    def _receipt_status(self, number: int, state: ChainState) -> str:
        if number <= state.finalized:
            return "finalized"
        if number <= state.proven:
            return "proven"
        if number <= state.checkpointed:
            return "checkpointed"
        return "proposed"

    def _get_tx_receipt(self, params: list[Any], state: ChainState) -> bytes:
        value = _tx_hash_param(params)
        where = tx_location(value, self._salt)
        legacy = self._scenario.legacy
        if where is None or where[0] > state.tip:
            receipt: dict[str, Any] = {"txHash": value, "status": "dropped"}
            if legacy:
                receipt["error"] = ""
            return _dumps(receipt).encode()
        number = where[0]
        fee = "1250000000"
        if legacy:  # 2.x/3.x receipts: "success" and an error string, no finality
            receipt = {"txHash": value, "status": "success", "error": "", "transactionFee": fee,
                       "blockHash": block_hash(number, self._salt), "blockNumber": number}
        else:
            receipt = {"txHash": value, "status": self._receipt_status(number, state), "executionResult": "success",
                       "blockHash": block_hash(number, self._salt), "blockNumber": number,
                       "epochNumber": block_slot(self.chain, number) // self.chain.slots_per_epoch,
                       "transactionFee": fee}
        return _dumps(receipt).encode()

    def _get_tx_effect(self, params: list[Any], state: ChainState) -> bytes | None:
        where = tx_location(_tx_hash_param(params), self._salt)
        if where is None or where[0] > state.tip:
            return None
        number, index = where
        return (
            f'{{"l2BlockNumber":{number},"l2BlockHash":"{block_hash(number, self._salt)}",'
            f'"txIndexInBlock":{index},"data":{_tx_effect_json(number, index, self._salt)}}}'
        ).encode()

    def _get_public_storage_at(self, params: list[Any], state: ChainState) -> bytes:
        block, contract, slot = _param(params, 0), _param(params, 1), _param(params, 2)
        if not isinstance(contract, str) or not _HEX_FIELD.fullmatch(contract):
            raise _params_error("expected a contract address")
        if not isinstance(slot, str) or not _HEX_FIELD.fullmatch(slot):
            raise _params_error("expected a storage slot")
        number = self._block_param(block, state)
        if number is None:
            raise RpcError(-32702, f"Block hash {block} not found")
        if number > state.tip:
            raise RpcError(-32702, f"Block {number} not yet synced (latest is {state.tip})")
        if number < state.oldest_historic:
            raise RpcError(
                -32702,
                f"World state not available for block {number} "
                f"(oldest historic block is {state.oldest_historic})",
            )
        return _dumps(hash32("storage", f"{contract.lower()}:{int(slot, 16)}:{number}", self._salt)).encode()

    def _get_validators_stats(self, params: list[Any], state: ChainState) -> bytes:
        return validators_stats_json(self.chain, self._scenario, state.last_processed_slot)

    # -- JSON-RPC

    def _answer(self, item: Any, state: ChainState) -> tuple[bytes, bool]:
        """One response object for one request object; the flag is False for an error."""
        if not isinstance(item, dict):
            return error_json(_NULL_ID, -32600, "Invalid Request"), False
        id_json: bytes | None = None
        if "id" in item:
            rid = item["id"]
            if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int, float))):
                return error_json(_NULL_ID, -32600, "Invalid Request: bad id"), False
            id_json = _dumps(rid).encode()
        method = item.get("method")
        if not isinstance(method, str):
            return error_json(id_json, -32600, "Invalid Request: missing method"), False
        self.calls[method] += 1
        params = item.get("params")
        if params is None:
            params = []
        elif not isinstance(params, list):
            return error_json(id_json, -32701, "Invalid params: params must be an array"), False
        handler = self._methods.get(method)
        if handler is None or (self._scenario.legacy and method in _V4_ONLY):
            return error_json(id_json, -32601, f"Method not found: {method}"), False
        try:
            result = handler(params, state)
        except RpcError as e:
            return error_json(id_json, e.code, e.message), False
        if result is None:  # undefined result: no "result" key at all
            return _head(id_json) + b"}", True
        return _head(id_json) + b',"result":' + result + b"}", True

    def handle_body(self, body: bytes) -> tuple[int, bytes]:
        """Answer one JSON-RPC HTTP body (single or batch): ``(HTTP status, response bytes)``."""
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError) as e:
            return 400, error_json(_NULL_ID, -32700, f"Parse error: {e}")
        state = self.chain_state()  # one tip for the whole batch
        if isinstance(parsed, list):
            if not parsed:
                return 400, error_json(_NULL_ID, -32600, "Invalid Request: empty batch")
            if len(parsed) > MAX_BATCH:
                return 400, error_json(
                    _NULL_ID, -32600, f"Batch request exceeds maximum allowed size of {MAX_BATCH}")
            return 200, b"[" + b",".join(self._answer(item, state)[0] for item in parsed) + b"]"
        out, ok = self._answer(parsed, state)
        return (200 if ok else 400), out

    # -- HTTP

    def render(self, request: Request) -> bytes | int:
        """Route, apply the scenario's failure mode, and answer (maybe later, for ``slow``)."""
        if request.method == b"POST":
            self.requests += 1
        for name, value in self._headers:
            request.setHeader(name, value)
        failure = self._scenario.failure
        if failure is not None:
            return self._fail(request, failure)
        if request.path == b"/status":
            if request.method != b"GET":
                return self._respond(request, 405, b"Method Not Allowed", text=True)
            if self._scenario.ready:
                return self._respond(request, 200, b"OK", text=True)
            return self._respond(request, 500, b"Internal Server Error", text=True)
        if request.path != b"/":
            return self._respond(request, 404, b"Not Found", text=True)
        if request.method != b"POST":
            return self._respond(request, 405, b"Method Not Allowed", text=True)
        return self._rpc(request)

    def _rpc(self, request: Request) -> bytes | int:
        content_type = (request.getHeader(b"content-type") or b"").split(b";", 1)[0].strip().lower()
        if content_type != b"application/json":
            return self._respond(request, 400, error_json(_NULL_ID, -32600, "Content-Type must be application/json"))
        content = request.content
        size = content.seek(0, 2)
        content.seek(0)
        if size > MAX_BODY:
            return self._respond(request, 413, error_json(_NULL_ID, -32600, "Request body too large"))
        body = content.read()
        encoding = (request.getHeader(b"content-encoding") or b"identity").strip().lower()
        if encoding in (b"gzip", b"x-gzip", b"deflate"):
            try:
                inflated = _inflate(body)
            except zlib.error as e:
                return self._respond(request, 400, error_json(_NULL_ID, -32700, f"Parse error: {e}"))
            if inflated is None:
                return self._respond(request, 413, error_json(_NULL_ID, -32600, "Request body too large"))
            body = inflated
        elif encoding != b"identity":
            return self._respond(request, 415, b"Unsupported Content-Encoding", text=True)
        status, out = self.handle_body(body)
        return self._respond(request, status, out)

    def _respond(self, request: Request, status: int, body: bytes, text: bool = False) -> bytes | int:
        """Send a response now, or after the scenario's delay without blocking the reactor."""
        request.setResponseCode(status)
        if text:
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        else:
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"vary", b"Accept-Encoding")
            if len(body) > GZIP_MIN_BYTES and _accepts_gzip(request.getHeader(b"accept-encoding")):
                # Level 1: the validator stats are megabytes and compress ~15x even so.
                body = gzip.compress(body, compresslevel=1, mtime=0)
                request.setHeader(b"content-encoding", b"gzip")
        delay = self._scenario.delay_seconds
        if delay <= 0:
            return body
        request.setHeader(b"content-length", str(len(body)).encode())
        self._hold(request, self._clock.callLater(delay, self._finish, request, body))
        return NOT_DONE_YET

    def _finish(self, request: Request, body: bytes) -> None:
        request.write(body)
        request.finish()

    def _hold(self, request: Request, call: IDelayedCall | None) -> None:
        """Keep a request open; forget it (and its pending answer) when it ends or the client leaves."""
        self._held.add(request)

        def done(_: object) -> None:
            self._held.discard(request)
            if call is not None and call.active():
                call.cancel()

        request.notifyFinish().addBoth(done)

    def _fail(self, request: Request, failure: str) -> bytes | int:
        """The broken-upstream modes a gateway must survive."""
        if failure == "500":
            return self._respond(request, 500, b"Internal Server Error", text=True)
        if failure == "garbage":
            request.setHeader(b"content-type", b"application/json")
            return b"<html><body>502 Bad Gateway</body></html>"
        if failure == "reset":
            request.channel.transport.abortConnection()
        else:  # "hang": never answer; forgotten when the client gives up
            self._hold(request, None)
        return NOT_DONE_YET


class _QuietSite(Site):
    """A Site without access logging (~90 µs per request) and without POST form parsing."""

    noisy = False

    def log(self, request: Request) -> None:
        """Access logging is off on purpose: it would dominate the simulator's cost per request."""


def simulated_site(node: SimulatedNode) -> Site:
    """The ``Site`` to listen with: quiet, and not parsing POST bodies as forms."""
    return _QuietSite(node, parsePOSTFormSubmission=False)
