"""``StorageReader``: torch.distributed.checkpoint's load from a ckptvault checkpoint, at any world
size.

``read_metadata`` rebuilds DCP's ``Metadata`` from the manifest and ``dcp.json`` (:mod:`.metadata`)
-- nothing is unpickled. DCP's planner then asks each rank for the boxes of each tensor it holds
now, whatever the world size at save time; ``read_data`` reads, for each box, only the stored row
blocks that overlap it, verifies each block's digest (``verify=True``, the default) and copies the
overlap into the rank's tensor. A block several boxes need is read once (a small cache).

Non-tensor values come from the manifest's tree, decoded without pickle, and are handed to DCP's
default load planner the way its own ``load_bytes`` would place an unpickled value; other planners,
which can only take pickled bytes, are refused with a clear error.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..config import Settings
from ..engine.arrays import BlobReader, torch_dtype
from ..engine.reader import CheckpointReader
from ..errors import CorruptCheckpointError, UnsupportedStateError
from ..format.dtypes import TORCH_DTYPES
from ..storage.resolve import storage_for
from ..types import TensorEntry
from .metadata import DCP_FILE, ChunkPieces, chunk_pieces_of, parse_document
from .portable import portable

_CACHED_PIECES = 4


class _Placeholder:
    """Stands for a DCP tensor while the tree's non-tensor values are decoded."""


class _ValuesOnly:
    """Leaf decoder for reading a checkpoint's values: DCP's own tensors stay placeholders (the
    planner reads them box by box); arrays inside values are read and verified here."""

    def __init__(self, reader: CheckpointReader, dcp_tensors: set[str]) -> None:
        self._dcp = dcp_tensors
        self._blobs = BlobReader(lambda name: reader.fetch(name, verify=True), "cpu", None)

    def decode_leaf(self, node: dict[str, Any], path: str) -> Any:
        if node.get("t") == "torch.Tensor" and node.get("tensor") in self._dcp:
            return _Placeholder()
        return self._blobs.decode_leaf(node, path)


