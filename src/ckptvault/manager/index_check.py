"""L3: the run index is checked against the manifests it summarises before retention deletes.

``.ckptvault-index.json`` is derived data: a summary of each checkpoint's manifest (step, epoch,
commit time, scope, metrics, id) plus whether it was found invalid. Anyone who can write the run
directory can edit it, and a crash can leave it stale. Retention decides over these records, so an
entry that lies (a worse metric for the best checkpoint, an older step for the newest, ``valid:
false`` for a good one) could make it delete exactly what the manifests say to keep.

The rule: a record is *confirmed* once its facts come from the manifest itself (read here, or written
by this process's own commit). Before a retention pass deletes anything, every unconfirmed record of
the scope is confirmed -- all of them, not only the doomed ones, because one inflated metric elsewhere
can displace the true best. Cost: one manifest read per checkpoint, once per process, and only when
something is about to be deleted; plus a full verification of a checkpoint the index calls invalid
without other evidence (a failed validation of its id, or a manifest that no longer decodes).

A disagreement is corrected from the manifest (the caller rewrites the index) and reported; a record
that cannot be confirmed now (unreadable, newer format) stops deletion for this pass.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from ..engine.rundir import RunDirectory
from ..engine.verify import verify_checkpoint
from ..errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ..policy import CheckpointRecord
from ..types import CheckpointInfo
from .records import checkpoint_info
from .validation_ids import result_for

logger = logging.getLogger("ckptvault")

Derive = Callable[[str, CheckpointInfo, float], CheckpointRecord]


@dataclass
class Confirmation:
    """The outcome of :func:`confirm_records`."""

    records: dict[str, CheckpointRecord] = field(default_factory=dict)  # confirmed, corrected
    gone: list[str] = field(default_factory=list)  # no longer a checkpoint: drop the record
    corrections: list[str] = field(default_factory=list)  # what the index said wrongly, for humans
    unconfirmed: list[str] = field(default_factory=list)  # cannot be checked now: delete nothing


def confirm_records(run: RunDirectory, records: Iterable[CheckpointRecord], derive: Derive) -> Confirmation:
    """Re-reads each record's manifest and returns records built from it (pins kept as given)."""
    outcome = Confirmation()
    listed = {entry.name: entry.modified for entry in run.checkpoints()}
    for record in records:
        try:
            info = checkpoint_info(run, record.name)
        except CheckpointNotFoundError:
            outcome.gone.append(record.name)
            continue
        except CorruptCheckpointError:  # the manifest itself is damaged: invalid, as when loading
            truth = dataclasses.replace(record, metrics={}, valid=False, checkpoint_id="")
            _compare(record, truth, outcome)
            continue
        except CheckpointError as exc:  # unreadable here and now (storage, newer format): not proven
            outcome.unconfirmed.append(f"{record.name} ({type(exc).__name__}: {exc})")
            continue
        truth = dataclasses.replace(
            derive(record.name, info, listed.get(record.name, 0.0)),
            pinned=record.pinned,
            valid=_valid(run, record, info),
        )
        _compare(record, truth, outcome)
    return outcome


def confirm_scope(
    run: RunDirectory,
    records: dict[str, CheckpointRecord],
    confirmed: set[str],
    scope: str,
    derive: Derive,
) -> tuple[bool, bool]:
    """Confirms the unconfirmed records of ``scope`` in place (``records`` corrected, ``confirmed``
    grown); each correction is logged and warned. Returns ``(all_confirmed, changed)``: delete
    nothing unless ``all_confirmed``; rewrite the index when ``changed``."""
    pending = [r for r in records.values() if r.scope == scope and r.name not in confirmed]
    outcome = confirm_records(run, pending, derive)
    for name in outcome.gone:
        records.pop(name, None)
    records.update(outcome.records)
    confirmed.update(outcome.records)
    for text in outcome.corrections:
        logger.warning("run index disagrees with the manifests, corrected: %s", text)
        warnings.warn(f"run index disagrees with the manifests, corrected: {text}", stacklevel=5)
    if outcome.unconfirmed:
        text = "retention skipped: cannot check against their manifests: " + "; ".join(outcome.unconfirmed)
        logger.warning("%s", text)
        warnings.warn(text, stacklevel=5)
    return not outcome.unconfirmed, bool(outcome.corrections or outcome.gone)


def _valid(run: RunDirectory, record: CheckpointRecord, info: CheckpointInfo) -> bool:
    """Whether the checkpoint is valid, as far as evidence goes. ``valid: true`` is believed (a
    failed validation of this id was applied when the run was opened); ``valid: false`` needs a
    failed validation of this id or a failed verification (a full re-hash: rare, and bounded by
    the bytes stored)."""
    if record.valid:
        return True
    result = result_for(run, record.name, info.checkpoint_id)
    if result is not None and result.get("passed") is False:
        return False
    try:
        return verify_checkpoint(run.storage, run.checkpoint(record.name)).ok
    except CheckpointError:
        return False


def _compare(claimed: CheckpointRecord, truth: CheckpointRecord, outcome: Confirmation) -> None:
    differences = [
        f"{name} {before!r} (manifest: {after!r})"
        for name, before, after in (
            ("step", claimed.step, truth.step),
            ("epoch", claimed.epoch, truth.epoch),
            ("created", claimed.created, truth.created),
            ("scope", claimed.scope, truth.scope),
            ("valid", claimed.valid, truth.valid),
        )
        if before != after
    ]
    if not _same_metrics(claimed.metrics, truth.metrics):
        differences.append(f"metrics {dict(claimed.metrics)!r} (manifest: {dict(truth.metrics)!r})")
    if claimed.checkpoint_id and claimed.checkpoint_id != truth.checkpoint_id:
        differences.append(f"checkpoint id {claimed.checkpoint_id!r} (manifest: {truth.checkpoint_id!r})")
    if differences:
        outcome.corrections.append(f"{claimed.name}: the index said " + ", ".join(differences))
    outcome.records[claimed.name] = truth


def _same_metrics(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """Equal metric dicts, NaN equal to NaN (the index stores NaN as text and reads it back)."""
    if a.keys() != b.keys():
        return False
    return all(_same_number(a[key], b[key]) for key in a)


def _same_number(x: float, y: float) -> bool:
    return x == y or (math.isnan(x) and math.isnan(y))
