"""The one state comparison (issue 14): where two state trees differ, bit for bit.

A state is what a training loop saves: dicts, lists and tuples of tensors, numpy arrays and plain
values. Two places ask whether two of them are the same -- the fault and torture invariants (a
restored state must equal the saved one exactly) and ``ckptvault check-resume`` (a resumed run must
reach the reference run's state, its tensors diffed apart in bounded blocks) -- and they must agree
on what "the same" means, so the rule is written once:

* tensors and arrays are equal when dtype, shape and every *bit* are (so NaN equals the same NaN,
  and ``-0.0`` is not ``0.0``); with ``arrays=False`` they are not looked at, for a caller that
  compares them itself;
* everything else must be of the very same type (``1`` is not ``1.0``, a tuple is not a list),
  mappings must have the same keys in the same order, sequences the same length, and leaves must be
  ``==`` (a float NaN equals a float NaN).

torch is never imported here: a tensor can exist only once the program imported torch, so it is
looked up in ``sys.modules``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["first_difference"]


def first_difference(a: Any, b: Any, where: str = "state", *, arrays: bool = True) -> str | None:
    """``None`` when ``a`` and ``b`` are the same state, else the first place they differ and how
    (``"state['model']['w']: tensor values differ"``). ``arrays=False`` skips tensor and array
    leaves (anything with a ``shape`` and a ``dtype``) of the same type."""
    if arrays:
        found = _array_difference(a, b, where)
        if found is not _NOT_ARRAYS:
            return found
    if type(a) is not type(b):
        return f"{where}: type {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, Mapping):
        if list(a) != list(b):
            return f"{where}: keys {list(a)} vs {list(b)}"
        for key in a:
            found = first_difference(a[key], b[key], f"{where}[{key!r}]", arrays=arrays)
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = first_difference(x, y, f"{where}[{i}]", arrays=arrays)
            if found:
                return found
        return None
    if not arrays and hasattr(a, "shape") and hasattr(a, "dtype"):
        return None
    if isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return None
    return None if a == b else f"{where}: {a!r} vs {b!r}"


_NOT_ARRAYS = "not arrays"  # a sentinel: neither side is a tensor or a numpy array


def _array_difference(a: Any, b: Any, where: str) -> str | None:
    torch = sys.modules.get("torch")
    if torch is not None and (isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor)):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{where}: type {type(a).__name__} vs {type(b).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        raw_a = a.detach().reshape(-1).contiguous().view(torch.uint8)  # bits: NaN equals NaN
        raw_b = b.detach().reshape(-1).contiguous().view(torch.uint8)
        return None if torch.equal(raw_a, raw_b) else f"{where}: tensor values differ"
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        ok = (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
        )
        return None if ok and a.tobytes() == b.tobytes() else f"{where}: arrays differ"
    return _NOT_ARRAYS
