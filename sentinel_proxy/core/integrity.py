"""Integrity check of a node's validator-sentinel history: ``node_getValidatorsStats`` in, verdict out.

Pure (no I/O, no Twisted): the caller fetches and parses the answer, this module judges it. The
rules and the score scale are the Go prototype's (seed-behaviour.md, "Integrity check"), with its
defects fixed and stronger per-slot checks added; docs/integrity.md explains them to operators.

Why the history tells us something about the node: every processed slot gives the slot's proposer
one entry, and when a checkpoint (a block on 2.x) was produced every other committee member one
``attestation-*`` entry. A node whose database dropped or duplicated records shows holes and
surpluses in that grid; a node with the sentinel disabled shows nothing at all and stays
"unverified" rather than "perfect".
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sentinel_proxy.core.integrity_input import (
    ATTESTATION_PREFIX,
    MISSED,
    PRODUCED,
    UNCONFIRMED,
    IntegrityInputError,
    collect,
    History,
    optional_slot,
    show,
    proposer_kind,
)

__all__ = [
    "IntegrityParams", "EpochFinding", "IntegrityVerdict", "IntegrityInputError", "analyse",
    "proposer_kind", "PRODUCED", "UNCONFIRMED", "MISSED",
    "PERFECT", "GOOD", "BAD", "UNVERIFIED", "ARCHIVER", "PRUNED",
]

# Node statuses.
PERFECT, GOOD, BAD, UNVERIFIED = "perfect", "good", "bad", "unverified"
# Node types.
ARCHIVER, PRUNED = "archiver", "pruned"
# Epoch verdicts, best first, with the lowest score that earns each (the prototype's scale).
_EPOCH_VERDICTS: tuple[tuple[int, str], ...] = ((100, "VALID"), (90, "WARNING"), (50, "PARTIAL"), (0, "INVALID"))

MISSING_EPOCH_PENALTY = 4
#: Slot-level defects listed one by one in an epoch's rules before the rest are only counted.
SLOT_DETAIL_LIMIT = 5


@dataclass(frozen=True)
class IntegrityParams:
    """The check's configuration (SLOTS_PER_EPOCH, EXPECTED_VALIDATORS, INTEGRITY_* settings)."""

    slots_per_epoch: int = 32
    expected_validators: int = 24   # committee size; 48 on 4.x networks (configuration)
    check_epochs: int = 10          # INTEGRITY_CHECK_EPOCHS
    score_threshold: int = 95       # INTEGRITY_SCORE_THRESHOLD: score <= this -> "bad"
    archiver_threshold_epochs: int = 100

    def __post_init__(self) -> None:
        if self.slots_per_epoch < 1 or self.expected_validators < 1 or self.check_epochs < 1:
            raise ValueError("slots_per_epoch, expected_validators and check_epochs must be >= 1")
        if not 0 <= self.score_threshold <= 100:
            raise ValueError("score_threshold must be within 0..100")
        if self.archiver_threshold_epochs < 0:
            raise ValueError("archiver_threshold_epochs must be >= 0")


@dataclass(frozen=True)
class EpochFinding:
    """One analysed epoch: its score on the prototype's scale and what cost it points."""

    epoch: int
    score: int                              # 0..100
    verdict: str                            # "VALID" | "WARNING" | "PARTIAL" | "INVALID"
    validators: int                         # distinct addresses with an entry in the epoch
    proposer_entries: int
    attestation_entries: int
    counts: dict[str, int]                  # entries per status
    missing_slots: tuple[int, ...]          # slots with no proposer entry
    inconsistent_slots: tuple[int, ...]     # slots whose entries contradict the proposer status
    rules: tuple[str, ...]                  # human-readable findings

    @property
    def inconsistent(self) -> bool:
        return self.score < 100

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "score": self.score,
            "verdict": self.verdict,
            "validators": self.validators,
            "proposerEntries": self.proposer_entries,
            "attestationEntries": self.attestation_entries,
            "counts": dict(sorted(self.counts.items())),
            "missingSlots": list(self.missing_slots),
            "inconsistentSlots": list(self.inconsistent_slots),
            "rules": list(self.rules),
        }


