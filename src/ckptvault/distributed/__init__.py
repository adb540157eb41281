"""Distributed checkpoints: torch.distributed.checkpoint (DCP) saves and loads in ckptvault's format.

``StorageWriter`` and ``StorageReader`` plug into ``torch.distributed.checkpoint.save`` / ``load``
with DCP's default planners: every rank writes its shards as safetensors files with digests, the
coordinator commits one manifest (strict JSON, no pickle) after every rank's files are durable, and
a checkpoint saved at one world size loads at any other. See docs/distributed.md.
"""

from __future__ import annotations

from .api import PendingDistributedSave, load, save, save_async
from .commit import DistributedCheckpointError
from .interop import export_dcp, import_dcp
from .reader import StorageReader
from .writer import StorageWriter

__all__ = [
    "DistributedCheckpointError",
    "PendingDistributedSave",
    "StorageReader",
    "StorageWriter",
    "export_dcp",
    "import_dcp",
    "load",
    "save",
    "save_async",
]
