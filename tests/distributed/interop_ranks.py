"""Rank functions for tests/distributed/test_interop.py (``run_ranks`` spawns its ranks, so they
must be importable by module and name): a DCP checkpoint written by DCP's own ``FileSystemWriter``
from several ranks, each holding a ``Shard(0)`` DTensor part, to be imported by ckptvault."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor


def whole(seed: int) -> dict[str, torch.Tensor]:
    """The whole tensors (a function of ``seed`` only): 37 rows split unevenly over 2 ranks."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "rows": torch.randn(37, 8, generator=gen),
        "bf16": torch.randn(16, 3, generator=gen).to(torch.bfloat16),
        "ids": torch.randint(-(2**40), 2**40, (9,), generator=gen),
        "rep": torch.randn(4, 4, generator=gen),
    }


def save_sharded(rank: int, world: int, directory: str, seed: int) -> None:
    """Every rank saves its Shard(0) parts (``rep`` replicated) with DCP's FileSystemWriter."""
    mesh = init_device_mesh("cpu", (world,))
    tensors = whole(seed)
    state: dict[str, Any] = {
        "model": {
            name: distribute_tensor(t, mesh, [Replicate()] if name == "rep" else [Shard(0)])
            for name, t in tensors.items()
        },
        "step": 40 + seed,
    }
    dcp.save(state, storage_writer=FileSystemWriter(directory))
