"""One save pipeline (issue 14 item 4): ``save``, ``save_async`` and the manager's saves run the same
``SaveRequest``, so ``save_async`` takes every option ``save`` takes and writes the same checkpoint;
and the manager speaks only the Storage protocol (a run on the in-memory backend works end to end)."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import torch

import ckptvault as cv
from ckptvault import api, validation
from ckptvault.engine.loading import read_checkpoint
from ckptvault.engine.rundir import RunDirectory
from ckptvault.storage.memory import MemoryStorage


def tree(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {"w": torch.randn(64, 64), "b": torch.randn(64)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_async_takes_every_option_save_takes() -> None:
    sync = inspect.signature(cv.save).parameters
    background = inspect.signature(cv.save_async).parameters
    assert set(sync) <= set(background), set(sync) - set(background)
    for name in sync:
        assert background[name].default == sync[name].default, name


def test_save_async_incremental_round_trip(ckpt_dir: Path) -> None:
    state = tree()
    first = cv.save_async(ckpt_dir / "a", state, incremental=True, chunk_bytes=4096).wait()
    assert first.path.endswith("a")
    assert (ckpt_dir / ".ckptvault-store").is_dir()
    chunks = sorted(p.name for p in (ckpt_dir / ".ckptvault-store").rglob("*") if p.is_file())
    second = cv.save_async(ckpt_dir / "b", state, incremental=True, chunk_bytes=4096).wait()
    assert second.checkpoint_id != first.checkpoint_id
    after = sorted(p.name for p in (ckpt_dir / ".ckptvault-store").rglob("*") if p.is_file())
    assert after == chunks  # the same bytes: every chunk referenced, none written again
    assert same(cv.load(ckpt_dir / "a"), state) and same(cv.load(ckpt_dir / "b"), state)
    assert cv.verify(ckpt_dir / "b").ok
    cv.save_async(ckpt_dir / "s", state, digest="sha256").wait()  # the digest option reaches the writer
    assert cv.verify(ckpt_dir / "s").ok and '"sha256' in (ckpt_dir / "s" / "manifest.json").read_text()


def test_save_async_overwrite_extra_files_and_validation(ckpt_dir: Path) -> None:
    cv.save(ckpt_dir / "c", tree(1))
    with pytest.raises(cv.CheckpointExistsError):
        cv.save_async(ckpt_dir / "c", tree(2)).wait()
    info = cv.save_async(
        ckpt_dir / "c",
        tree(2),
        overwrite=True,
        metadata={"step": 7},
        extra_files={"notes.txt": b"hello"},
        validate="readback",
    ).wait()
    assert info.step == 7 and same(cv.load(ckpt_dir / "c"), tree(2))
    assert (ckpt_dir / "c" / "notes.txt").read_bytes() == b"hello"
    result = validation.read_result(ckpt_dir / "c")  # validated in the background, then recorded
    assert result is not None and result["passed"] is True


def test_a_bad_validate_level_is_refused_before_anything_is_staged(ckpt_dir: Path) -> None:
    with pytest.raises(ValueError):
        cv.save_async(ckpt_dir / "d", tree(), validate="everything")
    assert not (ckpt_dir / "d").exists()


def test_save_and_save_async_through_a_given_storage() -> None:
    storage = MemoryStorage()
    cv.save("runs/x", tree(3), storage=storage)
    api.save_async("runs/y", tree(4), storage=storage, compression="zstd", chunk_bytes=4096).wait()
    names = {e.name for e in storage.list("runs")}
    assert {"x", "y"} <= names
    for key, seed in (("runs/x", 3), ("runs/y", 4)):
        back = read_checkpoint(storage, key, map_location="cpu", verify=True, threads=2, mapped=False)
        assert same(back, tree(seed))


def _train_state() -> cv.TrainState:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return cv.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))


def _train(state: cv.TrainState) -> None:
    model = state.parts["model"]["model"]
    optimizer = state.parts["optimizer"]["optimizer"]
    loss = model(torch.randn(8, 4)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("async_save", [False, True])
def test_manager_runs_on_the_memory_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, async_save: bool
) -> None:
    """The manager reaches its run only through RunDirectory over the Storage it is given: with
    the in-memory backend nothing of the run appears on disk, and save/retention/restore work."""
    monkeypatch.chdir(tmp_path)
    storage = MemoryStorage()
    state = _train_state()
    options = {"every_n_steps": 1, "keep_last": 2, "validate": "checksum", "async_save": async_save}
    with cv.CheckpointManager("run", storage=storage, **options) as manager:
        for _ in range(4):
            _train(state)
            manager.step(state, metrics={"loss": 1.0})
        manager.wait()
        assert [r.step for r in manager.checkpoints()] == [3, 4]
        manager.pin(3)
        with pytest.raises(cv.ConcurrentWriteError, match="already has a writer"):
            cv.CheckpointManager("run", storage=storage)
    names = {e.name for e in storage.list("run")}
    assert {"run.json", "pins.json", ".ckptvault-index.json", "step_00000003", "step_00000004"} <= names
    assert "step_00000002" not in names  # deleted by retention, through Storage.delete
    assert list(tmp_path.iterdir()) == []  # nothing reached the local disk
    fresh = _train_state()
    with cv.CheckpointManager("run", storage=storage, validate="checksum") as again:
        info = again.restore(fresh)
        assert info is not None and info.step == 4 and fresh.step == 4
        assert again.latest() is not None and again.latest().step == 4
    events = [e["event"] for e in RunDirectory("run", storage).read_events()]
    assert events.count("commit") == 4 and events.count("delete") == 2


def test_manager_retention_frees_chunks_on_the_memory_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Incremental saves on a non-local backend: retention deletes through Storage.delete and the
    chunk store's garbage collection runs through the same storage (engine.gc)."""
    monkeypatch.chdir(tmp_path)
    storage = MemoryStorage()
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    state = cv.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    options = {"every_n_steps": 1, "keep_last": 1, "validate": "checksum", "incremental": True}
    with cv.CheckpointManager("run", storage=storage, chunk_bytes=4096, **options) as manager:
        for _ in range(3):
            with torch.no_grad():
                model.weight.add_(1.0)  # new weights: new chunks every save
            manager.step(state)

    def objects(prefix: str) -> list[str]:
        found: list[str] = []
        for entry in storage.list(prefix):
            found += objects(entry.key) if entry.kind == "directory" else [entry.name]
        return found

    handle = storage.open("run/step_00000003")
    try:
        live = set(re.findall(r"[0-9a-f]{64}", handle.read_manifest().decode()))
    finally:
        handle.close()
    chunks = [name for name in objects("run/.ckptvault-store") if re.match(r"^[0-9a-f]{64}\.", name)]
    assert chunks and {name.split(".")[0] for name in chunks} <= live  # the deleted ones' chunks freed
    back = read_checkpoint(
        storage, "run/step_00000003", map_location="cpu", verify=True, threads=2, mapped=False
    )
    assert torch.equal(back["model"]["model"]["weight"], model.weight.detach())


def test_a_registry_pin_protects_a_checkpoint_on_the_memory_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention reads the registry's pin marker through the run's own storage: a registered
    checkpoint of a run that is not on local disk is kept like any other registered one."""
    monkeypatch.chdir(tmp_path)
    storage = MemoryStorage()
    state = _train_state()
    storage.put(
        "run/.ckptvault-registered.json", json.dumps({"checkpoints": {"step_00000001": [["m", 1]]}}).encode()
    )
    with cv.CheckpointManager(
        "run", storage=storage, every_n_steps=1, keep_last=1, validate="checksum"
    ) as manager:
        for _ in range(3):
            _train(state)
            manager.step(state)
        assert [r.step for r in manager.checkpoints()] == [1, 3]
