"""Importing legacy checkpoints (``torch.save`` files) without ever running their pickle code.

``torch.load(weights_only=True)`` uses torch's restricted unpickler: only tensors, containers and
an allow-list of torch types can be built. When a file needs anything else we do not widen the
allow-list; we name the globals it wants (found by torch's scanner, which reads opcodes and executes
nothing) so the user can decide, outside ckptvault, whether to trust the file.

What a safe load builds is still bounded before it is saved: pickle's memo lets a small file hold a
list that contains the same list 1000 times, 20 levels deep (1000**20 paths, which the tree encoder
would walk one by one), or a tensor ``expand()``-ed from 4 bytes of storage to 256 GiB (which saving
would make contiguous). :func:`check_bounds` measures both in time linear in the distinct objects
and refuses with :class:`~ckptvault.errors.ResourceLimitError` before any encoding or allocation.
"""

from __future__ import annotations

import os
import zipfile
from collections import OrderedDict
from typing import Any

from .api import PathLike, save
from .config import MAX_TREE_NODES
from .engine.budget import default_limit
from .errors import CheckpointError, ResourceLimitError, UnsafeLegacyFileError, UnsupportedStateError
from .storage.localfiles import file_size
from .types import CheckpointInfo


def read_legacy(path: PathLike) -> Any:
    """The object in a ``.pt``/``.pth``/``.bin`` torch file, or a ``.safetensors`` file's tensors."""
    source = os.fspath(path)
    if source.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(source)
        except Exception as exc:  # the safetensors library raises its own single error type
            raise CheckpointError(f"{source}: not a valid safetensors file: {exc}") from exc
    import torch
    import torch.serialization

    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=False)
    except FileNotFoundError:
        raise
    except Exception as exc:
        if type(exc).__name__ != "UnpicklingError":
            raise CheckpointError(f"{source}: cannot read as a torch file: {exc}") from exc
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(source)
        except Exception:  # scanning itself failed: still refuse, just without names
            unsafe = []
        names = ", ".join(unsafe) if unsafe else "(could not list them)"
        raise UnsafeLegacyFileError(
            f"{source} needs Python globals that a safe load refuses to construct: {names}. "
            "ckptvault never unpickles arbitrary code; convert the file in a trusted environment "
            "(e.g. save its state_dict()) and import that."
        ) from exc


def _children(value: Any) -> list[Any] | None:
    """What the tree encoder will visit inside ``value``; None for a leaf."""
    kind = type(value)
    if kind in (list, tuple, set, frozenset):
        return list(value)
    if kind is dict or kind is OrderedDict:
        out = [*value.keys(), *value.values()]
        meta = getattr(value, "_metadata", None) if kind is OrderedDict else None
        return out if meta is None else [*out, meta]
    return None


def _logical_nbytes(value: Any) -> int:
    """Bytes saving would write for a tensor or array: its logical size, not its storage's."""
    nbytes = getattr(value, "nbytes", None)
    if hasattr(value, "numel") and hasattr(value, "element_size"):
        return int(value.numel()) * int(value.element_size())
    return int(nbytes) if isinstance(nbytes, int) else 0


def check_bounds(state: Any, *, max_nodes: int, max_bytes: int) -> None:
    """Refuses a loaded legacy object that would expand past ``max_nodes`` encoded nodes or whose
    distinct tensors hold more than ``max_bytes`` logical bytes.

    The expanded size of each container is computed once (memoised by identity, iteratively), so a
    graph of shared references costs its distinct objects, not its paths. A reference cycle is
    refused as the encoder would refuse it.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()
    tensors: dict[int, Any] = {}
    tensor_bytes = 0
    stack: list[tuple[Any, list[Any] | None]] = [(state, None)]
    while stack:
        value, finished = stack.pop()
        key = id(value)
        if finished is not None:
            active.discard(key)
            total = 1 + sum(sizes.get(id(child), 1) for child in finished)
            if total > max_nodes:
                raise ResourceLimitError(
                    "the legacy file expands to too many objects (shared references)",
                    needed=total,
                    limit=max_nodes,
                )
            sizes[key] = total
            continue
        if key in sizes:
            continue
        if key in active:
            raise UnsupportedStateError("state", "the legacy file contains a reference cycle")
        children = _children(value)
        if children is None:
            if key not in tensors and (hasattr(value, "numel") or hasattr(value, "nbytes")):
                tensors[key] = value  # kept alive so ids stay unique while we count
                tensor_bytes += _logical_nbytes(value)
                if tensor_bytes > max_bytes:
                    raise ResourceLimitError(
                        "the legacy file's tensors are larger than what it stores (expanded views?)",
                        needed=tensor_bytes,
                        limit=max_bytes,
                    )
            continue
        active.add(key)
        stack.append((value, children))
        stack.extend((child, None) for child in children)


def _check_archive(source: str, max_bytes: int) -> None:
    """A torch zip whose members declare more uncompressed bytes than the cap is refused unread."""
    try:
        if not zipfile.is_zipfile(source):
            return
        with zipfile.ZipFile(source) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return  # torch.load reports what is wrong with the file
    if declared > max_bytes:
        raise ResourceLimitError(
            "the legacy archive declares too many bytes", needed=declared, limit=max_bytes
        )


def import_legacy(
    source: PathLike, target: PathLike, *, overwrite: bool = False, max_bytes: int | None = None
) -> CheckpointInfo:
    """Converts a legacy torch (or safetensors) file into a verified ckptvault checkpoint.

    ``max_bytes`` caps the tensor bytes the conversion may write (and the archive's declared size);
    the default is the larger of 64 GiB and the source file's size (see
    :mod:`ckptvault.engine.budget`). Past it, or past the encoder's node limit, it raises
    :class:`~ckptvault.errors.ResourceLimitError` before writing anything.
    """
    path = os.fspath(source)
    limit = max_bytes if max_bytes is not None else default_limit(file_size(path))
    _check_archive(path, limit)
    state = read_legacy(source)
    check_bounds(state, max_nodes=MAX_TREE_NODES, max_bytes=limit)
    return save(
        target, state, metadata={"imported_from": os.path.basename(os.fspath(source))}, overwrite=overwrite
    )