@dataclass(frozen=True)
class IntegrityVerdict:
    """The node's verdict, with everything /health needs to explain it."""

    status: str                             # "perfect" | "good" | "bad" | "unverified"
    score: int                              # 0..100
    missing_epochs: tuple[int, ...]
    inconsistent_epochs: tuple[int, ...]
    node_type: str                          # "archiver" | "pruned" ("" if unverified)
    current_epoch: int
    total_epochs: int
    oldest_slot: int
    last_processed_slot: int
    epochs: tuple[EpochFinding, ...]        # analysed epochs
    skipped_epochs: dict[int, str]          # epoch -> why it was not scored
    findings: tuple[str, ...]               # node-level explanation lines

    def to_json(self) -> dict[str, Any]:
        """JSON-ready, camelCase; the field names of /health's integrityStats and epochStats."""
        return {
            "status": self.status,
            "score": self.score,
            "nodeType": self.node_type,
            "missingEpochs": list(self.missing_epochs),
            "inconsistentEpochs": list(self.inconsistent_epochs),
            "currentEpoch": self.current_epoch,
            "totalEpochs": self.total_epochs,
            "oldestSlot": self.oldest_slot,
            "lastProcessedSlot": self.last_processed_slot,
            "epochs": [e.to_json() for e in self.epochs],
            "skippedEpochs": [{"epoch": e, "reason": r} for e, r in sorted(self.skipped_epochs.items())],
            "findings": list(self.findings),
        }


# --------------------------------------------------------------------------- window


@dataclass(frozen=True)
class _Window:
    """The slots the sentinel is expected to hold: [start, last_processed_slot]."""

    start: int
    label: str   # what set the start, for skip reasons ("initialSlot 1234", ...)


def _window(last_processed: int, initial_slot: int | None, slot_window: int, oldest: int) -> _Window:
    """The newest of the bounds that cut the history.

    The sentinel records only slots after ``initialSlot`` and keeps ``slotWindow`` slots back from
    ``lastProcessedSlot``. Without either bound, the oldest record is taken as the start of the
    history, so that only an epoch the records begin inside counts as partial.
    """
    bounds: list[tuple[int, str]] = []
    if initial_slot is not None:
        bounds.append((initial_slot + 1, f"initialSlot {initial_slot}"))
    if slot_window > 0:
        start = max(0, last_processed - slot_window + 1)
        bounds.append((start, f"the slotWindow start {start}"))
    elif initial_slot is None:
        bounds.append((oldest, f"the oldest record (slot {oldest})"))
    start, label = max(bounds)
    return _Window(start, label)


def _skip_reason(epoch: int, current_epoch: int, window: _Window, slots_per_epoch: int) -> str | None:
    """Why an epoch with records is not scored, or None when it is scored."""
    if epoch > current_epoch:
        return "after lastProcessedSlot"
    if epoch == current_epoch:
        return "current epoch"
    first, last = epoch * slots_per_epoch, (epoch + 1) * slots_per_epoch - 1
    if last < window.start:
        return f"before {window.label}"
    if first < window.start:
        return f"partial: before {window.label}"
    return None


# --------------------------------------------------------------------------- epoch


def _round_half_up(value: float) -> int:
    """Go's math.Round for the non-negative scores the prototype rounds (Python's round() is banker's)."""
    return math.floor(value + 0.5)


def _epoch_verdict(score: int) -> str:
    return next(name for floor, name in _EPOCH_VERDICTS if score >= floor)


def _points(penalty: float) -> str:
    return f"-{penalty:.4g}"


def _list(numbers: Iterable[int]) -> str:
    return ", ".join(str(n) for n in numbers)


def _slot_kind(statuses: Sequence[str]) -> str:
    """The strongest kind among a slot's proposer entries, so entry order never matters."""
    kinds = {proposer_kind(s) for s in statuses}
    return next(k for k in (PRODUCED, UNCONFIRMED, MISSED) if k in kinds)


def _slot_defect(slot: int, statuses: Sequence[str], attestations: int, doubled: bool,
                 committee: int) -> tuple[int, int, str | None]:
    """(surplus proposer entries, attestation deviation, description or None) of one present slot."""
    attesters = committee - 1
    kind = _slot_kind(statuses)
    if kind == PRODUCED:
        deviation = abs(attestations - attesters)
    elif kind == UNCONFIRMED:
        deviation = max(0, attestations - attesters)
    else:
        deviation = attestations
    problems = []
    if len(statuses) > 1:
        problems.append(f"{len(statuses)} proposer entries ({', '.join(sorted(statuses))})")
    if deviation:
        expected = {PRODUCED: f"{attesters}", UNCONFIRMED: f"at most {attesters}", MISSED: "0"}[kind]
        problems.append(f"{'/'.join(sorted(set(statuses)))} with {attestations} attestation entries, expected {expected}")
    if doubled:
        problems.append("a validator with several entries")
    description = f"slot {slot}: " + "; ".join(problems) if problems else None
    return len(statuses) - 1, deviation, description


