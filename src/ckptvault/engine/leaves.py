"""Validating tree leaves against what is stored, before (or instead of) building anything.

Shared by :class:`~.arrays.BlobReader` (which builds arrays and tensors) and :class:`LeafChecker`
(which only checks, for ``verify``, lazy ``open`` and the pre-pass of ``load``): one set of rules for
shapes, views and declared sizes, so every reader refuses the same trees.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import MAX_NDIM
from ..errors import ResourceLimitError
from ..format.dtypes import TORCH_DTYPES, parse_numpy_dtype
from ..format.manifest import Manifest
from ..format.tree import TreeDecodeError

_INT_TYPE = {int}


def shape_of(node: dict[str, Any], path: str) -> tuple[int, ...]:
    shape = node.get("shape")
    # Per-item tests in C (map/min), not a Python call per dimension: this runs twice per tensor of
    # every load (50,000 for an optimizer state). type() is int: bools are refused.
    if (
        type(shape) is not list
        or len(shape) > MAX_NDIM
        or (shape and not ({*map(type, shape)} <= _INT_TYPE and min(shape) >= 0))
    ):
        raise TreeDecodeError(f"{path}: bad shape")
    return tuple(shape)


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def checked_view(
    view: Any, itemsize: int, shape: tuple[int, ...], stored: int, path: str
) -> tuple[int, list[int]]:
    if not isinstance(view, dict) or set(view) != {"byte_offset", "stride"}:
        raise TreeDecodeError(f"{path}: bad view")
    offset, stride = view["byte_offset"], view["stride"]
    if type(offset) is not int or offset < 0 or offset % itemsize:
        raise TreeDecodeError(f"{path}: bad view offset")
    if (
        not isinstance(stride, list)
        or len(stride) != len(shape)
        or not all(type(s) is int and s >= 0 for s in stride)
    ):
        raise TreeDecodeError(f"{path}: bad view strides")
    extent = (
        0 if 0 in shape else (sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) + 1) * itemsize
    )
    if offset + extent > stored:
        raise TreeDecodeError(f"{path}: view reaches past the stored bytes")
    return offset, stride


class LeafChecker:
    """Validates leaves against the stored tensor sizes without reading data or importing torch.

    ``verify`` uses it so that checking a checkpoint's structure costs milliseconds, not a torch
    import; it applies the same rules :class:`BlobReader` applies before building anything.
    """

    def __init__(self, stored_nbytes: Callable[[str], int], max_leaf_bytes: int | None = None) -> None:
        self._stored_nbytes = stored_nbytes
        self._max_leaf_bytes = max_leaf_bytes

    def decode_leaf(self, node: dict[str, Any], path: str) -> Any:
        tag = node["t"]
        if tag in ("torch.dtype", "torch.device", "torch.Size"):
            return None
        shape = shape_of(node, path)
        name = node.get("tensor")
        if not isinstance(name, str):
            raise TreeDecodeError(f"{path}: leaf must name its tensor")
        stored = self._stored_nbytes(name)
        dtype_name = node.get("dtype")
        if tag == "ndarray":
            itemsize = parse_numpy_dtype(dtype_name).itemsize  # type: ignore[arg-type]
        else:
            form = TORCH_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
            if form is None:
                raise TreeDecodeError(f"{path}: tensor dtype {str(dtype_name)[:30]!r} has no stored form")
            itemsize = form.itemsize
        if "view" in node and tag == "torch.Tensor":
            checked_view(node["view"], itemsize, shape, stored, path)
            leaf_nbytes_check(itemsize * numel(shape), self._max_leaf_bytes, path)
        elif stored != itemsize * numel(shape):
            raise TreeDecodeError(
                f"{path}: {stored} stored bytes, dtype and shape need {itemsize * numel(shape)}"
            )
        return None


def leaf_nbytes_check(nbytes: int, limit: int | None, what: str) -> None:
    """Refuses a tensor (or a total) of ``nbytes`` logical bytes past ``limit`` (None: no cap)."""
    if limit is not None and nbytes > limit:
        raise ResourceLimitError(f"{what[:200]}: declared size too large", needed=nbytes, limit=limit)


def stored_nbytes_of(manifest: Manifest) -> Callable[[str], int]:
    """The stored size of each tensor a tree names, for :class:`LeafChecker` (unknown: refused)."""

    def size(name: str) -> int:
        entry = manifest.entry(name)
        if entry is None:
            raise TreeDecodeError(f"tree references unknown tensor {name[:80]!r}")
        return entry.nbytes

    return size
