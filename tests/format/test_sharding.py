"""Sharded tensors in the manifest (docs/format.md §15): the tiling proof and the byte ranges.

Why these tests: a reader allocates a sharded tensor whole and fills it piece by piece, trusting the
parse's proof that the pieces tile it. Any hole in that proof is a tensor returned with bytes no
piece wrote (uninitialised memory) or with two pieces fighting over one element, so every refusal
rule gets a manifest that breaks exactly that rule and must give ``CorruptCheckpointError``
(kind ``bad-manifest``). Manifests are built by hand, never by the writer, so a writer change
cannot quietly make them valid.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from typing import Any

import numpy as np
import pytest

from ckptvault.errors import CorruptCheckpointError
from ckptvault.format.manifest import parse_manifest
from ckptvault.format.sharding import MAX_GRID_CELLS, SHARDED_TENSORS, parse_sharded, sharded_digest, slab
from ckptvault.types import ShardedEntry, TensorEntry

DATA = "data.safetensors"
ITEMSIZE = {"F32": 4, "BF16": 2, "I64": 8, "U8": 1}


def piece_digest(name: str) -> str:
    """A stable stand-in digest per piece (the parse never sees the bytes)."""
    return hashlib.sha256(name.encode()).hexdigest()


def manifest_doc(pieces: dict[str, tuple[str, list[int]]], sharded: Any, *, feature: bool = True) -> dict:
    """A manifest whose ``tensors`` are ``pieces`` (name -> (dtype, shape)) in one data file, plus
    ``sharded`` as given (None: no ``sharded`` field)."""
    tensors: dict[str, Any] = {}
    offset = 0
    for name, (dtype, shape) in pieces.items():
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        tensors[name] = {
            "file": DATA,
            "dtype": dtype,
            "shape": shape,
            "offsets": [offset, offset + nbytes],
            "digest": piece_digest(name),
        }
        offset += nbytes
    doc: dict[str, Any] = {
        "format": "ckptvault",
        "schema_version": 1,
        "checkpoint_id": "ab" * 16,
        "created_at": "2026-01-01T00:00:00+00:00",
        "step": 1,
        "digest_algorithm": "blake3",
        "required_features": [SHARDED_TENSORS] if feature else [],
        "files": {
            DATA: {"size": offset + 64, "digest": "0" * 64, "header_size": 56, "header_digest": "1" * 64}
        },
        "tensors": tensors,
        "tree": {"t": "dict", "v": {}},
        "metadata": {"t": "dict", "v": {}},
    }
    if sharded is not None:
        doc["sharded"] = sharded
    return doc


def parse(doc: dict[str, Any]) -> Any:
    return parse_manifest(json.dumps(doc).encode(), path="ckpt")


def grid_2x2() -> tuple[dict[str, tuple[str, list[int]]], dict[str, Any]]:
    """A [5, 6] F32 tensor on a 2x2 mesh, Shard(0) and Shard(1): uneven rows (3 + 2), columns 3 + 3."""
    pieces = {
        "w#0_0": ("F32", [3, 3]),
        "w#0_3": ("F32", [3, 3]),
        "w#3_0": ("F32", [2, 3]),
        "w#3_3": ("F32", [2, 3]),
    }
    shards = [[[0, 0], "w#0_0"], [[0, 3], "w#0_3"], [[3, 0], "w#3_0"], [[3, 3], "w#3_3"]]
    return pieces, {"w": {"dtype": "F32", "shape": [5, 6], "shards": shards}}


def test_valid_2d_grid_parses_to_the_right_entry() -> None:
    pieces, sharded = grid_2x2()
    manifest = parse(manifest_doc(pieces, sharded))
    entry = manifest.sharded["w"]
    assert entry == ShardedEntry(
        "w",
        "F32",
        (5, 6),
        (((0, 0), "w#0_0"), ((0, 3), "w#0_3"), ((3, 0), "w#3_0"), ((3, 3), "w#3_3")),
        sharded_digest(
            "blake3", "F32", [5, 6], [((o[0], o[1]), piece_digest(n)) for o, n in sharded["w"]["shards"]]
        ),
        5 * 6 * 4,
    )
    assert manifest.entry("w") is entry and manifest.entry("w#0_0") is manifest.tensors["w#0_0"]
    assert manifest.logical_count == 1


def test_sharded_digest_ignores_listing_order_but_not_offsets() -> None:
    """Equal digests mean equal bytes cut the same way, however the writer listed the pieces."""
    pieces, sharded = grid_2x2()
    first = parse(manifest_doc(pieces, sharded)).sharded["w"].digest
    sharded["w"]["shards"].reverse()
    assert parse(manifest_doc(pieces, sharded)).sharded["w"].digest == first
    moved = [((0, 0), "a"), ((3, 0), "b")]
    assert sharded_digest("blake3", "F32", [5, 6], moved) != sharded_digest(
        "blake3", "F32", [5, 6], [((0, 0), "b"), ((3, 0), "a")]
    )


def test_manifest_round_trip_keeps_sharded() -> None:
    pieces, sharded = grid_2x2()
    manifest = parse(manifest_doc(pieces, sharded))
    again = parse_manifest(manifest.to_json(), path="ckpt")
    assert again == manifest
    assert json.loads(manifest.to_json())["sharded"] == sharded


def _broken(change: str) -> dict[str, Any]:
    """The 2x2 grid with exactly one rule broken."""
    pieces, sharded = grid_2x2()
    shards = sharded["w"]["shards"]
    if change == "overlap":
        shards[3][0] = [2, 3]  # [2:4, 3:6] overlaps [0:3, 3:6]; one row of w#3_3's place is left empty
    elif change == "gap":
        pieces["w#3_3"] = ("F32", [1, 3])  # a row short: 3 elements nobody writes
    elif change == "out-of-bounds":
        shards[3][0] = [4, 3]
    elif change == "other-dtype":
        pieces["w#3_3"] = ("I64", [2, 3])
    elif change == "other-rank":
        pieces["w#3_3"] = ("F32", [2, 3, 1])
    elif change == "offsets-rank":
        shards[3][0] = [3, 3, 0]
    elif change == "used-twice":
        shards[3][1] = "w#3_0"
    elif change == "two-tensors":
        pieces["v#0"] = ("F32", [2, 3])
        sharded["v"] = {"dtype": "F32", "shape": [2, 3], "shards": [[[0, 0], "w#3_3"]]}
    elif change == "missing-piece":
        shards[3][1] = "w#9_9"
    elif change == "piece-not-a-string":
        shards[3][1] = ["w#3_3"]
    elif change == "empty-piece":
        pieces["w#3_3"] = ("F32", [0, 3])
    elif change == "empty-shards":
        sharded["w"]["shards"] = []
    elif change == "no-feature":
        return manifest_doc(pieces, sharded, feature=False)
    elif change == "name-is-stored":
        sharded["w#0_0"] = sharded.pop("w")
    elif change == "empty-name":
        sharded[""] = sharded.pop("w")
    elif change == "float-offset":
        shards[3][0] = [3.0, 3]
    elif change == "negative-offset":
        shards[3][0] = [-1, 3]
    elif change == "bool-offset":
        shards[1][0] = [False, 3]
    elif change == "shape-beyond-2-62":
        sharded["w"]["shape"] = [1 << 31, 1 << 32]
    elif change == "bad-shape":
        sharded["w"]["shape"] = [5, "6"]
    elif change == "unknown-dtype":
        sharded["w"]["dtype"] = "F31"
    elif change == "extra-field":
        sharded["w"]["layout"] = "strided"
    elif change == "shard-not-a-pair":
        shards[0] = [[0, 0], "w#0_0", 1]
    elif change == "not-an-object":
        sharded = [sharded]
    return manifest_doc(pieces, sharded)


BROKEN = [
    "overlap",
    "gap",
    "out-of-bounds",
    "other-dtype",
    "other-rank",
    "offsets-rank",
    "used-twice",
    "two-tensors",
    "missing-piece",
    "piece-not-a-string",
    "empty-piece",
    "empty-shards",
    "no-feature",
    "name-is-stored",
    "empty-name",
    "float-offset",
    "negative-offset",
    "bool-offset",
    "shape-beyond-2-62",
    "bad-shape",
    "unknown-dtype",
    "extra-field",
    "shard-not-a-pair",
    "not-an-object",
]


@pytest.mark.parametrize("change", BROKEN)
def test_every_broken_rule_is_refused(change: str) -> None:
    with pytest.raises(CorruptCheckpointError) as caught:
        parse(_broken(change))
    assert caught.value.kind == "bad-manifest"


def test_zero_size_tensor_needs_no_pieces_and_takes_none() -> None:
    """An empty tensor has nothing to tile: no shards is its only valid listing."""
    manifest = parse(manifest_doc({}, {"e": {"dtype": "F32", "shape": [0, 4], "shards": []}}))
    assert manifest.sharded["e"].nbytes == 0 and manifest.sharded["e"].shards == ()
    pieces = {"e#0_0": ("F32", [1, 4])}
    with pytest.raises(CorruptCheckpointError):
        parse(manifest_doc(pieces, {"e": {"dtype": "F32", "shape": [0, 4], "shards": [[[0, 0], "e#0_0"]]}}))


def staircase(rows: int) -> tuple[dict[str, TensorEntry], list[list[Any]]]:
    """A [rows, rows + 1] U8 tensor, row i cut after column i + 1: a valid tiling whose cuts make a
    grid of rows * (rows + 1) cells."""
    tensors: dict[str, TensorEntry] = {}
    shards: list[list[Any]] = []
    for i in range(rows):
        for col, width in ((0, i + 1), (i + 1, rows - i)):
            name = f"w#{i}_{col}"
            tensors[name] = TensorEntry(name, DATA, "U8", (1, width), (0, width), piece_digest(name))
            shards.append([[i, col], name])
    return tensors, shards


def _fail(message: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(message, kind="bad-manifest")


def test_small_staircase_is_a_valid_tiling() -> None:
    tensors, shards = staircase(20)
    out = parse_sharded({"w": {"dtype": "U8", "shape": [20, 21], "shards": shards}}, tensors, "blake3", _fail)
    assert out["w"].nbytes == 20 * 21


def test_grid_beyond_max_cells_is_refused_quickly() -> None:
    """4,096 tiny irregular pieces cut a grid of 2048 x 2049 cells (just over MAX_GRID_CELLS): refused
    before any cell is marked, so the work stays linear in the manifest."""
    rows = 2048
    assert rows * (rows + 1) > MAX_GRID_CELLS
    tensors, shards = staircase(rows)
    raw = {"w": {"dtype": "U8", "shape": [rows, rows + 1], "shards": shards}}
    started = time.perf_counter()
    with pytest.raises(CorruptCheckpointError, match="irregular"):
        parse_sharded(raw, tensors, "blake3", _fail)
    assert time.perf_counter() - started < 2.0


# -- slab: the contiguous byte range of a piece, against a brute-force reference -------------------
def brute_slab(shape: tuple[int, ...], itemsize: int, offsets: tuple[int, ...], sizes: tuple[int, ...]):
    """The piece's byte indices in the whole tensor; their range if consecutive, else None."""
    index = np.arange(math.prod(shape) * itemsize).reshape(*shape, itemsize)
    region = index[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))].reshape(-1)
    if region.size and np.all(np.diff(region) == 1):
        return int(region[0]), int(region[-1]) + 1
    return None


