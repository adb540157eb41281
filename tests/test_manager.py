"""CheckpointManager: triggers, retention, restore with fallback, single writer, scopes, pins."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

import ckptvault as cv
from ckptvault.training.state import IncompleteStateError


def make_state(seed: int = 0) -> cv.TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return cv.TrainState(model, optimizer)


def train_step(state: cv.TrainState) -> float:
    model = state.parts["model"]["model"]
    optimizer = state.parts["optimizer"]["optimizer"]
    loss = model(torch.randn(8, 4)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.item())


def names(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if not p.name.startswith(".") and p.is_dir())


def test_fresh_run_restores_nothing_and_saves_on_schedule(tmp_path: Path) -> None:
    state = make_state()
    with cv.CheckpointManager(tmp_path / "run", every_n_steps=5) as manager:
        assert manager.restore(state) is None
        saved = []
        for _ in range(12):
            train_step(state)
            info = manager.step(state, metrics={"loss": 1.0})
            if info is not None:
                saved.append(info.step)
        assert saved == [5, 10]
        assert names(tmp_path / "run") == ["step_00000005", "step_00000010"]
        back = cv.load(tmp_path / "run" / "step_00000010")
        assert back["step"] == 10  # a checkpoint at step N holds the state after N steps
        assert (tmp_path / "run" / "run.json").exists()


def test_keep_last_keeps_the_newest(tmp_path: Path) -> None:
    state = make_state()
    with cv.CheckpointManager(tmp_path, every_n_steps=1, keep_last=2) as manager:
        for _ in range(6):
            train_step(state)
            manager.step(state)
        manager.wait_validation()
        assert names(tmp_path) == ["step_00000005", "step_00000006"]
        assert manager.latest().step == 6


def test_keep_best_and_best(tmp_path: Path) -> None:
    state = make_state()
    accs = [0.5, 0.9, 0.6, 0.7, 0.65]
    with cv.CheckpointManager(tmp_path, keep_last=1, keep_best=1, monitor="val_acc", mode="max") as manager:
        for acc in accs:
            train_step(state)
            manager.step(state)
            manager.save(state, metrics={"val_acc": acc})
        manager.wait_validation()  # until then the newest validated checkpoint is kept too
        assert manager.best().step == 2 and manager.best().metrics["val_acc"] == 0.9
        assert names(tmp_path) == ["step_00000002", "step_00000005"]


def test_corrupt_newest_falls_back_with_a_warning(tmp_path: Path) -> None:
    state = make_state()
    with cv.CheckpointManager(tmp_path, every_n_steps=1) as manager:
        for _ in range(3):
            train_step(state)
            manager.step(state)
        weights_at_2 = cv.load(tmp_path / "step_00000002")["model"]["model"]["weight"]
    data = tmp_path / "step_00000003" / "data-00000.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x01
    data.write_bytes(bytes(raw))
    fresh = make_state(seed=1)
    with cv.CheckpointManager(tmp_path, every_n_steps=1) as manager:
        with pytest.warns(UserWarning, match="step_00000003"):
            info = manager.restore(fresh)
        assert info is not None and info.step == 2 and fresh.step == 2
        assert torch.equal(fresh.parts["model"]["model"].weight.detach(), weights_at_2)


def test_one_writer_per_run_directory(tmp_path: Path) -> None:
    with cv.CheckpointManager(tmp_path), pytest.raises(cv.ConcurrentWriteError, match="already has a writer"):
        cv.CheckpointManager(tmp_path)
    with cv.CheckpointManager(tmp_path):  # released on close
        pass


def test_weights_only_into_full_state_lists_what_is_missing(tmp_path: Path) -> None:
    state = make_state()
    with cv.CheckpointManager(tmp_path, weights=cv.Scope(every_n_steps=1)) as manager:
        train_step(state)
        manager.step(state)
        # only weights_ checkpoints exist: restoring them into a full state must not pass silently
        fresh = make_state(seed=3)
        with pytest.raises(IncompleteStateError, match="optimizer 'optimizer'"):
            manager.restore(fresh)
        manager.restore(fresh, partial=True)
        assert torch.equal(fresh.parts["model"]["model"].weight, state.parts["model"]["model"].weight)


def test_seed_recipe_full_every_10_epochs_weights_every_epoch_top3(tmp_path: Path) -> None:
    """The seed's example: full state every 10 epochs, weights-only every epoch, top 3 by val acc."""
    state = make_state()
    accs = [(7 * i % 20) / 20 for i in range(20)]  # 20 distinct accuracies in scrambled order
    with cv.CheckpointManager(
        tmp_path,
        every_n_epochs=10,
        weights=cv.Scope(every_n_epochs=1, keep_best=3, monitor="val_acc", mode="max"),
    ) as manager:
        manager.restore(state)
        for epoch in state.epochs(20):
            train_step(state)
            manager.step(state)
            manager.save(state, metrics={"val_acc": accs[epoch]}, scope="weights")
    full = [n for n in names(tmp_path) if n.startswith("step_")]
    weights = [n for n in names(tmp_path) if n.startswith("weights_")]
    assert full == ["step_00000010", "step_00000020"]
    kept_steps = sorted(int(n.split("_")[1]) for n in weights)
    top3 = sorted(sorted(range(1, 21), key=lambda s: -accs[s - 1])[:3])
    assert set(top3) <= set(kept_steps) and 20 in kept_steps  # the best 3 and the newest
    assert len(kept_steps) <= 4


