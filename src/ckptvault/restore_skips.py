"""L3: what ``CheckpointManager.restore`` says about the checkpoints it does not restore.

Restoring nothing makes a training script start fresh, and a fresh run's retention then deletes the
old run's checkpoints (an invalid, unpinned one is never kept). So a skipped checkpoint is never
skipped quietly:

* each one is named in a warning (and the log) with why: its recorded failed validation, or that it
  failed verification;
* when nothing was restored but a checkpoint that was skipped *only* for a failed validation still
  verifies (every byte matches its manifest), :class:`RestoreRefusedError` is raised instead of
  returning None. A failed validation may be a real defect (the rebuilt model disagrees with the
  trained one) or a broken validation environment; either way, whether to resume from that state or
  to throw the run away is the user's call, never a silent default. ``restore(state, which=STEP)``
  loads it anyway; deleting those checkpoints (or using a new run directory) starts fresh.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from .engine.reader import verify_checkpoint
from .engine.rundir import RunDirectory
from .errors import CheckpointError
from .policy import CheckpointRecord
from .validation_ids import failure_text, result_for

logger = logging.getLogger("ckptvault")


class RestoreRefusedError(CheckpointError):
    """``restore`` found nothing it may restore, yet a checkpoint skipped only for a failed
    validation verifies: returning None would start the run afresh over it. ``skipped`` holds
    ``(name, why)`` for every checkpoint that was skipped; the message says how to proceed."""

    def __init__(self, message: str, skipped: Sequence[tuple[str, str]]) -> None:
        super().__init__(message)
        self.skipped = tuple(skipped)


@dataclass(frozen=True)
class Skip:
    """One checkpoint ``restore`` did not restore, and why."""

    record: CheckpointRecord
    why: str
    validation_only: bool  # skipped for a recorded failed validation of its id, nothing else


def why_invalid(run: RunDirectory, record: CheckpointRecord) -> Skip:
    """Why a record marked invalid is not a restore candidate (from its validation result, if any)."""
    result = result_for(run, record.name, record.checkpoint_id)
    if result is not None and result.get("passed") is False:
        return Skip(record, failure_text(result), True)
    return Skip(record, "it failed verification (marked invalid)", False)


def warn_skipped(run: RunDirectory, skip: Skip) -> None:
    """The loud part: one warning (and one log line) per skipped checkpoint."""
    text = f"restore skipped checkpoint {run.key(skip.record.name)}: {skip.why}"
    logger.warning("%s", text)
    warnings.warn(text, stacklevel=4)  # the caller of restore (through typed_os_errors)


def refuse_fresh_start(run: RunDirectory, skipped: Sequence[Skip]) -> None:
    """Raises :class:`RestoreRefusedError` when a checkpoint skipped only for a failed validation
    verifies (checked newest first, stopping at the first that does: a full re-hash each)."""
    candidates = sorted(
        (s for s in skipped if s.validation_only), key=lambda s: s.record.newness(), reverse=True
    )
    for skip in candidates:
        try:
            verifies = verify_checkpoint(run.storage, run.key(skip.record.name)).ok
        except CheckpointError:
            verifies = False
        if not verifies:
            continue
        listed = "; ".join(f"{s.record.name}: {s.why}" for s in skipped)
        raise RestoreRefusedError(
            f"{run.path}: no checkpoint passed validation, but {skip.record.name} verifies (its bytes "
            f"match its manifest) and was skipped only because its validation failed; refusing to "
            f"return None (a fresh start whose retention would delete these checkpoints). Skipped: "
            f"{listed}. To resume from it anyway: restore(state, which={skip.record.step}); to start "
            f"fresh: delete those checkpoints or use another run directory.",
            [(s.record.name, s.why) for s in skipped],
        )
