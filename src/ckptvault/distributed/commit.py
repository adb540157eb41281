"""The coordinator's commit of a distributed save: every rank's pieces and files, DCP's metadata
and the non-tensor values become one manifest, committed last (see :mod:`.writer`).

Non-tensor values (DCP's "bytes" items: an optimizer's ``param_groups``, counters) arrive here as
the objects themselves -- DCP's own collectives carried them from the rank that owned them -- and are
encoded once, in one tree with the tensors' leaves, in the tagged encoding every ckptvault value
uses: nothing is pickled into the checkpoint. Arrays or tensors inside such a value are stored in a
data file the coordinator writes itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..config import Settings
from ..engine.arrays import BlobCollector
from ..engine.sidecar import build_sidecar, sidecar_name
from ..engine.writer import NO_LEAVES, Syncer, resolve_step, write_data_file
from ..errors import CheckpointError, UnsupportedStateError
from ..format.digest import digest_bytes
from ..format.dtypes import TORCH_DTYPES
from ..format.manifest import CHUNKED_TENSORS, Manifest, parse_manifest
from ..format.sharding import SHARDED_TENSORS, sharded_digest
from ..format.strictjson import dumps
from ..format.tree import TreeEncoder
from ..storage.base import WriteTransaction
from ..storage.pools import shared_pool
from ..types import FileEntry, ShardedEntry, TensorEntry
from .metadata import DCP_FILE, encode_document


@dataclass(frozen=True)
class Piece:
    """One stored piece: whose, where it starts in the whole tensor, its entry once written."""

    fqn: str
    offsets: tuple[int, ...]
    name: str
    entry: TensorEntry | None = None


@dataclass(frozen=True)
class RankResult:
    """What one rank wrote: its files, its pieces, and the non-tensor values it owned."""

    rank: int
    files: tuple[FileEntry, ...]
    pieces: tuple[Piece, ...]
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RankFailure:
    rank: int
    message: str


class DistributedCheckpointError(CheckpointError):
    """A distributed save or load failed on at least one rank; ``failures`` maps each failed
    rank to what it raised (as text: the exceptions lived in other processes)."""

    def __init__(self, message: str, failures: dict[int, str]) -> None:
        super().__init__(message)
        self.failures = failures

    def __reduce__(self) -> Any:  # DCP carries it between ranks: rebuild with its failures
        return (type(self), (str(self), self.failures))


class _Leaf:
    """A tensor's leaf node, built here, inserted into the tree as it is."""

    def __init__(self, node: dict[str, Any]) -> None:
        self.node = node


class _Leaves:
    def __init__(self) -> None:
        self.collector = BlobCollector()

    def encode_leaf(self, value: Any, path: str, name: str) -> dict[str, Any] | None:
        if isinstance(value, _Leaf):
            return value.node
        return self.collector.encode_leaf(value, path, name)


