"""A whole load of a checkpoint with more data files than threads reads file by file (engine/
read_order.py): every tensor still comes back exact, chunked ones included, in any thread count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ckptvault as cv
from ckptvault.engine.read_order import file_groups
from ckptvault.engine.reader import CheckpointReader
from ckptvault.storage.local import LocalStorage


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_many_files_load_exactly_with_chunked_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    monkeypatch.setenv("CKPTVAULT_SHARD_BYTES", str(64 * 1024))  # one file per ~64 KiB
    rng = np.random.default_rng(threads)
    state = {f"t{i}": rng.standard_normal(4096 * (1 + i % 3)).astype(np.float32) for i in range(12)}
    state["big"] = rng.standard_normal(300_000).astype(np.float32)  # chunked (incremental)
    target = str(tmp_path / "run" / "step_00000001")
    cv.save(target, state, incremental=True, chunk_bytes=1 << 20)
    with CheckpointReader(LocalStorage(), target) as reader:
        tensors = reader.manifest.tensors
        groups = file_groups(tensors, list(tensors))
        files = {tensors[g[0]].file for g in groups if tensors[g[0]].chunks is None}
        assert len(files) >= 4  # more files than threads: the per-file path
        for group in groups:  # each group is one file, front to back
            offsets = [tensors[n].offsets[0] for n in group if tensors[n].chunks is None]
            assert offsets == sorted(offsets)
        assert sum(len(g) for g in groups) == len(tensors)
    loaded = cv.load(target) if threads == 4 else None
    with CheckpointReader(LocalStorage(), target) as reader:
        data = reader.fetch_all(verify=True, threads=threads, mapped=False)
    assert set(data) == set(tensors)
    if loaded is not None:
        for name, value in state.items():
            assert np.array_equal(loaded[name], value), name
