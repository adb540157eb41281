"""L3: ``CheckpointManager.restore``, and what it says about the checkpoints it does not restore.

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
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..engine.rundir import RunDirectory
from ..engine.verify import verify_checkpoint
from ..errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ..policy import CheckpointRecord
from ..training.state import FULL, WEIGHTS, TrainState
from ..types import CheckpointInfo
from .book import RunBook
from .records import checkpoint_info, load_checkpoint, record_from_info
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
    warnings.warn(text, stacklevel=5)  # the caller of restore (through typed_os_errors)


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


def pull_from_mirror(book: RunBook, step: int | None) -> None:
    """A fresh machine (an empty local run) with a mirror: the newest checkpoint the mirror holds
    (full scope first; ``step``'s when given) is copied in, verified, and booked like a local one,
    so the restore below loads it and the run continues here (its next saves are mirrored again)."""
    assert book.mirror is not None
    for scope in (FULL, WEIGHTS):
        pulled = book.mirror.pull(scope, step)
        if pulled is not None:
            info = checkpoint_info(book.run, pulled.name)
            book.records[pulled.name] = record_from_info(pulled.name, info)
            book.confirmed.add(pulled.name)
            book.write_index()
            return


def restore_candidates(
    book: RunBook, which: Literal["latest", "best"] | int
) -> tuple[str, list[CheckpointRecord]]:
    """The scope restore reads and its candidates, preferred first (pulled from the mirror first
    when the local run is empty); a step with no checkpoint raises CheckpointNotFoundError."""
    if not book.records and book.mirror is not None:
        pull_from_mirror(book, which if isinstance(which, int) else None)
    scope = FULL if any(r.scope == FULL for r in book.records.values()) else WEIGHTS
    if which == "latest":
        return scope, list(reversed(book.checkpoints(scope)))  # invalid ones: skipped, loudly
    if which == "best":
        best = book.best_record(scope)
        return scope, [best] if best else []
    candidates = [r for r in book.records.values() if r.step == int(which) and r.scope == scope]
    if not candidates:
        raise CheckpointNotFoundError(f"{book.run.path}: no {scope} checkpoint at step {which}")
    return scope, candidates


def restore_from(
    book: RunBook, state: TrainState, which: Literal["latest", "best"] | int, *, partial: bool
) -> CheckpointInfo | None:
    """The body of :meth:`CheckpointManager.restore <ckptvault.manager.CheckpointManager.restore>`:
    the newest (or best, or given) checkpoint that verifies, restored into ``state``; each skip
    reported, and a silent fresh start refused (:func:`refuse_fresh_start`)."""
    run = book.run
    scope, candidates = restore_candidates(book, which)
    explicit = not isinstance(which, str)
    skipped: list[Skip] = []
    for record in candidates:
        if not record.valid and not explicit:
            skip = why_invalid(run, record)
            if skip.validation_only:
                skipped.append(skip)
                warn_skipped(run, skip)
                continue
            # Marked invalid with no failed validation of this id on record (an index entry, an
            # earlier failed read): the bytes decide, and the load verifies every one of them.
        try:
            tree = load_checkpoint(run, record.name)
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            skipped.append(Skip(record, f"it fails verification: {exc}", False))
            warn_skipped(run, skipped[-1])
            book.mark_valid(record.name, False)
            continue
        book.mark_valid(record.name, True)  # verified now
        state.restore(tree, partial=partial)
        for stream in book.streams.values():
            stream.state.last_save_step = state.step
            stream.state.last_save_epoch = state.epoch
            stream.state.last_save_time = time.time()
        return checkpoint_info(run, record.name)
    if not explicit:
        reported = {s.record.name for s in skipped}
        for record in book.checkpoints(scope):  # ("best" never had the invalid ones as candidates)
            if not record.valid and record.name not in reported:
                skipped.append(why_invalid(run, record))
                warn_skipped(run, skipped[-1])
        refuse_fresh_start(run, skipped)
    return None
