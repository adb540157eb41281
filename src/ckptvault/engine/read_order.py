"""The order a whole load reads tensors in, and the memory it reads them into.

Order, when a checkpoint has at least as many data files as reading threads: each thread then reads
whole files front to back -- a sequential scan per file, which an object store's read-ahead
(storage/s3_blocks.py) turns into a few large requests, with several files in flight at once --
instead of all threads crowding into one file (whose requests they would wait for in series) and
thrashing the read-ahead of the others. On local disk it is as fast as any order. With fewer files
than threads, tensors are dealt out to the threads in batches (:func:`batches`), not one task each:
at 50,000 tensors a future per tensor cost more than reading them.

Memory: small tensors are read into shared arenas (:func:`destinations`), one allocation and one
read per ``ARENA_BYTES`` of file neighbours instead of one per tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..types import TensorEntry
from .fresh import fresh_bytes

# Tensors below this size are packed into arenas; an arena holds up to ARENA_BYTES. Why these: an
# allocation per tensor (torch.empty + numpy view, ~5 us each here) is a third of a 4 KiB tensor's
# load, while a returned tensor keeps its whole arena alive, so arenas stay small and big tensors
# keep memory of their own. 4 MiB also stays under glibc's largest mmap threshold (32 MiB): once a
# load's arenas are freed, the next load's come from the heap, pages already mapped -- with 64 MiB
# arenas every load of 50,000 tensors paid ~300,000 page faults (2x its time), with 4 MiB ~26,000.
ARENA_TENSOR_BYTES = 1 << 20
ARENA_BYTES = 4 << 20


def file_groups(tensors: Mapping[str, TensorEntry], names: list[str]) -> list[list[str]]:
    """The tensors grouped by data file in file order, biggest file first; each chunked tensor
    (read from the chunk store, not a file) a group of its own."""
    groups: dict[str, list[str]] = {}
    for name in names:
        entry = tensors[name]
        groups.setdefault(entry.file if entry.chunks is None else f"\0{name}", []).append(name)
    ordered = [
        sorted(g, key=lambda n: tensors[n].offsets[0] if tensors[n].chunks is None else 0)
        for g in groups.values()
    ]
    return sorted(ordered, key=lambda g: -sum(tensors[n].nbytes for n in g))


def batches(names: list[str], count: int) -> list[list[str]]:
    """``names`` (biggest first) dealt round-robin into at most ``count`` batches of similar bytes."""
    count = max(1, min(count, len(names)))
    return [names[i::count] for i in range(count)]


@dataclass
class Run:
    """Neighbouring small tensors of one data file, read with one ``pread`` into one buffer: bytes
    ``offset`` .. ``offset + len(buffer)`` of the file's data section, cut into ``pieces``."""

    file: str
    offset: int
    buffer: np.ndarray
    pieces: list[tuple[str, np.ndarray]]


def destinations(
    tensors: Mapping[str, TensorEntry], names: list[str], skip: Mapping[str, object]
) -> tuple[dict[str, np.ndarray], list[Run]]:
    """Fresh uint8 arrays for the stored, unchunked tensors of ``names`` not in ``skip``: each big
    tensor its own array; small ones slices of shared arenas, where neighbours in a file form a
    :class:`Run` (a run of one tensor is returned as a plain destination). Allocated on the calling
    thread (see fresh_bytes and CheckpointReader.fetch_all).

    Why runs: at 50,000 tensors of a few KiB, a read per tensor is a syscall and a GIL hand-off
    between reading threads per tensor, which costs more than the bytes; a run is one read."""
    outs: dict[str, np.ndarray] = {}
    small: list[tuple[str, int, int, str]] = []  # (file, offset, nbytes, name): sorted in file order
    for name in names:
        entry = tensors[name]
        if entry.chunks is not None or name in skip:
            continue
        start, end = entry.offsets
        if end - start >= ARENA_TENSOR_BYTES:
            outs[name] = fresh_bytes(end - start)
        else:
            small.append((entry.file, start, end - start, name))
    small.sort()
    runs: list[Run] = []
    first = 0
    while first < len(small):
        last, size = first, 0
        while last < len(small) and (last == first or size + small[last][2] <= ARENA_BYTES):
            size += small[last][2]
            last += 1
        arena = fresh_bytes(size)
        cursor = run_start = 0
        run: Run | None = None
        for file, offset, nbytes, name in small[first:last]:
            piece = arena[cursor : cursor + nbytes]
            if run is not None and run.file == file and run.offset + cursor - run_start == offset:
                run.buffer = arena[run_start : cursor + nbytes]
                run.pieces.append((name, piece))
            else:
                run = Run(file, offset, piece, [(name, piece)])
                run_start = cursor
                runs.append(run)
            cursor += nbytes
        first = last
    for run in runs:
        if len(run.pieces) == 1:
            outs[run.pieces[0][0]] = run.buffer
    return outs, [r for r in runs if len(r.pieces) > 1]
