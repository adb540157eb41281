"""Moving checkpoints in and out of DCP's own format (``FileSystemWriter`` directories).

:func:`import_dcp` reads a DCP directory -- a pickled ``.metadata`` and ``__<rank>_<n>.distcp``
files -- and writes an ordinary ckptvault checkpoint with the same content, sharded tensors still
sharded. Nothing in the source is trusted:

* ``.metadata`` is read by a restricted unpickler (:mod:`.interop_metadata`): an allow-list of
  DCP's metadata types, refused globals named in :class:`~ckptvault.errors.UnsafeLegacyFileError`;
  every item range is checked against its file before anything is read or allocated.
* each tensor item is a ``torch.save`` zip: it is loaded with ``torch.load(weights_only=True)``
  (torch's restricted unpickler) after its zip's declared sizes are checked against the item's
  length, and must have the dtype and shape the metadata promised;
* each bytes item (a non-tensor value) is a ``torch.save``'d object, loaded through
  :func:`ckptvault.legacy.read_legacy` -- the same ``weights_only=True`` path as ``ckptvault
  import`` -- and bounded by :func:`ckptvault.legacy.check_bounds`.

The checkpoint is written through our own :class:`~.writer.StorageWriter`, driven here in one
process the way DCP would drive it: the chunks are split into groups of at most
``group_bytes``; each group is one ``write_data`` call (its own data files), so at most one group's
tensors are in memory at a time. The commit is the writer's: one manifest, after every file.

:func:`export_dcp` goes the other way: a verified load of the whole (consolidated) state, then
``dcp.save`` with ``FileSystemWriter`` in one process -- DCP then pickles its metadata as DCP does,
which is what a user exporting to DCP asks for.
"""

from __future__ import annotations

import io
import os
import tempfile
import uuid
import zipfile
from pathlib import Path
from typing import Any

from ..config import MAX_TREE_NODES
from ..engine.budget import default_limit
from ..errors import (
    CheckpointError,
    CheckpointExistsError,
    CorruptCheckpointError,
    UnsafeLegacyFileError,
    UnsupportedStateError,
)
from ..format.manifest import Manifest
from ..storage.foreign import read_range, remove_tree, replace_directory, scratch_file
from .commit import RankFailure
from .interop_metadata import DcpCheckpoint, DcpTensor, Location, read_metadata
from .writer import FILES_FQN, StorageWriter

DEFAULT_GROUP_BYTES = 256 * 1024 * 1024


class _Items:
    """Reads the items of one DCP directory: each range read once, on demand, checked."""

    def __init__(self, ckpt: DcpCheckpoint, scratch: str) -> None:
        self.ckpt = ckpt
        self.scratch = scratch
        self.error: BaseException | None = None  # the first typed failure, for the caller

    def read(self, location: Location) -> bytes:
        data = read_range(self.ckpt.root / location.file, location.offset, location.length)
        if len(data) != location.length:
            raise CorruptCheckpointError(
                f"item at bytes {location.offset}..{location.offset + location.length} is cut short",
                path=str(self.ckpt.root),
                file=location.file,
                kind="truncated",
            )
        _check_archive(data, location, self.ckpt.root)
        return data

    def tensor(self, tensor: DcpTensor, offsets: tuple[int, ...]) -> Any:
        import torch

        chunk = next(c for c in tensor.chunks if c.offsets == offsets)
        if chunk.location is None:  # an empty chunk: nothing was stored
            return torch.empty(chunk.sizes, dtype=tensor.dtype)
        data = self.read(chunk.location)
        where = f"{self.ckpt.root}/{chunk.location.file}"
        try:
            # weights_only=True: torch's restricted unpickler (tensors and an allow-list of torch
            # types only); the item's bytes are untrusted input.
            value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True, mmap=False)
        except Exception as exc:
            # A refusal of torch's safe load is a pickle.UnpicklingError, told apart by name as in
            # legacy.py: this module never imports pickle.
            if type(exc).__name__ == "UnpicklingError":
                raise UnsafeLegacyFileError(
                    f"{where}: the item of tensor {tensor.fqn!r} at {list(offsets)} needs Python globals "
                    f"a safe load refuses: {_unsafe_names(data)}; nothing was run"
                ) from exc
            raise CorruptCheckpointError(
                f"the item at {list(offsets)} is not a torch.save'd tensor: "
                f"{type(exc).__name__}: {str(exc)[:200]}",
                path=str(self.ckpt.root),
                file=chunk.location.file,
                tensor=tensor.fqn,
            ) from exc
        if (
            not isinstance(value, torch.Tensor)
            or value.dtype != tensor.dtype
            or tuple(value.shape) != chunk.sizes
            or value.layout != torch.strided
        ):
            got = (
                f"{value.dtype} {list(value.shape)}"
                if isinstance(value, torch.Tensor)
                else type(value).__name__
            )
            raise CorruptCheckpointError(
                f"the item at {list(offsets)} holds {got}, "
                f"the metadata says {tensor.dtype} {list(chunk.sizes)}",
                path=str(self.ckpt.root),
                file=chunk.location.file,
                tensor=tensor.fqn,
            )
        return value.detach()

    def value(self, fqn: str) -> Any:
        from ..legacy import check_bounds, read_legacy

        location = self.ckpt.values[fqn]
        data = self.read(location)
        # read_legacy takes a path: the item's bytes go to a private scratch file (values are small).
        with scratch_file(self.scratch, data, ".pt") as path:
            try:
                value = read_legacy(path)
            except UnsafeLegacyFileError as exc:
                message = str(exc).replace(path, "the item")
                raise UnsafeLegacyFileError(
                    f"{self.ckpt.root}/{location.file}: the value {fqn!r}: {message}"
                ) from exc
            except CheckpointError as exc:
                raise CorruptCheckpointError(
                    f"the value {fqn[:80]!r} is not a torch.save'd object: "
                    f"{str(exc).replace(path, 'item')[:300]}",
                    path=str(self.ckpt.root),
                    file=location.file,
                ) from exc
        check_bounds(value, max_nodes=MAX_TREE_NODES, max_bytes=default_limit(len(data)))
        return value


