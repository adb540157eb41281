"""DCP's ``Metadata`` without pickle: what of it a checkpoint stores, and how it comes back.

torch.distributed.checkpoint pickles its global metadata (``.metadata``); a ckptvault checkpoint
carries the same facts as strict JSON and as the manifest's own structure:

* which tensors exist, their shapes and how they are cut: the manifest (a tensor stored whole, or a
  sharded one whose pieces tile it, docs/format.md §15). DCP's chunk of a tensor -- one rank's
  part -- is itself stored as one or more row blocks of at most ``piece_bytes`` (so a rank that
  loads part of a chunk reads, and verifies, only the blocks it needs);
* each tensor's dtype and ``requires_grad``, which chunks DCP cut, the planner's data (the
  flattening map of the default planners), DCP's ``StorageMeta`` and version: the file
  ``dcp.json`` of the checkpoint, listed and digest-checked like any other;
* non-tensor values (an optimizer's ``param_groups``, a step counter): the manifest's tree, in the
  tagged encoding every ckptvault value uses -- never pickle.

:func:`rebuild` turns these back into a ``Metadata`` plus the map from each DCP chunk to the pieces
that store it; the reader treats every field as untrusted input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import MAX_NDIM
from ..errors import CorruptCheckpointError
from ..format.dtypes import TORCH_DTYPES
from ..format.strictjson import StrictJSONError, dumps, loads
from ..format.tree import TreeDecodeError, TreeDecoder, TreeEncoder
from ..types import ShardedEntry, TensorEntry

DCP_FILE = "dcp.json"
FORMAT = "ckptvault-dcp-metadata"
FORMAT_VERSION = 1
_MAX_CHUNKS = 1 << 20


class _PlainValues:
    """Leaf codec of ``dcp.json``'s encoded fields: plain values only (planner data, paths)."""

    def encode_leaf(self, value: Any, path: str, name: str) -> dict[str, Any] | None:
        return None

    def decode_leaf(self, node: dict[str, Any], path: str) -> Any:
        raise TreeDecodeError(f"{path}: no arrays or tensors here")


PLAIN = _PlainValues()


@dataclass(frozen=True)
class ChunkPieces:
    """One DCP chunk of a tensor and the pieces (row blocks) that store it, in row order: each
    (first row within the chunk, piece name, rows)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    pieces: tuple[tuple[int, str, int], ...]


def encode_document(
    tensors: dict[str, dict[str, Any]],
    planner_data: Any,
    storage_meta: Any,
    version: str | None,
) -> bytes:
    """``dcp.json``'s bytes. ``tensors``: fqn -> {"dtype", "requires_grad", "chunks": [[offsets,
    sizes], ...]}. Fields DCP marks deprecated (layout, memory format, pinning) are not kept:
    loading sets them to DCP's defaults."""
    meta = None
    if storage_meta is not None:
        meta = {
            "checkpoint_id": None if storage_meta.checkpoint_id is None else str(storage_meta.checkpoint_id),
            "save_id": storage_meta.save_id,
            "load_id": storage_meta.load_id,
            "modules": [str(m) for m in storage_meta.modules],
        }
    doc = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dcp_version": version,
        "tensors": tensors,
        "planner_data": TreeEncoder(PLAIN).encode(planner_data, "planner_data"),
        "storage_meta": meta,
    }
    return dumps(doc) + b"\n"  # compact: machine-read, and Python's C encoder only does compact


