"""Host staging for asynchronous saves: the only copy the training loop waits for.

A state larger than the budget (``max_staging_bytes``) is staged in pieces through a ring of slots
(:func:`feed_plan`, engine/feed.py): the loop then also waits for the bytes beyond the budget to be
written, and memory stays within the budget.

The plan of a save already names every byte range to write, with shared storage stored once, so
staging is one memcpy per stored tensor into a single host buffer that is kept and reused by the
next save (allocating and first-touching fresh memory costs far more than the copy on the machines
we measure). After staging, the plan no longer points into the live state: training may update
the weights while the background thread hashes, writes and commits.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import CheckpointError
from .arrays import Blob
from .feed import PieceFeed
from .writer import SavePlan


class StagingBudgetError(CheckpointError):
    """The state is larger than the staging budget (``max_staging_bytes``)."""


class StagingBuffer:
    """A reusable host buffer; grows to the largest state staged, never beyond the budget."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self._buffer: np.ndarray = np.empty(0, dtype=np.uint8)

    @property
    def capacity(self) -> int:
        return int(self._buffer.nbytes)

    def reserve(self, nbytes: int) -> np.ndarray:
        if self.max_bytes is not None and nbytes > self.max_bytes:
            raise StagingBudgetError(
                f"state of {nbytes} bytes exceeds the staging budget of {self.max_bytes} bytes"
            )
        if nbytes > self._buffer.nbytes:
            self._buffer = np.empty(nbytes, dtype=np.uint8)
        return self._buffer[:nbytes]

    def release(self) -> None:
        self._buffer = np.empty(0, dtype=np.uint8)


MAX_SLOT_BYTES = 64 * 1024 * 1024
MIN_SLOT_BYTES = 4096


def staged_bytes(plan: SavePlan) -> int:
    """Bytes an async save must copy out of the live state (unchanged chunked tensors excluded)."""
    return sum(blob.nbytes for blob in plan.write_order())


def fits(plan: SavePlan, buffer: StagingBuffer) -> bool:
    return buffer.max_bytes is None or staged_bytes(plan) <= buffer.max_bytes


def feed_plan(plan: SavePlan, buffer: StagingBuffer) -> SavePlan:
    """A copy of ``plan`` that is staged in pieces through ``buffer`` (see engine/feed.py).

    The caller submits the commit of the returned plan to the background first, then calls
    ``plan.feed.produce()`` in the loop's thread.
    """
    budget = buffer.max_bytes
    assert budget is not None
    unit = plan.chunking.chunk_bytes if plan.chunking is not None and plan.chunked else MIN_SLOT_BYTES
    slot = max(unit, min(MAX_SLOT_BYTES, budget // 4) // unit * unit)
    if budget // slot < 2:
        raise StagingBudgetError(
            f"a staging budget of {budget} bytes is too small to stage in pieces: give at least "
            f"{2 * unit} bytes (two pieces of {unit})"
        )
    slots = min(budget // slot, -(-staged_bytes(plan) // slot) + 1)
    area = buffer.reserve(max(2, slots) * slot)
    return dataclasses.replace(plan, feed=PieceFeed(area, slot, plan.write_order()))


def stage_plan(plan: SavePlan, buffer: StagingBuffer) -> SavePlan:
    """A copy of ``plan`` whose blobs live in ``buffer`` instead of the state's memory.

    The buffer must not be reused until the returned plan is committed (one save in flight).
    """
    # Chunked tensors a hint proved unchanged are not written, so they need no copy either.
    fresh = [c for c in plan.chunked if c.reuse is None]
    total = sum(blob.nbytes for shard in plan.shards for blob in shard) + sum(c.nbytes for c in fresh)
    area = buffer.reserve(total)
    cursor = 0

    def copy(blob: Blob) -> Blob:
        nonlocal cursor
        end = cursor + blob.nbytes
        target = area[cursor:end]
        if blob.nbytes:
            target[:] = np.frombuffer(blob.data, dtype=np.uint8)
        cursor = end
        return dataclasses.replace(blob, data=memoryview(target.data), owner=area)

    shards = [[copy(blob) for blob in shard] for shard in plan.shards]
    chunked = [c if c.reuse is not None else dataclasses.replace(c, blob=copy(c.blob)) for c in plan.chunked]
    return dataclasses.replace(plan, shards=shards, chunked=chunked)
