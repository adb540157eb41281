"""Comparing one tensor of two checkpoints in blocks: memory stays a few blocks, whatever they claim.

Each side is turned into a stream of float64 (complex128) blocks of its *logical* elements in C
order: a plain tensor straight from its verified stored bytes (:mod:`.streams`), a view by walking
the decoded view slice by slice (its stored span, already charged to the view's budget, is the only
thing held whole). The two streams are re-cut to equal lengths and folded into max abs / relative
differences. Before a pair is compared its logical size is charged to the diff's byte budget, so a
stride-0 view claiming a TiB is refused with a typed error instead of being iterated for hours.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..errors import CorruptCheckpointError
from ..format.dtypes import TORCH_DTYPES, parse_numpy_dtype
from ..types import TensorEntry
from .arrays import torch_dtype
from .budget import ByteBudget
from .lazy import CheckpointView, decode_node
from .streams import iter_stored_bytes

BLOCK_ELEMENTS = 1 << 20


def as_float(value: Any) -> np.ndarray[Any, Any]:
    """An array's or tensor's values as float64 (complex128 for complex; raw bytes for the rest)."""
    if isinstance(value, np.ndarray):
        array = value
    else:
        import torch

        tensor = value.detach()
        if tensor.is_complex():
            tensor = tensor.to(torch.complex128)
        elif tensor.dtype != torch.float64:
            tensor = tensor.to(torch.float64)
        array = tensor.numpy()
    if array.dtype.kind == "c":
        return array.astype(np.complex128)
    if array.dtype.kind in "biuf":
        return array.astype(np.float64)
    return array.view(np.uint8).astype(np.float64)  # strings/dates: compare raw bytes


def logical_nbytes(node: dict[str, Any]) -> int:
    """Logical bytes of a leaf (already validated by the view's strict open)."""
    numel = 1
    for dim in node.get("shape", ()):
        numel *= int(dim)
    dtype = node.get("dtype")
    if node.get("t") == "ndarray":
        return numel * parse_numpy_dtype(dtype).itemsize  # type: ignore[arg-type]
    form = TORCH_DTYPES.get(dtype) if isinstance(dtype, str) else None
    return numel * (form.itemsize if form is not None else 1)


def _converter(node: dict[str, Any]) -> tuple[int, Callable[[np.ndarray], np.ndarray]]:
    """Bytes per logical element of a leaf and how its raw little-endian bytes become floats."""
    if node.get("t") == "ndarray":
        dtype = parse_numpy_dtype(node.get("dtype"))  # type: ignore[arg-type]
        stored = dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype
        return dtype.itemsize, lambda raw: as_float(raw.view(stored))
    import torch

    tdtype = torch_dtype(node.get("dtype"), "state")
    itemsize = torch.empty(0, dtype=tdtype).element_size()
    return itemsize, lambda raw: as_float(torch.from_numpy(raw).view(tdtype))


def _walk(value: Any) -> Iterator[np.ndarray]:
    """Blocks of at most ``BLOCK_ELEMENTS`` logical elements of an array/tensor, in C order."""
    total = value.numel() if hasattr(value, "numel") else value.size
    if total <= BLOCK_ELEMENTS or value.ndim == 0:
        yield as_float(value.reshape(-1))
        return
    if value.ndim == 1:
        for i in range(0, total, BLOCK_ELEMENTS):
            yield as_float(value[i : i + BLOCK_ELEMENTS])
        return
    inner = total // value.shape[0]
    if inner <= BLOCK_ELEMENTS:
        rows = BLOCK_ELEMENTS // inner
        for i in range(0, value.shape[0], rows):
            yield as_float(value[i : i + rows].reshape(-1))
        return
    for i in range(value.shape[0]):
        yield from _walk(value[i])


def logical_blocks(view: CheckpointView, node: dict[str, Any], path: str) -> Iterator[np.ndarray]:
    """A leaf's logical elements as float blocks, from verified bytes."""
    if "view" in node:
        yield from _walk(decode_node(view, node, path))
        return
    entry = view.manifest.entry(node["tensor"])
    itemsize, convert = _converter(node)
    carry = np.empty(0, dtype=np.uint8)
    if isinstance(entry, TensorEntry):
        blocks: Iterator[np.ndarray] = iter_stored_bytes(view._reader, entry)
    else:  # a sharded tensor: whole, from its verified pieces
        blocks = iter([view._reader.fetch(node["tensor"])])
    for block in blocks:
        if carry.size:
            block = np.concatenate([carry, block])
        usable = block.size - block.size % itemsize
        carry = block[usable:].copy()
        if usable:
            yield convert(block[:usable])
    if carry.size:
        raise CorruptCheckpointError(
            "stored bytes are not a whole number of elements", path=view.path, tensor=entry.name
        )


def _paired(
    left: Iterator[np.ndarray], right: Iterator[np.ndarray]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The two streams re-cut into pieces of equal length (block boundaries may differ)."""
    a = b = np.empty(0)
    while True:
        while a.size == 0:
            nxt = next(left, None)
            if nxt is None:
                return
            a = nxt
        while b.size == 0:
            nxt = next(right, None)
            if nxt is None:
                return
            b = nxt
        n = min(a.size, b.size)
        yield a[:n], b[:n]
        a, b = a[n:], b[n:]


def _fold(acc: float | None, value: float) -> float:
    """The running ``nanmax``: NaN only while every block so far was all-NaN."""
    if acc is None or math.isnan(acc):
        return value
    return acc if math.isnan(value) else max(acc, value)


def compare_leaves(
    left: CheckpointView,
    right: CheckpointView,
    node_a: dict[str, Any],
    node_b: dict[str, Any],
    path: str,
    budget: ByteBudget,
) -> tuple[float | None, float | None, bool]:
    """(max abs, max rel, changed) of two leaves of equal logical dtype and shape, in blocks."""
    budget.charge(max(logical_nbytes(node_a), logical_nbytes(node_b)), f"comparing {path[:80]}")
    max_abs: float | None = None
    max_rel: float | None = None
    changed = False
    blocks = _paired(logical_blocks(left, node_a, path), logical_blocks(right, node_b, path))
    for va, vb in blocks:
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN block: nanmax is NaN
            delta = np.abs(va - vb)
            both_nan = np.isnan(va) & np.isnan(vb)
            delta = np.where(both_nan, 0.0, delta)
            scale = np.maximum(np.abs(va), np.abs(vb))
            rel = np.where(delta == 0, 0.0, delta / np.where(scale == 0, 1.0, scale))
            max_abs = _fold(max_abs, float(np.nanmax(delta)))
            max_rel = _fold(max_rel, float(np.nanmax(rel)))
        changed = changed or bool(np.any(delta != 0) or np.any(np.isnan(delta)))
    return max_abs, max_rel, changed