def boxes(shape: tuple[int, ...]):
    """Every non-empty box inside ``shape``: (offsets, sizes)."""
    spans = [[(lo, hi - lo) for lo in range(d) for hi in range(lo + 1, d + 1)] for d in shape]
    for combo in itertools.product(*spans):
        yield tuple(o for o, _ in combo), tuple(s for _, s in combo)


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((7,), "F32"),
        ((4, 3), "F32"),
        ((3, 5), "BF16"),
        ((2, 3, 4), "I64"),
        ((3, 1, 4), "F32"),
        ((1, 3, 2), "U8"),
    ],
)
def test_slab_matches_brute_force_on_every_box(shape: tuple[int, ...], dtype: str) -> None:
    """Row blocks, column blocks, 3-D boxes and 1-row boxes: exhaustively, every box of a small shape."""
    itemsize = ITEMSIZE[dtype]
    entry = ShardedEntry("w", dtype, shape, (), "0" * 64, math.prod(shape) * itemsize)
    for offsets, sizes in boxes(shape):
        assert slab(entry, offsets, sizes) == brute_slab(shape, itemsize, offsets, sizes), (offsets, sizes)


def test_slab_named_cases() -> None:
    entry = ShardedEntry("w", "F32", (6, 4, 5), (), "0" * 64, 6 * 4 * 5 * 4)
    assert slab(entry, (2, 0, 0), (3, 4, 5)) == (2 * 80, 5 * 80)  # row block
    assert slab(entry, (0, 0, 0), (6, 2, 5)) is None  # column block
    assert slab(entry, (1, 1, 0), (2, 2, 5)) is None  # 3-D box
    assert slab(entry, (3, 1, 0), (1, 2, 5)) == (3 * 80 + 20, 3 * 80 + 60)  # 1-row box
    assert slab(entry, (3, 1, 2), (1, 1, 3)) == (3 * 80 + 20 + 8, 3 * 80 + 20 + 20)