def _check_archive(data: bytes, location: Location, root: Path) -> None:
    """An item is a torch.save zip whose members (stored, not compressed) fit in the item: a
    member that declares more bytes than the item holds is refused before torch allocates it."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CorruptCheckpointError(
            f"the item at bytes {location.offset}..{location.offset + location.length} "
            "is not a torch.save archive",
            path=str(root),
            file=location.file,
        ) from exc
    if declared > len(data):
        raise CorruptCheckpointError(
            f"an item's archive declares {declared} bytes, it holds {len(data)}",
            path=str(root),
            file=location.file,
            kind="size-mismatch",
        )


def _unsafe_names(data: bytes) -> str:
    import torch.serialization

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))  # reads opcodes only
    except Exception:
        names = []
    return ", ".join(names) if names else "(could not list them)"


class _ImportPlanner:
    """What :meth:`StorageWriter.write_data` asks of a planner, answered from the DCP files. A
    failure is kept (``items.error``) so the caller re-raises it typed: the writer reports a
    rank's failure to the coordinator as text."""

    def __init__(self, items: _Items) -> None:
        self.items = items

    def resolve_data(self, item: Any) -> Any:
        try:
            offsets = tuple(int(o) for o in item.index.offset)
            return self.items.tensor(self.items.ckpt.tensors[item.index.fqn], offsets)
        except BaseException as exc:
            self.items.error = self.items.error or exc
            raise

    def lookup_object(self, index: Any) -> Any:
        try:
            return self.items.value(index.fqn)
        except BaseException as exc:
            self.items.error = self.items.error or exc
            raise


def _plans(ckpt: DcpCheckpoint, group_bytes: int) -> list[Any]:
    """The write items, in groups of at most ``group_bytes`` of tensor data (a larger chunk is a
    group of its own); the values go with the first group."""
    import torch
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    groups: list[list[Any]] = [[WriteItem(MetadataIndex(fqn), WriteItemType.BYTE_IO) for fqn in ckpt.values]]
    filled = 0
    for tensor in ckpt.tensors.values():
        itemsize = torch.empty(0, dtype=tensor.dtype).element_size()
        props = TensorProperties(dtype=tensor.dtype, requires_grad=tensor.requires_grad)
        for chunk in tensor.chunks:
            nbytes = itemsize * _numel(chunk.sizes)
            if groups[-1] and filled + nbytes > group_bytes:
                groups.append([])
                filled = 0
            whole = not any(chunk.offsets) and chunk.sizes == tensor.size
            groups[-1].append(
                WriteItem(
                    MetadataIndex(tensor.fqn, chunk.offsets),
                    WriteItemType.TENSOR if whole else WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        ChunkStorageMetadata(torch.Size(chunk.offsets), torch.Size(chunk.sizes)),
                        props,
                        torch.Size(tensor.size),
                    ),
                )
            )
            filled += nbytes
    return [SavePlan(items) for items in groups]