def _analyse_epoch(epoch: int, history: History, params: IntegrityParams) -> EpochFinding:
    """Score one complete epoch: the prototype's four rules, evaluated slot by slot.

    Slot by slot, the proposer rule counts slots without a proposer entry plus surplus proposer
    entries, and the attestation rule sums each slot's deviation from what its proposer status
    promises. For a history whose only defects are of one sign this is exactly the prototype's
    |records − expected|; unlike it, a hole and a surplus elsewhere in the epoch do not cancel.
    """
    spe, committee = params.slots_per_epoch, params.expected_validators
    counts = history.epoch_counts[epoch]
    validators = len(history.epoch_validators[epoch])
    proposer_entries = sum(n for s, n in counts.items() if not s.startswith(ATTESTATION_PREFIX))
    attestation_entries = sum(counts.values()) - proposer_entries
    # The prototype's "no missed block"; an unconfirmed checkpoint leaves attesters out just the same.
    nothing_missed = all(proposer_kind(s) in (None, PRODUCED) for s in counts)

    missing: list[int] = []
    inconsistent: list[int] = []
    details: list[str] = []
    surplus = deviation = 0
    for slot in range(epoch * spe, (epoch + 1) * spe):
        statuses = history.proposers.get(slot)
        attestations = history.attestations.get(slot, 0)
        if not statuses:
            missing.append(slot)
            deviation += attestations  # attestations of a slot nobody proposed in
            continue
        extra, off, description = _slot_defect(slot, statuses, attestations, slot in history.doubled_slots,
                                               committee)
        surplus += extra
        deviation += off
        if description:
            inconsistent.append(slot)
            details.append(description)

    score = 100.0
    rules: list[str] = []
    if validators > committee:
        score -= 40
        rules.append(f"{validators} distinct validators > {committee} expected ({_points(40)})")
    proposer_diff = len(missing) + surplus
    if proposer_diff:
        penalty = 30 * proposer_diff / spe
        score -= penalty
        if missing and surplus:  # both at once can leave the count right: say what is wrong
            rules.append(f"proposer entries {proposer_entries} for {spe} slots: {len(missing)} missing,"
                         f" {surplus} surplus ({_points(penalty)})")
        else:
            rules.append(f"proposer entries {proposer_entries} != {spe} slots ({_points(penalty)})")
    if deviation:
        penalty = 25 * deviation / (spe * committee)
        score -= penalty
        rules.append(f"attestation entries off by {deviation} from what the proposer statuses promise"
                     f" ({_points(penalty)})")
    if nothing_missed and validators < committee:
        penalty = 20 * (committee - validators) / committee
        score -= penalty
        rules.append(f"{validators} distinct validators < {committee} expected, no missed slot ({_points(penalty)})")
    if missing:
        rules.append(f"missing slots {_list(missing)} (no proposer entry)")
    rules.extend(details[:SLOT_DETAIL_LIMIT])
    if len(details) > SLOT_DETAIL_LIMIT:
        rules.append(f"... and {len(details) - SLOT_DETAIL_LIMIT} more inconsistent slots")

    final = max(0, _round_half_up(score))
    if final == 100 and (missing or inconsistent):
        final = 99  # a defect too small to survive rounding still marks the epoch
        rules.insert(0, "slot defects worth less than half a point: score held at 99")
    return EpochFinding(
        epoch=epoch, score=final, verdict=_epoch_verdict(final), validators=validators,
        proposer_entries=proposer_entries, attestation_entries=attestation_entries, counts=dict(counts),
        missing_slots=tuple(missing), inconsistent_slots=tuple(inconsistent), rules=tuple(rules),
    )


# --------------------------------------------------------------------------- node


def _node_status(score: int, threshold: int) -> str:
    if score == 100:
        return PERFECT
    return GOOD if score > threshold else BAD


def _unverified(reason: str, *, current_epoch: int = 0, total_epochs: int = 0, oldest_slot: int = 0,
                last_processed: int = 0, skipped: Mapping[int, str] | None = None) -> IntegrityVerdict:
    return IntegrityVerdict(
        status=UNVERIFIED, score=0, missing_epochs=(), inconsistent_epochs=(), node_type="",
        current_epoch=current_epoch, total_epochs=total_epochs, oldest_slot=oldest_slot,
        last_processed_slot=last_processed, epochs=(), skipped_epochs=dict(skipped or {}), findings=(reason,),
    )


def _missing_epochs(first_kept: int, current_epoch: int, history: History, window: _Window,
                    slots_per_epoch: int) -> list[int]:
    """Epochs without a single record from the first kept epoch up to the current one (excluded).

    Only epochs wholly inside the window count: the gap a restart leaves before ``initialSlot`` is
    normal (the sentinel does not backfill). Covering the epochs after the newest record as well
    catches a sentinel that keeps advancing ``lastProcessedSlot`` but records nothing.
    """
    return [e for e in range(first_kept + 1, current_epoch)
            if e not in history.epoch_counts and e * slots_per_epoch >= window.start]