def chunk_pieces_of(
    fqn: str,
    entry: TensorEntry | ShardedEntry,
    chunks: list[tuple[tuple[int, ...], tuple[int, ...]]],
    tensors: Mapping[str, TensorEntry],
) -> list[ChunkPieces]:
    """The pieces of each DCP chunk of ``fqn``. A tensor stored whole is its one chunk; a sharded
    one's pieces must be whole rows of exactly one chunk each, in row order, and every piece must be
    used -- the writer never cuts otherwise, so anything else is refused as damaged."""
    if isinstance(entry, TensorEntry):
        if len(chunks) != 1 or any(chunks[0][0]) or tuple(chunks[0][1]) != entry.shape:
            raise _corrupt(f"{fqn}: stored whole, but its chunks are not the one whole tensor")
        offsets, sizes = chunks[0]
        return [ChunkPieces(offsets, sizes, ((0, entry.name, sizes[0] if sizes else 1),))]
    starts = {offsets: name for offsets, name in entry.shards}
    out: list[ChunkPieces] = []
    for offsets, sizes in chunks:
        if len(offsets) != len(entry.shape) or len(sizes) != len(entry.shape):
            raise _corrupt(f"{fqn}: chunk {list(offsets)} has another rank than the tensor")
        pieces: list[tuple[int, str, int]] = []
        row = 0
        while 0 not in sizes and row < sizes[0]:
            name = starts.pop((offsets[0] + row, *offsets[1:]), None)
            shape = tensors[name].shape if name is not None else ()
            if name is None or shape[1:] != sizes[1:] or row + shape[0] > sizes[0]:
                raise _corrupt(f"{fqn}: chunk {list(offsets)} is not stored as whole row blocks")
            pieces.append((row, name, shape[0]))
            row += shape[0]
        out.append(ChunkPieces(offsets, sizes, tuple(pieces)))
    if starts:
        raise _corrupt(f"{fqn}: pieces outside every chunk")
    return out


def parse_document(data: bytes, where: str) -> dict[str, Any]:
    """``dcp.json`` parsed and checked field by field (not yet joined with the manifest)."""
    try:
        doc = loads(data)
    except StrictJSONError as exc:
        raise _corrupt(f"{DCP_FILE} is not strict JSON: {exc}", where) from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != FORMAT_VERSION:
        raise _corrupt(f"{DCP_FILE}: not a version {FORMAT_VERSION} {FORMAT} document", where)
    if set(doc) != {"format", "version", "dcp_version", "tensors", "planner_data", "storage_meta"}:
        raise _corrupt(f"{DCP_FILE}: unexpected fields", where)
    tensors = doc["tensors"]
    if not isinstance(tensors, dict):
        raise _corrupt(f"{DCP_FILE}: tensors must be an object", where)
    for fqn, raw in tensors.items():
        if not (
            isinstance(raw, dict)
            and set(raw) == {"dtype", "requires_grad", "size", "chunks"}
            and isinstance(raw["dtype"], str)
            and raw["dtype"] in TORCH_DTYPES
            and isinstance(raw["requires_grad"], bool)
            and _dims(raw["size"])
            and isinstance(raw["chunks"], list)
            and len(raw["chunks"]) <= _MAX_CHUNKS
            and all(
                isinstance(c, list) and len(c) == 2 and _dims(c[0]) and _dims(c[1]) for c in raw["chunks"]
            )
        ):
            raise _corrupt(f"{DCP_FILE}: bad entry for tensor {fqn[:80]!r}", where)
    if not (doc["dcp_version"] is None or isinstance(doc["dcp_version"], str)):
        raise _corrupt(f"{DCP_FILE}: bad dcp_version", where)
    meta = doc["storage_meta"]
    if meta is not None and not (
        isinstance(meta, dict)
        and set(meta) == {"checkpoint_id", "save_id", "load_id", "modules"}
        and all(meta[k] is None or isinstance(meta[k], str) for k in ("checkpoint_id", "save_id", "load_id"))
        and isinstance(meta["modules"], list)
        and all(isinstance(m, str) for m in meta["modules"])
    ):
        raise _corrupt(f"{DCP_FILE}: bad storage_meta", where)
    try:
        doc["planner_data"] = TreeDecoder(PLAIN).decode(doc["planner_data"], "planner_data")
    except (TreeDecodeError, ValueError) as exc:
        raise _corrupt(f"{DCP_FILE}: planner_data: {exc}", where) from exc
    return doc


def _dims(value: Any) -> bool:
    if not isinstance(value, list) or len(value) > MAX_NDIM:
        return False
    return all(type(d) is int and d >= 0 for d in value)


def _corrupt(message: str, where: str | None = None) -> CorruptCheckpointError:
    return CorruptCheckpointError(message, path=where, file=DCP_FILE, kind="bad-manifest")