def _numel(sizes: tuple[int, ...]) -> int:
    out = 1
    for s in sizes:
        out *= s
    return out


def _dcp_metadata(ckpt: DcpCheckpoint, writer: StorageWriter) -> Any:
    """DCP's ``Metadata`` rebuilt from the checked plain values (never the unpickled graph)."""
    import torch
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        TensorProperties,
        TensorStorageMetadata,
    )

    entries: dict[str, Any] = {}
    for fqn, tensor in ckpt.tensors.items():
        entries[fqn] = TensorStorageMetadata(
            TensorProperties(dtype=tensor.dtype, requires_grad=tensor.requires_grad),
            torch.Size(tensor.size),
            [ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in tensor.chunks],
        )
    for fqn in ckpt.values:
        entries[fqn] = BytesStorageMetadata()
    return Metadata(
        state_dict_metadata=entries,
        planner_data=ckpt.planner_data,
        storage_data=None,
        storage_meta=writer.storage_meta(),
        version=ckpt.version,
    )


def import_dcp(
    src_dir: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    group_bytes: int = DEFAULT_GROUP_BYTES,
) -> Manifest:
    """Converts the DCP checkpoint directory ``src_dir`` (``FileSystemWriter``'s format, any
    world size) into a ckptvault checkpoint at ``dst`` (a path or URL); returns its manifest.
    Sharded tensors stay sharded (``ckptvault.distributed.load`` reshards them; ``ckptvault.load``
    assembles them). Hostile input raises :class:`~ckptvault.errors.UnsafeLegacyFileError` or
    :class:`~ckptvault.errors.CorruptCheckpointError` (or another ``CheckpointError``), and leaves
    nothing at ``dst``."""
    root = Path(os.fspath(src_dir))
    ckpt = read_metadata(root)
    plans = _plans(ckpt, max(1, group_bytes))
    writer = StorageWriter(dst, metadata={"imported_from": f"dcp:{root.name}"}, overwrite=overwrite)
    with tempfile.TemporaryDirectory(prefix="ckptvault-import-dcp-") as scratch:
        items = _Items(ckpt, scratch)
        planner = _ImportPlanner(items)
        try:
            writer.set_up_storage_writer(True, rank=0)
            plans = writer.prepare_global_plan(plans)
            results: list[list[Any]] = []
            for plan in plans:
                result = writer.write_data(plan, planner).wait()
                failed = [
                    r.storage_data
                    for r in result
                    if r.index.fqn == FILES_FQN and isinstance(r.storage_data, RankFailure)
                ]
                if items.error is not None:
                    raise items.error
                if failed:
                    raise CheckpointError(f"importing {root}: {failed[0].message}")
                results.append(result)
            writer.finish(_dcp_metadata(ckpt, writer), results)
        except BaseException:
            writer.abort()
            raise
    assert writer.committed is not None
    return writer.committed


def export_dcp(
    src: str | os.PathLike[str], dst_dir: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Writes the ckptvault checkpoint ``src`` (sharded or not; a path or URL) as a DCP
    ``FileSystemWriter`` directory ``dst_dir`` that ``dcp.load`` with ``FileSystemReader`` reads.

    The source is loaded whole and verified (consolidated: sharded tensors become whole ones) and
    saved by DCP in this one process; the directory appears under its name only when complete
    (written beside it, then renamed). An existing non-empty ``dst_dir`` is replaced only with
    ``overwrite``."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    from ..api import load

    target = Path(os.fspath(dst_dir))
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise CheckpointExistsError(f"{target} exists and is not empty (pass overwrite=True to replace it)")
    state = load(src, verify=True)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise UnsupportedStateError("state", "DCP saves only a dict with string keys at the top")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.dcp-export-{uuid.uuid4().hex[:12]}"
    try:
        dcp_save(state, storage_writer=FileSystemWriter(staging), no_dist=True)
        replace_directory(staging, target)
    except BaseException:
        remove_tree(staging)
        raise
    return target