def test_pinned_checkpoints_survive_retention(tmp_path: Path) -> None:
    state = make_state()
    with cv.CheckpointManager(tmp_path, every_n_steps=1, keep_last=1) as manager:
        train_step(state)
        manager.step(state)
        manager.pin(1)
        for _ in range(3):
            train_step(state)
            manager.step(state)
        manager.wait_validation()
        assert names(tmp_path) == ["step_00000001", "step_00000004"]
        manager.unpin(1)
        assert names(tmp_path) == ["step_00000004"]


def test_preemption_signal_saves_at_the_next_step(tmp_path: Path) -> None:
    state = make_state()
    with cv.CheckpointManager(tmp_path, every_n_steps=1000) as manager:
        train_step(state)
        manager.step(state)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert not manager.should_stop
        train_step(state)
        info = manager.step(state)
        assert manager.should_stop and info is not None and info.step == 2
        assert info.metadata["reason"] == "preemption"


def test_index_is_derived_and_rebuilt(tmp_path: Path) -> None:
    state = make_state()
    with cv.CheckpointManager(tmp_path, every_n_steps=1, keep_last=3) as manager:
        for _ in range(3):
            train_step(state)
            manager.step(state, metrics={"loss": 2.0})
        before = [(r.name, r.step, dict(r.metrics)) for r in manager.checkpoints()]
    (tmp_path / ".ckptvault-index.json").unlink()
    with cv.CheckpointManager(tmp_path, every_n_steps=1, keep_last=3) as manager:
        after = [(r.name, r.step, dict(r.metrics)) for r in manager.checkpoints()]
    assert before == after


def test_run_json_records_provenance_and_retention(tmp_path: Path) -> None:
    with cv.CheckpointManager(tmp_path, keep_last=2, config={"lr": 0.1}):
        pass
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"] == {"lr": 0.1} and run["run_id"]
    assert run["scopes"]["full"]["keep_last"] == 2


def test_a_failed_save_deletes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = make_state()
    with cv.CheckpointManager(tmp_path, every_n_steps=1, keep_last=1) as manager:
        train_step(state)
        manager.step(state)

        def disk_full(*args: object, **kwargs: object) -> None:
            raise cv.StorageError(28, "No space left on device")

        monkeypatch.setattr(cv.api, "save", disk_full)
        train_step(state)
        with pytest.raises(cv.StorageError):
            manager.step(state)
        assert names(tmp_path) == ["step_00000001"]  # the old one stays until a new one commits
        assert cv.verify(tmp_path / "step_00000001").ok


def test_auto_interval_saves_by_young_daly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("ckptvault.manager.time.time", lambda: clock[0])
    state = make_state()
    # MTBF of 50 s: until a save is measured the first interval is min(600 s, MTBF) = 50 s.
    with cv.CheckpointManager(tmp_path, every="auto", mtbf_seconds=50.0) as manager:
        train_step(state)
        assert manager.step(state) is None
        clock[0] += 51.0
        train_step(state)
        info = manager.step(state)
        assert info is not None and info.metadata["reason"].startswith("auto interval")
    with pytest.raises(ValueError, match="mtbf_seconds"):
        cv.CheckpointManager(tmp_path / "other", every="auto")


def test_ls_explains_why_each_checkpoint_is_kept(tmp_path: Path) -> None:
    import subprocess
    import sys

    state = make_state()
    with cv.CheckpointManager(tmp_path, keep_last=1, keep_best=1, monitor="acc", mode="max") as manager:
        for acc in (0.2, 0.9, 0.5):
            train_step(state)
            manager.step(state)
            manager.save(state, metrics={"acc": acc})
    done = subprocess.run(
        [sys.executable, "-m", "ckptvault.cli.main", "ls", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = {row["step"]: row["kept_because"] for row in json.loads(done.stdout)}
    assert set(rows) == {2, 3}
    assert any(reason.startswith("best acc") for reason in rows[2])
    assert "latest" in rows[3]
