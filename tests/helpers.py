"""Exact-equality helpers: bit-for-bit comparison of nested states (NaN payloads included).

Every float is compared by its bits -- tensors and arrays by their bytes, Python floats and complex
numbers by ``struct.pack`` -- so two NaNs with different payloads or signs are different values
here, as the format promises to keep them (DESIGN invariant 4).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Any

import numpy as np
import torch


def tensor_bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.numel() == 0:
        return True
    ca, cb = a.detach().contiguous().reshape(-1), b.detach().contiguous().reshape(-1)
    return bool(torch.equal(ca.view(torch.uint8), cb.view(torch.uint8)))


def assert_exact(a: Any, b: Any, path: str = "state") -> None:
    """Raises AssertionError naming the first place where ``b`` is not exactly ``a``."""
    assert type(a) is type(b), f"{path}: type {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert tensor_bits_equal(a, b), f"{path}: tensor differs ({a.dtype}{tuple(a.shape)})"
        assert a.requires_grad == b.requires_grad, f"{path}: requires_grad differs"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        assert a.tobytes() == b.tobytes(), f"{path}: array bytes differ"
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"{path}: numpy scalar differs"
    elif isinstance(a, float):  # the bits: NaN payload and sign included, -0.0 is not 0.0
        assert struct.pack(">d", a) == struct.pack(">d", b), f"{path}: {a!r} != {b!r} (bits differ)"
    elif isinstance(a, complex):
        bits_a = struct.pack(">dd", a.real, a.imag)
        assert bits_a == struct.pack(">dd", b.real, b.imag), f"{path}: {a!r} != {b!r} (bits differ)"
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a)[:5]} != {list(b)[:5]}"
        for key in a:
            assert_exact(a[key], b[key], f"{path}[{key!r}]")
        if isinstance(a, OrderedDict):
            assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), (
                f"{path}: _metadata differs"
            )
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_exact(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
