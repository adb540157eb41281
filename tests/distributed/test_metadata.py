"""``dcp.json`` and the chunk-to-piece map (ckptvault.distributed.metadata): refusals.

Why: the DCP reader turns ``dcp.json`` back into DCP's ``Metadata`` and then copies stored pieces
into ranks' tensors by the chunk map. Both are untrusted input; anything the writer never produces
must be a ``CorruptCheckpointError`` before a byte is copied, never a ``TypeError`` from deep
inside DCP or a box filled from the wrong piece.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from ckptvault.distributed.metadata import ChunkPieces, chunk_pieces_of, encode_document, parse_document
from ckptvault.errors import CorruptCheckpointError
from ckptvault.types import ShardedEntry, TensorEntry


def valid_doc() -> dict[str, Any]:
    return json.loads(
        encode_document(
            {"w": {"dtype": "float32", "requires_grad": False, "size": [4, 2], "chunks": [[[0, 0], [4, 2]]]}},
            {"w": ("w",), "step": ("step",)},
            None,
            "2.0",
        )
    )


def parse(doc: Any) -> dict[str, Any]:
    return parse_document(json.dumps(doc).encode(), "ckpt")


def test_valid_document_parses() -> None:
    doc = parse(valid_doc())
    assert doc["planner_data"] == {"w": ("w",), "step": ("step",)}
    assert doc["tensors"]["w"]["chunks"] == [[[0, 0], [4, 2]]]


def _break(change: str) -> Any:
    doc = valid_doc()
    w = doc["tensors"]["w"]
    if change == "unknown-top-field":
        doc["pickle"] = "gASV"
    elif change == "unknown-tensor-field":
        w["layout"] = "strided"
    elif change == "missing-field":
        del doc["storage_meta"]
    elif change == "wrong-format":
        doc["format"] = "torch-dcp"
    elif change == "wrong-version":
        doc["version"] = 2
    elif change == "not-an-object":
        doc = [doc]
    elif change == "tensors-not-an-object":
        doc["tensors"] = [w]
    elif change == "bad-dtype":
        w["dtype"] = "torch.float32"
    elif change == "dtype-not-a-string":
        w["dtype"] = ["float32"]
    elif change == "requires-grad-int":
        w["requires_grad"] = 0
    elif change == "size-negative":
        w["size"] = [4, -2]
    elif change == "size-bool":
        w["size"] = [True, 2]
    elif change == "chunks-not-a-list":
        w["chunks"] = {"0": [[0, 0], [4, 2]]}
    elif change == "chunk-float":
        w["chunks"] = [[[0, 0], [4.0, 2]]]
    elif change == "chunk-strings":
        w["chunks"] = [[["0", "0"], [4, 2]]]
    elif change == "chunk-triple":
        w["chunks"] = [[[0, 0], [4, 2], [1]]]
    elif change == "chunk-too-many-dims":
        w["chunks"] = [[[0] * 100, [1] * 100]]
    elif change == "dcp-version-int":
        doc["dcp_version"] = 2
    elif change == "storage-meta-list":
        doc["storage_meta"] = []
    elif change == "storage-meta-extra-key":
        doc["storage_meta"] = {"checkpoint_id": None, "save_id": None, "load_id": None, "modules": [], "x": 1}
    elif change == "storage-meta-id-int":
        doc["storage_meta"] = {"checkpoint_id": 5, "save_id": None, "load_id": None, "modules": []}
    elif change == "storage-meta-modules-ints":
        doc["storage_meta"] = {"checkpoint_id": None, "save_id": None, "load_id": None, "modules": [1]}
    elif change == "planner-data-unknown-tag":
        doc["planner_data"] = {"t": "pickle", "v": "gASV"}
    elif change == "planner-data-tensor":
        doc["planner_data"] = {"t": "torch.Tensor", "tensor": "w", "dtype": "float32", "shape": [4, 2]}
    elif change == "planner-data-ndarray":
        doc["planner_data"] = {"t": "ndarray", "tensor": "w", "dtype": "<f4", "shape": [4, 2]}
    elif change == "planner-data-bad-dict":
        doc["planner_data"] = {"t": "dict", "v": [1, 2]}
    return doc


@pytest.mark.parametrize(
    "change",
    [
        "unknown-top-field",
        "unknown-tensor-field",
        "missing-field",
        "wrong-format",
        "wrong-version",
        "not-an-object",
        "tensors-not-an-object",
        "bad-dtype",
        "dtype-not-a-string",
        "requires-grad-int",
        "size-negative",
        "size-bool",
        "chunks-not-a-list",
        "chunk-float",
        "chunk-strings",
        "chunk-triple",
        "chunk-too-many-dims",
        "dcp-version-int",
        "storage-meta-list",
        "storage-meta-extra-key",
        "storage-meta-id-int",
        "storage-meta-modules-ints",
        "planner-data-unknown-tag",
        "planner-data-tensor",
        "planner-data-ndarray",
        "planner-data-bad-dict",
    ],
)
def test_parse_document_refuses(change: str) -> None:
    with pytest.raises(CorruptCheckpointError) as caught:
        parse(_break(change))
    assert caught.value.kind == "bad-manifest" and caught.value.file == "dcp.json"


@pytest.mark.parametrize("data", [b"{", b'{"a": NaN}', b'{"a": 1, "a": 2}', b"\xff", b""])
def test_parse_document_refuses_non_strict_json(data: bytes) -> None:
    with pytest.raises(CorruptCheckpointError, match="not strict JSON"):
        parse_document(data, "ckpt")


# -- chunk_pieces_of ------------------------------------------------------------------------------
def stored(name: str, shape: tuple[int, ...]) -> TensorEntry:
    return TensorEntry(name, "data.safetensors", "F32", shape, (0, 4), "0" * 64)


def sharded(pieces: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], shape: tuple[int, ...]):
    """A ShardedEntry over ``pieces`` (name -> (offsets, shape)) and the stored tensors it names."""
    tensors = {name: stored(name, size) for name, (_, size) in pieces.items()}
    shards = tuple((offsets, name) for name, (offsets, _) in pieces.items())
    return ShardedEntry("w", "F32", shape, shards, "0" * 64, 4 * shape[0] * shape[1]), tensors


# Two ranks' chunks of an [8, 3] tensor (rows 0..4 and 4..8), each stored as two row blocks.
ROW_BLOCKS = {
    "w#0_0": ((0, 0), (2, 3)),
    "w#2_0": ((2, 0), (2, 3)),
    "w#4_0": ((4, 0), (3, 3)),
    "w#7_0": ((7, 0), (1, 3)),
}
CHUNKS = [((0, 0), (4, 3)), ((4, 0), (4, 3))]


def test_chunk_pieces_of_row_blocks() -> None:
    entry, tensors = sharded(ROW_BLOCKS, (8, 3))
    assert chunk_pieces_of("w", entry, CHUNKS, tensors) == [
        ChunkPieces((0, 0), (4, 3), ((0, "w#0_0", 2), (2, "w#2_0", 2))),
        ChunkPieces((4, 0), (4, 3), ((0, "w#4_0", 3), (3, "w#7_0", 1))),
    ]


def test_whole_tensor_is_its_one_chunk() -> None:
    entry = stored("w", (8, 3))
    (got,) = chunk_pieces_of("w", entry, [((0, 0), (8, 3))], {"w": entry})
    assert got.pieces == ((0, "w", 8),)


@pytest.mark.parametrize(
    ("chunks", "why"),
    [
        ([((0, 0), (3, 3)), ((3, 0), (5, 3))], "piece across two chunks"),
        ([((0, 0), (4, 3)), ((4, 0), (2, 3))], "rows 6..8 outside every chunk"),
        ([((0, 0), (4, 3))], "pieces of the second chunk unused"),
        ([((0, 0), (4, 3)), ((4, 0), (5, 3))], "chunk longer than its pieces"),
        ([((0, 0), (4, 2)), ((4, 0), (4, 3))], "chunk narrower than its pieces"),
        ([((0, 0), (4, 3)), ((0, 0), (4, 3))], "same chunk twice"),
        ([((0, 0), (4, 3)), ((4, 0, 0), (4, 3, 1))], "chunk of another rank"),
        ([((0, 1), (4, 3)), ((4, 0), (4, 3))], "chunk not at a piece's start"),
    ],
)
def test_chunk_pieces_of_refuses_sharded(chunks: list[Any], why: str) -> None:
    entry, tensors = sharded(ROW_BLOCKS, (8, 3))
    with pytest.raises(CorruptCheckpointError):
        chunk_pieces_of("w", entry, chunks, tensors)


def test_column_blocks_are_not_whole_rows() -> None:
    """The writer only cuts chunks into row blocks; a column split of one chunk is damage."""
    pieces = {"w#0_0": ((0, 0), (4, 2)), "w#0_2": ((0, 2), (4, 1))}
    entry, tensors = sharded(pieces, (4, 3))
    with pytest.raises(CorruptCheckpointError):
        chunk_pieces_of("w", entry, [((0, 0), (4, 3))], tensors)


@pytest.mark.parametrize(
    "chunks",
    [
        [((0, 0), (4, 3)), ((4, 0), (4, 3))],  # a whole-stored tensor with 2 chunks
        [((4, 0), (4, 3))],  # one chunk, not at the origin
        [],  # no chunk at all
        [((0, 0), (4, 3))],  # one chunk smaller than the stored tensor
        [((0, 0), (12, 2))],  # one chunk of the same element count, another shape
    ],
)
def test_chunk_pieces_of_refuses_whole(chunks: list[Any]) -> None:
    entry = stored("w", (8, 3))
    with pytest.raises(CorruptCheckpointError):
        chunk_pieces_of("w", entry, chunks, {"w": entry})
