"""One rank's part of a tensor as stored pieces: row blocks of at most ``piece_bytes``.

DCP hands a writer each chunk of a tensor that this rank owns (a DTensor's local shard, an FSDP
parameter's rows, or a whole replicated tensor on the rank dedup chose). A chunk that is the whole
tensor and small enough is stored as the tensor itself, under its own name; anything else is cut
into row blocks named ``<fqn>#<offsets>`` -- so a rank that later needs a few rows of a big chunk
reads (and verifies) only the blocks holding them, and a single process reassembles the whole
tensor from the blocks (docs/format.md §15).
"""

from __future__ import annotations

import math
from typing import Any

from ..engine.arrays import Blob, BlobCollector
from ..errors import StorageError, UnsupportedStateError


def one_blob(tensor: Any, name: str, path: str) -> Blob:
    """``tensor`` as one stored blob named ``name`` (dtype checks and the copy to host included)."""
    collector = BlobCollector()
    collector.encode_leaf(tensor, path, name)
    (blob,) = collector.finalize()
    return blob


def encode_piece(item: Any, tensor: Any, piece_bytes: int) -> list[tuple[tuple[int, ...], Blob]]:
    """The pieces of one DCP write item: (first element's index in the whole tensor, blob)."""
    fqn = item.index.fqn
    chunk = item.tensor_data.chunk
    offsets, sizes = tuple(int(o) for o in chunk.offsets), tuple(int(s) for s in chunk.sizes)
    full = tuple(int(s) for s in item.tensor_data.size)
    tensor = tensor.detach()
    if tuple(tensor.shape) != sizes:
        raise StorageError(
            0, f"{fqn}: the planner resolved a {list(tensor.shape)} tensor for a {list(sizes)} chunk"
        )
    whole = not any(offsets) and sizes == full
    if math.prod(sizes) == 0:
        return [(offsets, one_blob(tensor, fqn, fqn))] if whole else []  # an empty part stores nothing
    if whole and (not sizes or tensor.numel() * tensor.element_size() <= piece_bytes):
        return [(offsets, one_blob(tensor, fqn, fqn))]
    row_bytes = tensor.element_size() * math.prod(sizes[1:])
    rows = max(1, piece_bytes // max(1, row_bytes))
    out: list[tuple[tuple[int, ...], Blob]] = []
    for row in range(0, sizes[0], rows):
        start = (offsets[0] + row, *offsets[1:])
        blob = one_blob(tensor[row : row + rows], f"{fqn}#{'_'.join(map(str, start))}", fqn)
        if len(blob.shape) != len(sizes):
            raise UnsupportedStateError(fqn, f"a {tensor.dtype} tensor has no flat stored form to shard")
        out.append((start, blob))
    return out
