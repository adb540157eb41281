"""L3: validation results bound to the checkpoint id they checked.

A run names its checkpoints by step, and a same-step re-save (``save`` twice at one step, a retried
preemption save) puts a *different* checkpoint under the *same* name while the background validation
of the first may still be reading it. What that validation sees -- files vanishing under it, or the
new checkpoint's files -- says nothing about either checkpoint, so:

* :func:`validate_bound` checks one checkpoint *id*: it records a result only when the path held that
  id both before and after the check; otherwise the outcome is stale and is dropped (the new
  checkpoint gets its own validation, submitted by its own commit);
* :func:`result_for` returns a recorded result only for the id it names: a result of an older
  checkpoint of the same name is never taken for the current one's.

Checkpoint ids are random per save, so "same id before and after" means the same bytes throughout.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .. import api, validation
from ..engine.rundir import RunDirectory
from ..errors import CheckpointError, CheckpointNotFoundError


def current_id(path: str | os.PathLike[str]) -> str | None:
    """The id of the checkpoint now at ``path`` (from its manifest), or None when there is none."""
    try:
        return api.info(path).checkpoint_id
    except CheckpointError:
        return None


def validate_bound(path: str, level: str, checkpoint_id: str) -> validation.ValidationResult | None:
    """Validates the checkpoint ``checkpoint_id`` at ``path`` and records the result beside it.

    Returns None -- and records nothing -- when the path no longer holds that checkpoint (deleted by
    retention, or replaced by a same-name save, before or while it was checked). An exception from the
    check itself (a broken validation environment) is a failed result of that id, recorded, as long as
    the checkpoint is still the one that was asked for.
    """
    try:
        result = validation.validate(path, level)
    except CheckpointNotFoundError:
        return None
    except Exception as exc:  # the environment failed, or the checkpoint changed under the check
        result = validation.ValidationResult(
            path,
            level,
            level,
            False,
            (f"{type(exc).__name__}: {exc}",),
            finished_at=time.time(),
            checkpoint_id=checkpoint_id,
        )
    if result.checkpoint_id != checkpoint_id or current_id(path) != checkpoint_id:
        return None  # stale: another checkpoint is (or was, during the check) at this path
    validation.record_result(result)
    return result


def result_for(run: RunDirectory, name: str, checkpoint_id: str) -> dict[str, Any] | None:
    """The recorded validation result of checkpoint ``checkpoint_id`` (named ``name`` in ``run``);
    None when there is none, or the recorded one belongs to another checkpoint of that name (or
    names none)."""
    if not checkpoint_id:
        return None
    result = run.read_validation(name)
    if result is None or result.get("checkpoint_id") != checkpoint_id:
        return None
    return result


def failure_text(result: dict[str, Any]) -> str:
    """The text "failed full validation: <problems>" for a recorded failed result (shortened)."""
    problems = result.get("problems")
    shown = "; ".join(str(p)[:300] for p in problems[:3]) if isinstance(problems, list) else ""
    if isinstance(problems, list) and len(problems) > 3:
        shown += f"; and {len(problems) - 3} more"
    return f"failed {result.get('level', '?')} validation: {shown or 'no details recorded'}"


class BackgroundValidator:
    """One background thread that validates committed checkpoints in order (the manager's); results
    are collected by the loop's thread with :meth:`drain`. Never blocks the caller of :meth:`submit`.
    Only results that still belong to the checkpoint at their path come back (:func:`validate_bound`)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[Future[validation.ValidationResult | None]] = []

    def submit(self, path: str, level: str, checkpoint_id: str) -> None:
        """Validates checkpoint ``checkpoint_id`` at ``path``; a stale outcome (the path holds
        another checkpoint by then) is dropped."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptvault-validate")
        self._futures.append(self._pool.submit(validate_bound, path, level, checkpoint_id))

    def drain(self) -> list[validation.ValidationResult]:
        done = [f for f in self._futures if f.done()]
        self._futures = [f for f in self._futures if not f.done()]
        return [result for f in done if (result := f.result()) is not None]

    def join(self) -> None:
        for future in list(self._futures):
            future.exception()

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
