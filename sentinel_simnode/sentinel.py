"""The validator sentinel: ``getValidatorsStats`` of a simulated node, per dialect.

Per processed slot of the window the proposer gets one entry and, unless nothing was proposed, every
other committee member an ``attestation-*`` entry.  Only the proposer's status names differ between
versions: 2.x/3.x ``block-*``, 4.x ``checkpoint-mined | -proposed | -missed``, 5.x
``checkpoint-mined | -valid | -missed`` (``checkpoint-proposed`` is gone in 5.x; see
``docs/aztec-protocol.md``).
"""

from __future__ import annotations

from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from sentinel_simnode.chain import (
    GENESIS_TIME,
    ChainParams,
    Scenario,
    dropped_slots,
    dumps,
    initial_slot,
    slot_outcome,
    validator_address,
)

#: Proposer status per slot outcome ("mined", "proposed" = attested but not mined, "missed").
STATUS_NAMES: dict[str, dict[str, str]] = {
    "legacy": {"mined": "block-mined", "proposed": "block-proposed", "missed": "block-missed"},
    "4": {"mined": "checkpoint-mined", "proposed": "checkpoint-proposed", "missed": "checkpoint-missed"},
    "5": {"mined": "checkpoint-mined", "proposed": "checkpoint-valid", "missed": "checkpoint-missed"},
}


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


def validators_stats(
    params: ChainParams, scenario: Scenario, last_processed_slot: int, dialect: str = "4"
) -> dict[str, Any]:
    """The ``node_getValidatorsStats`` result for a node whose sentinel processed up to that slot.

    Per processed slot in the window: the proposer's entry, and ``committee_size - 1`` attestation
    entries unless the proposal was missed.  The history entry dicts of one slot are shared between
    validators (JSON output is the same), which keeps a 128-epoch archiver window cheap to build.
    """
    if not scenario.sentinel_enabled:
        return {"stats": {}, "slotWindow": 0}
    legacy = scenario.legacy
    names = STATUS_NAMES["legacy" if legacy else dialect]
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


def validators_stats_json(
    params: ChainParams, scenario: Scenario, last_processed_slot: int, dialect: str = "4"
) -> bytes:
    """Serialised ``validators_stats``, built once per processed slot and shared by all nodes alike."""
    return _stats_json(params, scenario, last_processed_slot, "4" if scenario.legacy else dialect)


@lru_cache(maxsize=8)
def _stats_json(params: ChainParams, scenario: Scenario, last_processed_slot: int, dialect: str) -> bytes:
    return dumps(validators_stats(params, scenario, last_processed_slot, dialect)).encode()