def commit_checkpoint(
    txn: WriteTransaction,
    path: str,
    checkpoint_id: str,
    created_at: str,
    metadata: Any,
    ranks: list[RankResult],
    user_metadata: dict[str, Any],
    settings: Settings,
) -> Manifest:
    """Builds, checks (by parsing it back: the pieces must tile every tensor) and commits the
    manifest of a distributed save whose ranks all reported ``ranks``."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    algorithm = settings.digest
    files: dict[str, FileEntry] = {}
    tensors: dict[str, TensorEntry] = {}
    pieces: dict[str, list[Piece]] = {}
    values: dict[str, Any] = {}
    for rank in ranks:
        for entry in rank.files:
            _put(files, entry.name, entry, "file")
        for piece in rank.pieces:
            assert piece.entry is not None
            _put(tensors, piece.name, piece.entry, "stored tensor")
            pieces.setdefault(piece.fqn, []).append(piece)
        for fqn, value in rank.values.items():
            _put(values, fqn, value, "value")
    sharded: dict[str, ShardedEntry] = {}
    leaves: dict[str, Any] = {}
    described: dict[str, dict[str, Any]] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            if fqn not in values:
                raise CheckpointError(f"no rank wrote the value {fqn!r}")
            leaves[fqn] = values.pop(fqn)
            continue
        dtype = str(md.properties.dtype).removeprefix("torch.")
        form = TORCH_DTYPES.get(dtype)
        if form is None:
            raise UnsupportedStateError(fqn, f"dtype {dtype} has no stored form")
        size = tuple(int(s) for s in md.size)
        own = pieces.pop(fqn, [])
        if not (len(own) == 1 and own[0].name == fqn):  # else stored whole, under its own name
            shards = sorted((p.offsets, p.name) for p in own)
            digests = [(p.offsets, str(p.entry.digest if p.entry else "")) for p in own]
            itemsize = (
                tensors[own[0].name].nbytes // max(1, math.prod(tensors[own[0].name].shape)) if own else 0
            )
            sharded[fqn] = ShardedEntry(
                fqn,
                form.code,
                size,
                tuple(shards),
                sharded_digest(algorithm, form.code, size, digests),
                math.prod(size) * itemsize,
            )
        node: dict[str, Any] = {
            "t": "torch.Tensor",
            "tensor": fqn,
            "dtype": dtype,
            "shape": list(size),
            "device": "cpu",
        }
        if md.properties.requires_grad:
            node["requires_grad"] = True
        leaves[fqn] = _Leaf(node)
        described[fqn] = {
            "dtype": dtype,
            "requires_grad": bool(md.properties.requires_grad),
            "size": list(size),
            "chunks": [[[int(o) for o in c.offsets], [int(s) for s in c.sizes]] for c in md.chunks],
        }
    if pieces or values:
        raise CheckpointError(
            f"ranks wrote parts DCP's metadata does not list: {sorted([*pieces, *values])[:5]}"
        )
    codec = _Leaves()
    tree = TreeEncoder(codec).encode(nest(leaves, metadata.planner_data), "state")
    step = resolve_step(path, user_metadata)
    syncing = Syncer(shared_pool("sync"))
    hash_pool = shared_pool("hash")
    try:
        extra = codec.collector.finalize()
        if extra:  # arrays inside non-tensor values: one more data file, the coordinator's
            entry, stored = write_data_file(
                syncing, txn, "data-values-00000.safetensors", extra, checkpoint_id, algorithm, hash_pool
            )
            _put(files, entry.name, entry, "file")
            for t in stored:
                _put(tensors, t.name, t, "stored tensor")
        logical = len(leaves)
        tensor_bytes = sum(t.nbytes for t in tensors.values())
        documents = {
            sidecar_name(step): dumps(
                build_sidecar(
                    checkpoint_id=checkpoint_id,
                    step=step,
                    created_at=created_at,
                    metadata=user_metadata,
                    tensors=logical,
                    tensor_bytes=tensor_bytes,
                ),
                indent=2,
            ),
            DCP_FILE: encode_document(
                described, metadata.planner_data, metadata.storage_meta, metadata.version
            ),
        }
        for name, data in documents.items():
            out = txn.create(name, size_hint=len(data))
            out.write(data)
            syncing.start(out)
            _put(files, name, FileEntry(name, len(data), digest_bytes(algorithm, data)), "file")
        # The manifest is built and proven while those files' fsyncs run (both are on the save's
        # critical path, after every rank has written); the commit waits for the fsyncs while the
        # manifest's own runs.
        features = (SHARDED_TENSORS,) if sharded else ()
        if any(t.chunks is not None for t in tensors.values()):
            features = (CHUNKED_TENSORS, *features)
        manifest = Manifest(
            checkpoint_id=checkpoint_id,
            created_at=created_at,
            step=step,
            digest_algorithm=algorithm,
            files=files,
            tensors=tensors,
            tree=tree,
            metadata=TreeEncoder(NO_LEAVES).encode(user_metadata, "metadata"),
            required_features=features,
            sharded=sharded,
        )
        data = manifest.to_json()
        parse_manifest(data, path=path)  # the proof every reader makes, before anything is visible
        txn.commit(data, wait_files=syncing.wait)
    finally:
        syncing.settle()  # every fsync done before an abort touches the files
    return manifest


def _put(table: dict[str, Any], key: str, value: Any, what: str) -> None:
    if key in table:
        raise CheckpointError(f"two ranks wrote the {what} {key[:80]!r}")
    table[key] = value


def nest(leaves: dict[str, Any], planner_data: Any) -> Any:
    """The state's shape before DCP flattened it: the default planners' ``planner_data`` maps each
    flat key to its path (dict keys, list indices). Without such a map the state stays flat."""
    if not isinstance(planner_data, dict) or not all(
        isinstance(p, tuple) and p and all(type(k) in (str, int) for k in p) for p in planner_data.values()
    ):
        return dict(leaves)
    root: dict[Any, Any] = {}
    for fqn, value in leaves.items():
        path = planner_data.get(fqn, (fqn,))
        node = root
        for key in path[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                return dict(leaves)  # paths that contradict each other: keep the flat keys
            node = child
        if path[-1] in node:
            return dict(leaves)
        node[path[-1]] = value
    return _lists(root)


def _lists(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    items = {k: _lists(v) for k, v in node.items()}
    if items and all(type(k) is int for k in items) and sorted(items) == list(range(len(items))):
        return [items[i] for i in range(len(items))]
    return items
