"""L3: ``restore`` inside a torch.distributed job: the coordinator chooses, every rank loads.

The coordinator lists the candidates exactly as a single-process restore would (newest first, the
best, or a given step; mirror pull included) and shares them; every rank then loads the first one
through :func:`ckptvault.distributed.load`, which reads -- and verifies -- only the blocks this
rank's shards need. A candidate that fails to load fails on every rank at once (DCP's collectives
carry the failure), so all ranks move on to the next one together, and the coordinator marks it
invalid. Nothing is ever restored on some ranks and not on others.

Rank-local parts (RNG states, data position) come back to the rank that saved them. Restored at a
different world size, a rank with no saved part keeps its own streams and the coordinator names
the saved parts no rank took: both are logged and warned, never silent.
"""

from __future__ import annotations

import time
import warnings
from typing import Literal

from ..distributed.api import load as load_distributed
from ..distributed.commit import DistributedCheckpointError
from ..distributed.reader import planner_paths
from ..errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ..training.sharded_state import RANKS_KEY, expect_saved, restore_sharded, sharded_tree
from ..training.state import TrainState
from ..types import CheckpointInfo
from .book import RunBook, logger
from .ranks import RankGroup
from .records import checkpoint_info
from .restore import restore_candidates

_LOAD_FAILURES = (DistributedCheckpointError, CorruptCheckpointError, CheckpointNotFoundError)


def restore_ranks(
    book: RunBook,
    ranks: RankGroup,
    state: TrainState,
    which: Literal["latest", "best"] | int,
    *,
    partial: bool,
) -> CheckpointInfo | None:
    """The distributed body of ``CheckpointManager.restore`` (see the module docstring)."""
    run = book.run
    plan: list[tuple[str, str, list[int]]] | str | None = None
    if ranks.is_coordinator:
        try:
            _, candidates = restore_candidates(book, which)
            explicit = not isinstance(which, str)
            plan = [
                (r.name, r.scope, _saved_ranks(run.checkpoint(r.name)))
                for r in candidates
                if r.valid or explicit
            ]
        except CheckpointError as exc:  # shared, so every rank raises it, not only this one
            plan = f"{type(exc).__name__}: {exc}"
    plan = ranks.share(plan)
    if isinstance(plan, str):
        raise CheckpointNotFoundError(plan)
    for name, scope, saved in plan or []:
        template = sharded_tree(state, scope, ranks.rank)
        if ranks.rank not in saved:
            template.pop(RANKS_KEY, None)
        else:  # keys of its own part this rank's template lacks (metrics history columns)
            expect_saved(template, _paths(run.checkpoint(name)), ranks.rank)
        try:
            load_distributed(template, run.checkpoint(name))
        except _LOAD_FAILURES as exc:
            if ranks.is_coordinator:
                book.mark_valid(name, False)
                _loud(f"restore skipped checkpoint {run.key(name)}: it fails to load: {exc}")
            continue
        missing = restore_sharded(state, template, ranks.rank, partial=partial)
        for text in missing:
            _loud(f"rank {ranks.rank} restored {run.key(name)} without {text}")
        orphans = sorted(set(saved) - set(range(ranks.world)))
        if ranks.is_coordinator and orphans:
            _loud(f"{run.key(name)}: rank(s) {orphans} saved parts (a larger world) that no rank restored")
        for stream in book.streams.values():
            stream.state.last_save_step = state.step
            stream.state.last_save_epoch = state.epoch
            stream.state.last_save_time = time.time()
        info = None
        if ranks.is_coordinator:
            book.mark_valid(name, True)
            info = checkpoint_info(run, name)
        shared: CheckpointInfo | None = ranks.share(info)
        return shared
    return None


def _paths(target: str) -> list[tuple[object, ...]]:
    """The saved keys' paths (none when they cannot be read: the load then fails as it would)."""
    try:
        return list(planner_paths(target).values())
    except CheckpointError:
        return []


def _saved_ranks(target: str) -> list[int]:
    """The ranks whose own parts a checkpoint holds (empty when it cannot be read: the load then
    fails on every rank and the candidate is skipped)."""
    try:
        paths = planner_paths(target)
    except CheckpointError:
        return []
    found = {p[1] for p in paths.values() if len(p) > 1 and p[0] == RANKS_KEY}
    return sorted(int(r) for r in found if isinstance(r, str) and r.isdigit())


def _loud(text: str) -> None:
    logger.warning("%s", text)
    warnings.warn(text, stacklevel=4)
