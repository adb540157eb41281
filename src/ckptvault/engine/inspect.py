"""Read-only tools over committed checkpoints: tensor listings, diff, export.

``diff`` compares by digest first: tensors whose stored bytes hash alike are identical without being
read, so diffing two checkpoints of a fine-tuned model reads only what changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CorruptCheckpointError
from ..format.tensorfile import build_header
from ..format.tree import TreeDecodeError
from ..format.tree import iter_leaves as iter_leaf_nodes
from ..storage.atomic_file import atomic_output
from ..storage.base import Storage
from ..storage.resolve import is_url, storage_for
from ..types import ShardedEntry, TensorEntry
from .budget import ByteBudget, default_limit
from .diffing import compare_leaves
from .lazy import CheckpointView
from .reader import CheckpointReader


@dataclass(frozen=True)
class LeafInfo:
    """One array/tensor as the state holds it (logical dtype and shape), found by its dotted path."""

    path: str
    kind: str  # "torch" or "numpy"
    dtype: str
    shape: tuple[int, ...]
    tensor: str  # stored tensor name
    node: dict[str, Any]


def iter_leaves(tree: Any, *, path: str | None = None) -> list[LeafInfo]:
    """Every array/tensor leaf of an encoded tree with its dotted path and logical dtype/shape."""
    try:
        return [
            LeafInfo(
                name,
                "numpy" if node["t"] == "ndarray" else "torch",
                str(node.get("dtype")),
                tuple(node.get("shape", ())),
                str(node.get("tensor")),
                node,
            )
            for name, node in iter_leaf_nodes(tree)
        ]
    except (TreeDecodeError, TypeError, ValueError) as exc:  # a hostile shape: not a list of ints
        raise CorruptCheckpointError(
            f"state tree: {exc}", path=path, file="manifest.json", kind="bad-manifest"
        ) from exc


@dataclass(frozen=True)
class TensorDiff:
    path: str
    status: str  # identical | changed | added | removed | retyped | reshaped
    max_abs: float | None = None
    max_rel: float | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "status": self.status,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "detail": self.detail,
        }


def diff_checkpoints(storage: Storage, a: str, b: str, *, max_bytes: int | None = None) -> list[TensorDiff]:
    """Per tensor: identical (same digest), changed (with max abs/relative difference), added, removed.

    Streams (see :mod:`.diffing`): memory stays a few blocks per tensor pair. The logical bytes
    compared are capped by ``max_bytes`` (default: the larger of 64 GiB and what the two checkpoints
    actually store); past it :class:`~ckptvault.errors.ResourceLimitError` is raised.
    """
    out: list[TensorDiff] = []
    with CheckpointView(storage, a) as left, CheckpointView(storage, b) as right:
        stored = left.stored_bytes() + right.stored_bytes()
        budget = ByteBudget(default_limit(stored) if max_bytes is None else max_bytes)
        left_leaves = {leaf.path: leaf for leaf in iter_leaves(left.manifest.tree, path=a)}
        right_leaves = {leaf.path: leaf for leaf in iter_leaves(right.manifest.tree, path=b)}
        for path in sorted(left_leaves.keys() - right_leaves.keys()):
            out.append(TensorDiff(path, "removed"))
        for path in sorted(right_leaves.keys() - left_leaves.keys()):
            out.append(TensorDiff(path, "added"))
        for path in sorted(left_leaves.keys() & right_leaves.keys()):
            la, lb = left_leaves[path], right_leaves[path]
            if (la.kind, la.dtype, la.shape) != (lb.kind, lb.dtype, lb.shape):
                status = "retyped" if (la.kind, la.dtype) != (lb.kind, lb.dtype) else "reshaped"
                detail = f"{la.dtype}{list(la.shape)} -> {lb.dtype}{list(lb.shape)}"
                out.append(TensorDiff(path, status, detail=detail))
                continue
            left_entry, right_entry = left.manifest.entry(la.tensor), right.manifest.entry(lb.tensor)
            same_bytes = (
                left_entry is not None and right_entry is not None and left_entry.digest == right_entry.digest
            )
            if same_bytes and la.node.get("view") == lb.node.get("view"):
                out.append(TensorDiff(path, "identical", 0.0, 0.0))  # same bytes, same geometry
                continue
            max_abs, max_rel, changed = compare_leaves(left, right, la.node, lb.node, path, budget)
            if max_abs is None or max_rel is None:  # no elements
                out.append(TensorDiff(path, "identical", 0.0, 0.0))
                continue
            out.append(TensorDiff(path, "changed" if changed else "identical", max_abs, max_rel))
    return out


def export_safetensors(
    storage: Storage,
    checkpoint: str,
    out: str,
    *,
    progress: Callable[[int], None] | None = None,
    max_bytes: int | None = None,
) -> int:
    """Writes every stored tensor into one standalone safetensors file; returns its size.

    Tensors are streamed one at a time, each digest-checked as it is read, into a temporary file
    next to ``out`` that is fsynced and renamed into place — a crash never leaves a partial export
    (to an object-store URL: one upload that appears whole or not at all).
    The bytes written are capped like a load's (``max_bytes``; :mod:`.budget`): chunks the manifest
    repeats are written out in full, so a few stored bytes must not become a disk-filling export.
    """
    target = Path(out)
    with CheckpointReader(storage, checkpoint) as reader:
        manifest = reader.manifest
        reader.budget(max_bytes).charge(manifest.tensor_bytes, "exporting this checkpoint's tensors")
        pieces = {piece for whole in manifest.sharded.values() for _, piece in whole.shards}
        stored: list[TensorEntry] = [t for t in manifest.tensors.values() if t.name not in pieces]
        stored.sort(key=lambda t: (t.file, t.offsets))
        entries: list[TensorEntry | ShardedEntry] = list(stored)
        entries += sorted(manifest.sharded.values(), key=lambda t: t.name)  # whole, from their pieces
        header = build_header(
            [(t.name, t.dtype, t.shape, t.nbytes) for t in entries],
            {
                "format": "ckptvault-export",
                "checkpoint_id": manifest.checkpoint_id,
                "step": str(manifest.step),
            },
        )
        output = storage_for(out)[0].publish_file(out, "export to") if is_url(out) else None
        with output or atomic_output(target, "export to") as handle:
            handle.write(header)
            for entry in entries:
                data = reader.fetch(entry.name, verify=True)
                handle.write(memoryview(data.data))
                if progress is not None:
                    progress(entry.nbytes)
        return len(header) + sum(t.nbytes for t in entries)
