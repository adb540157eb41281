"""Sharded tensors in the manifest: a tensor stored as pieces that tile it (docs/format.md §15).

A distributed save writes each rank's part of a tensor where that rank writes everything else: as
an ordinary tensor of its own data file. The manifest's ``sharded`` object then says which pieces
make up which whole tensor and where each piece starts::

    "sharded": {"model.w": {"dtype": "F32", "shape": [1024, 512],
                            "shards": [[[0, 0], "model.w#shard0"], [[512, 0], "model.w#shard1"]]}}

Parsing proves the pieces tile the tensor -- same dtype and rank, inside its bounds, no two
overlapping, every element covered -- before anything trusts them, so a reader can allocate the
whole tensor and fill it piece by piece without ever exposing memory no piece wrote. The proof
marks the cells of the grid the pieces' own boundaries cut (one cell per piece for the regular
splits DTensor and FSDP produce); a cut so irregular that the grid exceeds ``MAX_GRID_CELLS`` is
refused rather than checked slowly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ..config import MAX_NDIM
from ..types import ShardedEntry, TensorEntry
from .digest import new_hasher
from .dtypes import SAFETENSORS_ITEMSIZE

SHARDED_TENSORS = "sharded-tensors"
MAX_GRID_CELLS = 1 << 22
Fail = Callable[[str], Exception]


def sharded_digest(
    algorithm: str, dtype: str, shape: Iterable[int], shards: list[tuple[tuple[int, ...], str]]
) -> str:
    """H(domain, dtype, shape, each piece's offsets and digest in offset order); ``shards`` holds
    (offsets, piece digest)."""
    hasher = new_hasher(algorithm)
    hasher.update(f"ckptvault-sharded-tensor-v1\n{dtype}\n{list(shape)}\n".encode())
    for offsets, digest in sorted(shards):
        hasher.update(f"{list(offsets)} {digest}\n".encode())
    return hasher.hexdigest()


def sharded_json(entry: ShardedEntry) -> dict[str, Any]:
    return {
        "dtype": entry.dtype,
        "shape": list(entry.shape),
        "shards": [[list(offsets), piece] for offsets, piece in entry.shards],
    }


def parse_sharded(
    raw_all: Any, tensors: dict[str, TensorEntry], algorithm: str, fail: Fail
) -> dict[str, ShardedEntry]:
    """The manifest's ``sharded`` object, proven against the stored ``tensors`` (see module doc).

    ``fail(message)`` builds the error raised for a bad document. Every piece belongs to one sharded
    tensor; a sharded tensor's name is not also a stored tensor's.
    """
    if not isinstance(raw_all, dict):
        raise fail("sharded must be an object")
    owner: dict[str, str] = {}
    out: dict[str, ShardedEntry] = {}
    for name, raw in raw_all.items():
        label = f"sharded tensor {name[:80]!r}"
        if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "shards"}:
            raise fail(f"{label}: bad entry")
        if name in tensors or not name:
            raise fail(f"{label}: name empty or also a stored tensor's")
        dtype, shape, shards = raw["dtype"], raw["shape"], raw["shards"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEMSIZE:
            raise fail(f"{label}: unknown dtype")
        if not (isinstance(shape, list) and 0 < len(shape) <= MAX_NDIM and all(_uint(d) for d in shape)):
            raise fail(f"{label}: bad shape")
        if not isinstance(shards, list):
            raise fail(f"{label}: shards must be a list")
        boxes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        refs: list[tuple[tuple[int, ...], str]] = []
        digests: list[tuple[tuple[int, ...], str]] = []
        used: set[str] = set()  # a set, not a scan of refs: pieces per tensor grow with the ranks
        for item in shards:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], list)):
                raise fail(f"{label}: bad shard")
            offsets, piece_name = item
            piece = tensors.get(piece_name) if isinstance(piece_name, str) else None
            if piece is None or owner.setdefault(piece_name, name) != name or piece_name in used:
                raise fail(f"{label}: shard names a missing or already used piece")
            used.add(piece_name)
            if piece.dtype != dtype or len(piece.shape) != len(shape) or len(offsets) != len(shape):
                raise fail(f"{label}: piece {piece_name[:80]!r} has another dtype or rank")
            if not all(_uint(o) for o in offsets) or any(
                o + s > d for o, s, d in zip(offsets, piece.shape, shape, strict=True)
            ):
                raise fail(f"{label}: piece {piece_name[:80]!r} lies outside the tensor")
            if math.prod(piece.shape) == 0:
                raise fail(f"{label}: piece {piece_name[:80]!r} is empty")
            boxes.append((tuple(offsets), piece.shape))
            refs.append((tuple(offsets), piece_name))
            digests.append((tuple(offsets), piece.digest))
        numel = _check_tiling(tuple(shape), boxes, label, fail)
        out[name] = ShardedEntry(
            name,
            dtype,
            tuple(shape),
            tuple(refs),
            sharded_digest(algorithm, dtype, shape, digests),
            numel * SAFETENSORS_ITEMSIZE[dtype],
        )
    return out


def _uint(value: Any) -> bool:
    return type(value) is int and value >= 0


def _check_tiling(
    shape: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]], label: str, fail: Fail
) -> int:
    """The tensor's element count, after proving ``boxes`` (offsets, sizes) tile ``shape``."""
    numel = 1
    for dim in shape:
        numel *= dim
        if numel > 1 << 62:
            raise fail(f"{label}: shape too large")
    if numel == 0 or not boxes:
        if boxes or numel:
            raise fail(f"{label}: shards do not cover the tensor")
        return 0
    if sum(math.prod(size) for _, size in boxes) != numel:
        raise fail(f"{label}: shards do not cover the tensor exactly")
    if all(not any(o[1:]) and s[1:] == shape[1:] for o, s in boxes):
        # Row blocks (what DCP's Shard(0), FSDP and the writer's blocks produce): the proof is that
        # the row ranges, sorted, follow each other from 0 to the end -- no grid needed.
        end = 0
        for start, rows in sorted((o[0], s[0]) for o, s in boxes):
            if start != end:
                raise fail(f"{label}: shards {'overlap' if start < end else 'leave a gap'}")
            end = start + rows
        if end != shape[0]:
            raise fail(f"{label}: shards do not cover the tensor")
        return numel
    cuts = [
        np.unique(
            np.array([0, dim] + [o[d] for o, _ in boxes] + [o[d] + s[d] for o, s in boxes], dtype=np.int64)
        )
        for d, dim in enumerate(shape)
    ]
    cells = 1
    for c in cuts:
        cells *= len(c) - 1
        if cells > MAX_GRID_CELLS:
            raise fail(f"{label}: sharding too irregular to check ({len(boxes)} pieces)")
    grid = np.zeros(tuple(len(c) - 1 for c in cuts), dtype=bool)
    for offsets, sizes in boxes:
        region = tuple(
            slice(int(np.searchsorted(c, o)), int(np.searchsorted(c, o + s)))
            for c, o, s in zip(cuts, offsets, sizes, strict=True)
        )
        if grid[region].any():
            raise fail(f"{label}: shards overlap")
        grid[region] = True
    if not grid.all():  # implied by the sums; kept as the direct statement of the promise
        raise fail(f"{label}: shards do not cover the tensor")
    return numel


def slab(entry: ShardedEntry, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[int, int] | None:
    """The byte range of the whole tensor that a piece fills when that range is contiguous (the
    piece is one index wide before some dimension and whole after it), else None."""
    dims = len(entry.shape)
    first = next((d for d in range(dims) if sizes[d] != 1), dims - 1)
    if any(offsets[d] != 0 or sizes[d] != entry.shape[d] for d in range(first + 1, dims)):
        return None
    itemsize = entry.nbytes // max(1, math.prod(entry.shape))
    strides = [itemsize * math.prod(entry.shape[d + 1 :]) for d in range(dims)]
    start = sum(o * st for o, st in zip(offsets, strides, strict=True))
    return start, start + math.prod(sizes) * itemsize