def _explain(analysed: Sequence[EpochFinding], mean: int, missing: Sequence[int], skipped: Mapping[int, str],
             score: int, status: str, node_type: str, total_epochs: int, params: IntegrityParams) -> list[str]:
    """The node-level lines /health shows, in the order the score is built."""
    if analysed:
        lines = [f"analysed {len(analysed)} epochs ({_list(e.epoch for e in analysed)}): mean score {mean}"]
    else:
        lines = ["no complete epoch with records to analyse: mean score taken as 100"]
    lines += [f"epoch {e.epoch}: {e.score} {e.verdict}: {'; '.join(e.rules)}" for e in analysed if e.inconsistent]
    if missing:
        lines.append(f"missing epochs {_list(missing)}: no record inside the history window"
                     f" ({_points(MISSING_EPOCH_PENALTY * len(missing))})")
    lines += [f"epoch {epoch} not scored: {reason}" for epoch, reason in sorted(skipped.items())]
    lines.append(f"score {score}: {status} (threshold {params.score_threshold})")
    lines.append(f"{node_type}: {total_epochs} epochs of history (archiver above {params.archiver_threshold_epochs})")
    return lines


def analyse(stats: Mapping[str, Any], params: IntegrityParams) -> IntegrityVerdict:
    """Judge one node from its ``node_getValidatorsStats`` result (as parsed by json.loads).

    Raises IntegrityInputError when the answer is not shaped like validator stats.
    """
    if not isinstance(stats, Mapping):
        raise IntegrityInputError(f"validator stats: expected an object, got {show(stats)}")
    validators = stats.get("stats")
    if not isinstance(validators, Mapping):
        raise IntegrityInputError(f"validator stats: 'stats' is not an object, got {show(validators)}")
    last_processed_raw = optional_slot(stats, "lastProcessedSlot")
    initial_slot = optional_slot(stats, "initialSlot")
    slot_window = optional_slot(stats, "slotWindow") or 0
    spe = params.slots_per_epoch

    history = collect(validators, spe)
    slots = history.slots
    if not slots:
        if not validators and slot_window == 0:
            return _unverified("sentinel disabled on the node (empty stats, slotWindow 0): set SENTINEL_ENABLED=true"
                               " on the node to have its history verified")
        return _unverified("no validator history: the node's sentinel has not recorded any slot yet",
                           last_processed=last_processed_raw or 0,
                           current_epoch=(last_processed_raw or 0) // spe, oldest_slot=last_processed_raw or 0)

    last_processed = max(slots) if last_processed_raw is None else last_processed_raw
    current_epoch = last_processed // spe
    oldest_record = min(slots)
    oldest_slot = min(oldest_record, last_processed)
    total_epochs = len(history.epoch_counts)
    window = _window(last_processed, initial_slot, slot_window, oldest_record)

    epochs_with_records = sorted(history.epoch_counts)
    kept = [e for e in epochs_with_records if e <= current_epoch][-params.check_epochs:]
    skipped: dict[int, str] = {}
    analysed: list[EpochFinding] = []
    for epoch in kept + [e for e in epochs_with_records if e > current_epoch]:
        reason = _skip_reason(epoch, current_epoch, window, spe)
        if reason is None:
            analysed.append(_analyse_epoch(epoch, history, params))
        else:
            skipped[epoch] = reason
    missing = _missing_epochs(kept[0], current_epoch, history, window, spe) if kept else []

    if not analysed and not missing:
        return _unverified(
            f"no complete epoch to score yet: history window starts at slot {window.start} ({window.label}),"
            f" current epoch {current_epoch}",
            current_epoch=current_epoch, total_epochs=total_epochs, oldest_slot=oldest_slot,
            last_processed=last_processed, skipped=skipped)

    mean = sum(e.score for e in analysed) // len(analysed) if analysed else 100
    score = max(0, mean - MISSING_EPOCH_PENALTY * len(missing))
    status = _node_status(score, params.score_threshold)
    node_type = ARCHIVER if total_epochs > params.archiver_threshold_epochs else PRUNED
    inconsistent = [e for e in analysed if e.inconsistent]

    findings = _explain(analysed, mean, missing, skipped, score, status, node_type, total_epochs, params)
    if last_processed_raw is None:
        findings.insert(0, f"no lastProcessedSlot in the answer: using the newest record, slot {last_processed}")

    return IntegrityVerdict(
        status=status, score=score, missing_epochs=tuple(missing),
        inconsistent_epochs=tuple(e.epoch for e in inconsistent), node_type=node_type,
        current_epoch=current_epoch, total_epochs=total_epochs, oldest_slot=oldest_slot,
        last_processed_slot=last_processed, epochs=tuple(analysed), skipped_epochs=skipped,
        findings=tuple(findings),
    )
