"""A whole load of a checkpoint with more data files than threads reads file by file (engine/
read_order.py): every tensor still comes back exact, chunked ones included, in any thread count."""

from __future__ import annotations

import itertools
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


def test_small_tensors_share_arenas_without_overlapping(monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptvault.engine import read_order
    from ckptvault.types import TensorEntry

    monkeypatch.setattr(read_order, "ARENA_BYTES", 1000)
    sizes = [600, 300, 300, 2 << 20, 0, 999, 1000, 5]
    tensors, cursor = {}, 0
    for i, n in enumerate(sizes):
        tensors[f"t{i}"] = TensorEntry(
            f"t{i}", "data-00000.safetensors", "U8", (n,), (cursor, cursor + n), "0" * 64
        )
        cursor += n
    names = sorted(tensors, key=lambda n: -tensors[n].nbytes)
    outs, runs = read_order.destinations(tensors, names, skip={"t7": None})
    for run in runs:
        outs.update(run.pieces)
    assert set(outs) == set(tensors) - {"t7"}
    spans = []
    for name, array in outs.items():
        assert array.dtype == np.uint8 and array.nbytes == tensors[name].nbytes and array.flags.c_contiguous
        start = array.__array_interface__["data"][0]
        spans.append((start, start + array.nbytes, name))
    spans.sort()
    for (_, end1, n1), (start2, _, n2) in itertools.pairwise(spans):
        assert end1 <= start2, f"{n1} and {n2} overlap"
    assert all(a.nbytes <= 1000 for n, a in outs.items() if n != "t3")


def test_batches_cover_every_name_once() -> None:
    from ckptvault.engine.read_order import batches

    names = [f"n{i}" for i in range(103)]
    for count in (1, 2, 8, 500):
        dealt = batches(names, count)
        assert 1 <= len(dealt) <= min(count, len(names))
        assert sorted(n for b in dealt for n in b) == sorted(names)
    assert batches([], 4) == [[]]


def test_many_small_tensors_load_back_exact_and_independent(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    state = {f"t{i}": rng.standard_normal(1 + i % 700).astype(np.float32) for i in range(3000)}
    cv.save(tmp_path / "many", state)
    for threads in (1, 2):
        with CheckpointReader(LocalStorage(), str(tmp_path / "many")) as reader:
            data = reader.fetch_all(verify=True, threads=threads, mapped=False)
        for name, array in data.items():
            assert array.tobytes() == state[name].tobytes()
    back = cv.load(tmp_path / "many")
    back["t1"][:] = 123.0  # writing one returned array leaves its arena neighbours alone
    assert all(np.array_equal(back[k], state[k]) for k in state if k != "t1")


def test_runs_are_file_neighbours_read_at_once(tmp_path: Path) -> None:
    from ckptvault.engine.read_order import destinations

    state = {f"t{i}": np.full(100 + i, i, dtype=np.float32) for i in range(50)}
    state["big"] = np.zeros(1 << 19, dtype=np.float32)  # 2 MiB: its own memory, between neighbours
    cv.save(tmp_path / "runs", state)
    with CheckpointReader(LocalStorage(), str(tmp_path / "runs")) as reader:
        tensors = reader.manifest.tensors
        outs, runs = destinations(tensors, list(tensors), {})
        assert runs and "big" in outs and all("big" not in dict(r.pieces) for r in runs)
        for run in runs:
            cursor = run.offset
            base = run.buffer.__array_interface__["data"][0]
            for name, piece in run.pieces:
                assert tensors[name].file == run.file and tensors[name].offsets[0] == cursor
                assert piece.__array_interface__["data"][0] == base + cursor - run.offset
                cursor = tensors[name].offsets[1]
            assert cursor - run.offset == run.buffer.nbytes
    data = next((tmp_path / "runs").glob("data-*.safetensors"))
    with CheckpointReader(LocalStorage(), str(tmp_path / "runs")) as reader:
        victim = reader.manifest.tensors["t25"]
        at = reader.header(victim.file).data_start + victim.offsets[0] + 8
    with open(data, "r+b") as fh:
        fh.seek(at)
        fh.write(b"\xff\xff\xff\xff")
    with pytest.raises(cv.CorruptCheckpointError) as err:
        cv.load(tmp_path / "runs")
    assert err.value.kind == "digest-mismatch" and err.value.tensor == "t25"
    assert not np.array_equal(cv.load(tmp_path / "runs", verify=False)["t25"], state["t25"])