class StorageReader:
    """DCP ``StorageReader`` of the ckptvault checkpoint at ``path`` (a directory or a URL)."""

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True) -> None:
        self.path = os.fspath(path)
        self.verify = verify
        self._reader: CheckpointReader | None = None
        self._index: dict[Any, ChunkPieces] = {}
        self._dtypes: dict[str, Any] = {}
        self._values: dict[str, Any] = {}
        self.bytes_read = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_reader=None, _index={}, _dtypes={}, _values={})
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.close()
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._read_metadata()
        except BaseException as exc:
            raise portable(exc) from exc  # DCP pickles it to every other rank

    def _read_metadata(self) -> Any:
        import torch
        from torch.distributed.checkpoint.metadata import (
            BytesStorageMetadata,
            ChunkStorageMetadata,
            Metadata,
            MetadataIndex,
            StorageMeta,
            TensorProperties,
            TensorStorageMetadata,
        )

        self.close()
        reader = self._reader = CheckpointReader(*storage_for(self.path))
        manifest = reader.manifest
        if DCP_FILE not in manifest.files:
            raise CorruptCheckpointError(
                "not a distributed checkpoint (no dcp.json): load it with ckptvault.load",
                path=self.path,
                kind="bad-manifest",
            )
        doc = parse_document(reader.read_file(DCP_FILE), self.path)
        entries: dict[str, Any] = {}
        self._index, self._dtypes = {}, {}
        for fqn, raw in doc["tensors"].items():
            entry = manifest.entry(fqn)
            if entry is None:
                raise CorruptCheckpointError(
                    f"{DCP_FILE} lists {fqn[:80]!r}, the manifest does not", path=self.path
                )
            form = TORCH_DTYPES[raw["dtype"]]
            stored_shape = tuple(raw["size"]) + ((form.extra_dim,) if form.extra_dim else ())
            if entry.dtype != form.code or tuple(entry.shape) != (
                stored_shape if isinstance(entry, TensorEntry) else tuple(raw["size"])
            ):
                raise CorruptCheckpointError(
                    f"{DCP_FILE} describes {fqn[:80]!r} as {raw['dtype']} {raw['size']}, the manifest "
                    f"stores {entry.dtype} {list(entry.shape)}",
                    path=self.path,
                    kind="bad-manifest",
                )
            chunks = [(tuple(o), tuple(s)) for o, s in raw["chunks"]]
            dtype = self._dtypes[fqn] = torch_dtype(raw["dtype"], fqn)
            for pieces in chunk_pieces_of(fqn, entry, chunks, manifest.tensors):
                self._index[MetadataIndex(fqn, pieces.offsets)] = pieces
            entries[fqn] = TensorStorageMetadata(
                TensorProperties(dtype=dtype, requires_grad=raw["requires_grad"]),
                torch.Size(raw["size"]),
                [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks],
            )
        self._values = _values(reader, set(doc["tensors"]), doc["planner_data"])
        for fqn in self._values:
            entries[fqn] = BytesStorageMetadata()
        meta = doc["storage_meta"]
        return Metadata(
            state_dict_metadata=entries,
            planner_data=doc["planner_data"],
            storage_data=None,
            storage_meta=StorageMeta(**meta) if meta is not None else None,
            version=doc["dcp_version"],
        )

    def set_up_storage_reader(self, metadata: Any, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if self._reader is None:  # DCP read the metadata on another rank only: read it here too
            self.read_metadata()

    def prepare_local_plan(self, plan: Any) -> Any:
        return plan

    def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
        return plans

    def read_data(self, plan: Any, planner: Any) -> Any:
        import torch
        from torch.distributed.checkpoint.planner import LoadItemType

        future: Any = torch.futures.Future()  # what DCP waits on
        cache: OrderedDict[str, Any] = OrderedDict()
        try:
            boxes = []
            for item in plan.items:
                if item.type == LoadItemType.BYTE_IO:
                    _place_value(planner, item, self._values[item.storage_index.fqn])
                else:  # the planner is asked on this thread only; its answers are filled in parallel
                    boxes.append((item, planner.resolve_tensor(item).detach()))
            # A few boxes at a time: while one thread hashes a block, another waits for the disk.
            threads = min(Settings.from_env().io_threads, len(boxes))
            if threads > 1:
                with ThreadPoolExecutor(threads, thread_name_prefix="ckptvault-dcp-read") as pool:
                    list(pool.map(lambda box: self._copy_box(box[0], box[1], cache), boxes))
            else:
                for item, target in boxes:
                    self._copy_box(item, target, cache)
            for item, target in boxes:
                planner.commit_tensor(item, target)
        except BaseException as exc:
            future.set_exception(portable(exc))  # DCP gathers it to the coordinator, pickled
            return future
        future.set_result(None)
        return future

    def _copy_box(self, item: Any, target: Any, cache: OrderedDict[str, Any]) -> None:
        """Fills ``target`` with the box ``item`` names, from the row blocks that overlap it."""
        chunk = self._index.get(item.storage_index)
        if chunk is None:
            raise CorruptCheckpointError(
                f"no stored chunk {item.storage_index.fqn[:80]!r} at {list(item.storage_index.offset or ())}",
                path=self.path,
            )
        start = tuple(int(s) for s in item.storage_offsets)
        lengths = tuple(int(n) for n in item.lengths)
        dtype = self._dtypes[item.storage_index.fqn]
        if not lengths:  # a 0-d tensor: one piece, the value
            target.copy_(self._piece(chunk.pieces[0][1], dtype, (), cache).reshape(()))
            return
        lo, hi = start[0], start[0] + lengths[0]
        inner = tuple(slice(s, s + n) for s, n in zip(start[1:], lengths[1:], strict=True))
        whole_rows = not any(start[1:]) and lengths[1:] == tuple(chunk.sizes[1:])
        for row, name, rows in chunk.pieces:
            a, b = max(lo, row), min(hi, row + rows)
            if a >= b:
                continue
            dest = target[a - lo : b - lo]
            if whole_rows and (a, b) == (row, row + rows) and self._read_into(name, dest, cache):
                continue
            block = self._piece(name, dtype, (rows, *chunk.sizes[1:]), cache)
            index = (slice(a - row, b - row), *inner)
            dest.copy_(block[index])

    def _read_into(self, name: str, dest: Any, cache: OrderedDict[str, Any]) -> bool:
        """Reads (and verifies) a whole piece straight into ``dest`` when that is plain contiguous
        host memory of the piece's size: no intermediate buffer, no copy. False: take the general
        path."""
        import torch

        if name in cache or dest.device.type != "cpu" or not dest.is_contiguous() or dest.numel() == 0:
            return False
        assert self._reader is not None
        entry = self._reader.manifest.tensors.get(name)
        if entry is None or entry.chunks is not None or entry.nbytes != dest.numel() * dest.element_size():
            return False
        out = dest.reshape(-1).view(torch.uint8).numpy()
        got = self._reader.fetch(name, verify=self.verify, out=out)
        if got is not out:  # pragma: no cover - fetch fills ``out`` for data-file tensors
            out[:] = got
        with self._lock:
            self.bytes_read += out.nbytes
        return True

    def _piece(self, name: str, dtype: Any, shape: tuple[int, ...], cache: OrderedDict[str, Any]) -> Any:
        import torch

        with self._lock:
            found = cache.get(name)
            if found is not None:
                cache.move_to_end(name)
                return found
        assert self._reader is not None
        data: np.ndarray = self._reader.fetch(name, verify=self.verify)
        with self._lock:
            self.bytes_read += data.nbytes
        raw = torch.from_numpy(data) if data.size else torch.empty(0, dtype=torch.uint8)
        expected = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if raw.numel() != expected:
            raise CorruptCheckpointError(
                f"stored piece is {raw.numel()} bytes, its box needs {expected}", path=self.path, tensor=name
            )
        tensor = raw.view(dtype).reshape(shape) if expected else torch.empty(shape, dtype=dtype)
        with self._lock:
            cache[name] = tensor
            if len(cache) > _CACHED_PIECES:
                cache.popitem(last=False)
        return tensor

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True


def _values(reader: CheckpointReader, dcp_tensors: set[str], planner_data: Any) -> dict[str, Any]:
    """The checkpoint's non-tensor values by DCP key, decoded from the tree (no pickle)."""
    state = reader.decode_tree(_ValuesOnly(reader, dcp_tensors))
    out: dict[str, Any] = {}
    if isinstance(planner_data, dict) and planner_data:
        for fqn, path in planner_data.items():
            if fqn in dcp_tensors:
                continue
            node = state
            try:
                for key in path:
                    node = node[key]
            except (KeyError, IndexError, TypeError) as exc:
                raise CorruptCheckpointError(
                    f"value {fqn[:80]!r} missing from the tree", path=reader.path
                ) from exc
            out[fqn] = node
        return out
    if not isinstance(state, dict):
        raise CorruptCheckpointError("a distributed checkpoint's tree must be a dict", path=reader.path)
    return {k: v for k, v in state.items() if k not in dcp_tensors and not isinstance(v, _Placeholder)}


def _place_value(planner: Any, item: Any, value: Any) -> None:
    """Puts a decoded value where DCP's default planner's ``load_bytes`` puts an unpickled one."""
    mappings = getattr(planner, "mappings", None)
    if not hasattr(planner, "flatten_state_dict") or mappings is None:
        raise UnsupportedStateError(
            item.dest_index.fqn, "this load planner only takes pickled bytes; use DCP's default planner"
        )
    fqn = item.dest_index.fqn
    if planner.flatten_state_dict:
        from torch.distributed.checkpoint._traverse import set_element

        set_element(planner.original_state_dict, mappings[fqn], value)
    else:
        planner.state_dict[fqn] = value


def planner_paths(path: str | os.PathLike[str]) -> dict[str, tuple[Any, ...]]:
    """Each saved key's path in the state as DCP's default planner flattened it (read from
    ``dcp.json``, verified): what a caller checks before a load it wants strict everywhere but in
    parts it knows may be absent (a rank's own part at another world size)."""
    with CheckpointReader(*storage_for(os.fspath(path))) as reader:
        if DCP_FILE not in reader.manifest.files:
            return {}
        data = parse_document(reader.read_file(DCP_FILE), reader.path)["planner_data"]
    if not isinstance(data, dict):
        return {}
    return {str(k): tuple(v) for k, v in data.items() if isinstance(v, tuple)}
