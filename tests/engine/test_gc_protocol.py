"""Garbage collection through the storage protocol only (engine.gc): the same collection on the
in-memory backend as on local disk, which is the proof that it needs nothing but the protocol."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ckptvault.engine.chunks import ChunkOptions
from ckptvault.engine.gc import GcReport, collect_garbage
from ckptvault.engine.verify import verify_checkpoint
from ckptvault.engine.writer import write_checkpoint
from ckptvault.storage.base import Storage
from ckptvault.storage.local import LocalStorage
from ckptvault.storage.memory import MemoryStorage

CHUNKS = ChunkOptions(chunk_bytes=4096, min_bytes=1024)


def _backend(kind: str, tmp_path: Path) -> tuple[Storage, str]:
    if kind == "memory":
        return MemoryStorage(), "runs/exp"
    return LocalStorage(), str(tmp_path / "exp")


@pytest.mark.parametrize("kind", ["memory", "local"])
def test_collection_frees_exactly_the_chunks_of_deleted_checkpoints(kind: str, tmp_path: Path) -> None:
    storage, run = _backend(kind, tmp_path)
    shared = np.arange(4096, dtype=np.float32)  # 16 KiB: four distinct chunks both reference
    # 8 KiB of one value: two chunks of identical bytes, so one distinct chunk per checkpoint.
    first = {"w": shared, "u": np.full(2048, 1.0, np.float32)}
    second = {"w": shared, "u": np.full(2048, 2.0, np.float32)}
    write_checkpoint(storage, storage.join(run, "step_00000001"), first, chunking=CHUNKS)
    write_checkpoint(storage, storage.join(run, "step_00000002"), second, chunking=CHUNKS)
    assert collect_garbage(run, storage=storage) == GcReport(2, 6, 0, 0, 0)

    assert storage.delete(storage.join(run, "step_00000001"))
    dry = collect_garbage(run, storage=storage, dry_run=True)
    assert (dry.checkpoints, dry.deleted_chunks) == (1, 1)
    report = collect_garbage(run, storage=storage)
    assert report.deleted_chunks == 1 and report.freed_bytes == 4096
    assert collect_garbage(run, storage=storage).deleted_chunks == 0  # idempotent
    assert verify_checkpoint(storage, storage.join(run, "step_00000002")).ok


@pytest.mark.parametrize("kind", ["memory", "local"])
def test_a_run_without_a_store_is_left_alone(kind: str, tmp_path: Path) -> None:
    storage, run = _backend(kind, tmp_path)
    write_checkpoint(storage, storage.join(run, "step_00000001"), {"x": np.zeros(3)})
    assert collect_garbage(run, storage=storage) == GcReport(0, 0, 0, 0, 0)
    assert not any(e.name == ".ckptvault-store" for e in storage.list(run))
