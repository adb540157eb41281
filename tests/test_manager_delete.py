"""CheckpointManager.delete: a user's deletion of one checkpoint, consistent with retention's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ckptvault as cv
from ckptvault.catalog.registry import Registry
from ckptvault.errors import CheckpointError, CheckpointNotFoundError


def _run(tmp_path: Path) -> cv.CheckpointManager:
    manager = cv.CheckpointManager(tmp_path / "runs" / "r", every_n_steps=1, keep_last=10)
    model = torch.nn.Linear(3, 1)
    state = cv.TrainState(model=model)
    for step in range(1, 5):
        state.step = step
        with torch.no_grad():
            model.bias.fill_(float(step))
        manager.save(state)
    return manager


def test_delete_removes_one_checkpoint_and_its_record(tmp_path: Path) -> None:
    manager = _run(tmp_path)
    manager.delete("step_00000002")
    assert [r.step for r in manager.checkpoints()] == [1, 3, 4]
    assert not (tmp_path / "runs" / "r" / "step_00000002").exists()
    manager.close()
    reopened = cv.CheckpointManager(tmp_path / "runs" / "r", every_n_steps=1, keep_last=10)
    assert [r.step for r in reopened.checkpoints()] == [1, 3, 4]  # the index was written
    model = torch.nn.Linear(3, 1)
    assert reopened.restore(cv.TrainState(model=model), which=3) is not None
    assert model.bias.item() == 3.0
    reopened.close()


def test_delete_refuses_unknown_pinned_and_registered_checkpoints(tmp_path: Path) -> None:
    manager = _run(tmp_path)
    with pytest.raises(CheckpointNotFoundError):
        manager.delete("step_00000009")
    with pytest.raises(CheckpointNotFoundError):
        manager.delete("../r")
    manager.pin(1)
    with pytest.raises(CheckpointError, match="pinned"):
        manager.delete("step_00000001")
    Registry(tmp_path / "runs").register("net", tmp_path / "runs" / "r" / "step_00000003")
    with pytest.raises(CheckpointError, match="registered"):
        manager.delete("step_00000003")
    assert [r.step for r in manager.checkpoints()] == [1, 2, 3, 4]
    manager.close()
