"""The private memory a load fills with verified bytes and hands back."""

from __future__ import annotations

import sys

import numpy as np


def fresh_bytes(nbytes: int) -> np.ndarray:
    """A new uint8 array of ``nbytes`` for a load to fill and return.

    Allocated by torch's CPU allocator when torch is already imported: the tensors a load returns
    are torch tensors, and torch's allocator (glibc's heap underneath) reuses the pages an earlier
    load freed, so a process that restores or evaluates repeatedly pays the kernel's page zeroing
    once -- as ``torch.load`` does -- instead of on every load (numpy's allocations of this size
    come back as fresh mappings: ~250,000 page faults per GiB, measured with ``ru_minflt``). numpy
    allocates otherwise, so numpy-only users never import torch.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.empty(nbytes, dtype=torch.uint8).numpy()  # type: ignore[no-any-return]
    return np.empty(nbytes, dtype=np.uint8)
