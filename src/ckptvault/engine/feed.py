"""Staging in pieces: a state larger than the staging budget flows through a ring of slots.

The training loop's thread (the *producer*) copies the state's bytes, in exactly the order the
background commit consumes them, into fixed-size slots of one reused buffer; the background commit
(the *consumer*) writes and hashes each piece and hands its slot back. The loop waits only when
every slot is full, so it is blocked for ``max(copy time, time to write what exceeds the budget)``
and staging memory never exceeds the budget. When the consumer fails, the producer is woken and
stops; when the producer fails (or is interrupted), the consumer raises and the save is aborted.
Nothing reaches the commit unless every byte went through.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .arrays import Blob


class FeedAborted(Exception):
    """The other side of a feed failed; the save is abandoned."""


@dataclass
class _Piece:
    blob: int  # index into the feed's blob order
    start: int  # byte range of the blob
    end: int
    slot: int
    offset: int  # where in the slot


class PieceFeed:
    """Slots of ``slot_bytes`` carved from ``area``; pieces are cut from blobs at ``slot_bytes``
    boundaries (so a chunk of a chunked tensor never straddles two pieces) and packed into slots."""

    def __init__(self, area: np.ndarray, slot_bytes: int, blobs: list[Blob]) -> None:
        self.slot_bytes = slot_bytes
        self.nslots = area.size // slot_bytes
        if self.nslots < 2:
            raise ValueError("a feed needs at least two slots")
        self._slots = [area[i * slot_bytes : (i + 1) * slot_bytes] for i in range(self.nslots)]
        self._blobs = blobs
        self._index = {id(b): i for i, b in enumerate(blobs)}
        self._cond = threading.Condition()
        self._free: deque[int] = deque(range(self.nslots))
        self._ready: deque[_Piece] = deque()
        self._refs = [0] * self.nslots  # pieces of each slot not yet consumed
        self._failed: BaseException | None = None
        self._finished = False

    # -- producer (the training loop's thread) --------------------------------------------------
    def produce(self) -> None:
        """Copies every blob into slots, waiting for free ones; returns once all bytes are staged."""
        try:
            slot, used = -1, self.slot_bytes
            for index, blob in enumerate(self._blobs):
                source = np.frombuffer(blob.data, dtype=np.uint8) if blob.nbytes else None
                for start in range(0, blob.nbytes, self.slot_bytes):
                    end = min(start + self.slot_bytes, blob.nbytes)
                    if used + (end - start) > self.slot_bytes:
                        self._publish_slot(slot)
                        slot, used = self._take_slot(), 0
                    assert source is not None
                    self._slots[slot][used : used + end - start] = source[start:end]
                    with self._cond:
                        self._refs[slot] += 1
                        self._pending.append(_Piece(index, start, end, slot, used))
                    used += end - start
            self._publish_slot(slot)
            with self._cond:
                self._finished = True
                self._cond.notify_all()
        except BaseException as exc:
            self.fail(exc)
            raise

    _pending: deque[_Piece]

    def _take_slot(self) -> int:
        with self._cond:
            while not self._free and self._failed is None:
                self._cond.wait()
            if self._failed is not None:
                raise FeedAborted("the background save failed while the state was staged") from self._failed
            self._pending = deque()
            return self._free.popleft()

    def _publish_slot(self, slot: int) -> None:
        if slot < 0:
            return
        with self._cond:
            self._ready.extend(self._pending)
            self._pending = deque()
            if self._refs[slot] == 0:
                self._free.append(slot)
            self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._failed is None:
                self._failed = exc
            self._cond.notify_all()

    # -- consumer (the background commit) -------------------------------------------------------
    def pieces(self, blob: Blob) -> Iterator[memoryview]:
        """The blob's bytes as staged pieces, in order. A piece's slot may be reused once the
        consumer asks for the next piece, so finish with each view before continuing."""
        index = self._index[id(blob)]
        cursor = 0
        while cursor < blob.nbytes:
            with self._cond:
                while not self._ready and self._failed is None:
                    self._cond.wait()
                if self._failed is not None:
                    raise FeedAborted("staging the state failed") from self._failed
                piece = self._ready.popleft()
            if piece.blob != index or piece.start != cursor:
                raise AssertionError("the commit consumed blobs in another order than they were staged")
            yield memoryview(
                self._slots[piece.slot][piece.offset : piece.offset + piece.end - piece.start].data
            )
            cursor = piece.end
            with self._cond:
                self._refs[piece.slot] -= 1
                if self._refs[piece.slot] == 0 and piece.slot not in self._free:
                    self._free.append(piece.slot)
                    self._cond.notify_all()
