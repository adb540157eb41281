"""Reading a sharded tensor whole: its pieces, each read and verified as a stored tensor, placed
into one fresh buffer (docs/format.md §15).

The manifest's parse proved that the pieces tile the tensor, so once every piece is placed every
byte of the buffer was written by a verified piece. A piece that is one contiguous run of the whole
tensor's bytes (a row block: what ``Shard(0)`` and FSDP produce) is read straight into its place;
any other piece (a column block) is read on its own and copied in.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..format.dtypes import SAFETENSORS_ITEMSIZE
from ..format.manifest import Manifest
from ..format.sharding import slab
from ..types import ShardedEntry
from .fresh import fresh_bytes

FetchPiece = Callable[[str, "np.ndarray | None"], np.ndarray]


def direct_targets(manifest: Manifest, wholes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """For each sharded tensor with a buffer in ``wholes``: the slice of it each contiguous piece
    can be read into (piece name -> view)."""
    out: dict[str, np.ndarray] = {}
    for name, whole in wholes.items():
        entry = manifest.sharded[name]
        for offsets, piece in entry.shards:
            span = slab(entry, offsets, manifest.tensors[piece].shape)
            if span is not None:
                out[piece] = whole[span[0] : span[1]]
    return out


def place(manifest: Manifest, entry: ShardedEntry, whole: np.ndarray, pieces: dict[str, np.ndarray]) -> None:
    """Copies each piece of ``entry`` into ``whole`` unless it was already read in place (its
    array is the direct target's memory); the pieces are removed from ``pieces``."""
    itemsize = SAFETENSORS_ITEMSIZE[entry.dtype]
    grid = whole.reshape(*entry.shape, itemsize)
    for offsets, name in entry.shards:
        got = pieces.pop(name)
        shape = manifest.tensors[name].shape
        span = slab(entry, offsets, shape)
        if span is not None:
            if got.ctypes.data == whole.ctypes.data + span[0] and got.size == span[1] - span[0]:
                continue  # read straight into its place
            whole[span[0] : span[1]] = got
            continue
        region = tuple(slice(o, o + s) for o, s in zip(offsets, shape, strict=True))
        grid[region] = got.reshape(*shape, itemsize)


def read_whole(manifest: Manifest, entry: ShardedEntry, fetch_piece: FetchPiece) -> np.ndarray:
    """The whole tensor's bytes, piece by piece (``fetch_piece(name, out)`` reads one piece,
    into ``out`` when given)."""
    whole = fresh_bytes(entry.nbytes)
    targets = direct_targets(manifest, {entry.name: whole})
    pieces = {name: fetch_piece(name, targets.get(name)) for _, name in entry.shards}
    place(manifest, entry, whole, pieces)
    return whole
