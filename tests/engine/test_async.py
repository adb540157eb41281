"""Asynchronous saves: the loop waits only for staging; failures surface; nothing half-commits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.helpers import assert_exact

import ckptvault as cv
from ckptvault.engine import background

REPO = Path(__file__).resolve().parents[2]


def test_state_changed_after_save_async_returns_is_not_what_is_saved(ckpt_dir: Path) -> None:
    model = torch.nn.Embedding(10, 4)
    state = {"model": model.state_dict(), "tied": model.weight}
    expected = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "tied": model.weight.detach().clone(),
    }
    pending = cv.save_async(ckpt_dir / "a", state)
    with torch.no_grad():
        model.weight.zero_()  # training goes on while the save commits
    info = pending.wait()
    assert pending.done() and pending.exception() is None and info.path.endswith("a")
    back = cv.load(ckpt_dir / "a")
    assert torch.equal(back["model"]["weight"], expected["model"]["weight"])
    assert back["tied"].untyped_storage().data_ptr() == back["model"]["weight"].untyped_storage().data_ptr()
    assert cv.verify(ckpt_dir / "a").ok


def test_background_failure_surfaces_and_leaves_nothing(
    ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise cv.StorageError(5, "Input/output error (injected)")

    monkeypatch.setattr(background, "commit_plan", broken)
    pending = cv.save_async(ckpt_dir / "b", {"w": torch.ones(3)})
    with pytest.raises(cv.StorageError, match="injected"):
        pending.wait()
    assert isinstance(pending.exception(), cv.StorageError)
    assert os.listdir(ckpt_dir) == []


def test_staging_budget_is_enforced_before_anything_is_written(ckpt_dir: Path) -> None:
    with pytest.raises(cv.StagingBudgetError):
        cv.save_async(ckpt_dir / "c", {"w": torch.ones(1000)}, max_staging_bytes=100)
    assert os.listdir(ckpt_dir) == []
    assert cv.save_async(ckpt_dir / "c", {"w": torch.ones(10)}, max_staging_bytes=100).wait().step == 0


def test_pending_save_completes_at_interpreter_exit(ckpt_dir: Path) -> None:
    code = (
        "import torch, ckptvault as cv\n"
        f"cv.save_async({str(ckpt_dir / 'exit')!r}, {{'w': torch.randn(256, 256)}})\n"
        "raise SystemExit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert cv.verify(ckpt_dir / "exit").ok


def test_sigkill_during_an_async_save_keeps_the_previous_checkpoint(ckpt_dir: Path) -> None:
    previous = {"w": torch.arange(10.0)}
    cv.save(ckpt_dir / "prev", previous)
    code = (
        "import os, signal, torch, ckptvault as cv\n"
        f"cv.save_async({str(ckpt_dir / 'next')!r}, {{'w': torch.randn(2048, 2048)}})\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == -9
    assert_exact(previous, cv.load(ckpt_dir / "prev"))
    visible = [p for p in os.listdir(ckpt_dir) if not p.startswith(".")]
    assert set(visible) <= {"prev", "next"}
    if "next" in visible:  # committed before the kill landed: then it must be whole
        assert cv.verify(ckpt_dir / "next").ok
    cv.save(ckpt_dir / "after", previous)
    assert [p for p in os.listdir(ckpt_dir) if p.startswith(".")] == []  # the torn staging is swept


def _state() -> cv.TrainState:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return cv.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_async_manager_advances_only_after_commit(tmp_path: Path) -> None:
    state = _state()
    with cv.CheckpointManager(tmp_path, every_n_steps=2, keep_last=1, async_save=True) as manager:
        manager.step(state)
        assert manager.step(state) is None  # step 2: a save is in flight, nothing committed yet
        assert manager.latest() is None  # even if the commit is done, it is not observed yet
        manager.wait()
        assert manager.latest().step == 2
        for _ in range(4):
            manager.step(state)
        manager.wait_validation()  # the newest validated one is kept until step 6 has passed
        assert [r.step for r in manager.checkpoints()] == [6]  # retention ran after each commit


def test_async_manager_raises_background_failure_on_next_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _state()
    manager = cv.CheckpointManager(tmp_path, every_n_steps=1, async_save=True)
    try:
        monkeypatch.setattr(
            background, "commit_plan", lambda *a, **k: (_ for _ in ()).throw(cv.StorageError(28, "full"))
        )
        manager.step(state)
        with pytest.raises(cv.StorageError, match="full"):
            manager.wait()
        assert manager.latest() is None and not list(tmp_path.glob("step_*"))
    finally:
        monkeypatch.undo()
        manager.close()


# -- staging in pieces: a state bigger than the budget -------------------------------------------


def _big_state() -> dict[str, object]:
    gen = torch.Generator().manual_seed(7)
    return {
        "a": torch.randn(300_000, generator=gen),  # ~1.2 MB: spans several 64 KiB slots
        "b": torch.randn(70_000, generator=gen).to(torch.bfloat16),
        "small": [torch.full((5,), float(i)) for i in range(40)],  # many blobs packed into one slot
        "empty": torch.empty(0),
        "n": 3,
    }


@pytest.mark.parametrize(
    "options", [{}, {"incremental": True, "chunk_bytes": 65536}, {"compression": "lz4", "chunk_bytes": 65536}]
)
def test_state_bigger_than_the_budget_is_staged_in_pieces(ckpt_dir: Path, options: dict[str, object]) -> None:
    from ckptvault.api import _ASYNC_STAGING

    state = _big_state()
    expected = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    budget = 256 * 1024
    pending = cv.save_async(ckpt_dir / "p", state, max_staging_bytes=budget, **options)  # type: ignore[arg-type]
    # Everything is staged when save_async returns: changing the state now must not reach the file.
    with torch.no_grad():
        state["a"].zero_()  # type: ignore[union-attr]
    pending.wait()
    assert _ASYNC_STAGING.capacity <= budget
    back = cv.load(ckpt_dir / "p")
    assert torch.equal(back["a"], expected["a"]) and torch.equal(back["b"], expected["b"])
    assert back["n"] == 3 and back["empty"].numel() == 0
    assert all(torch.equal(x, y) for x, y in zip(back["small"], expected["small"], strict=True))
    assert cv.verify(ckpt_dir / "p").ok


def test_background_failure_while_staging_in_pieces_surfaces_and_leaves_nothing(
    ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptvault.storage import local

    real_write = local.os.write
    calls = {"n": 0}

    def failing_write(fd: int, data: object) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device (injected)")
        return real_write(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(local.os, "write", failing_write)
    # The loop is still staging when the writer fails: save_async itself raises the failure.
    with pytest.raises(cv.StorageError, match="injected"):
        cv.save_async(ckpt_dir / "f", _big_state(), max_staging_bytes=64 * 1024)
    monkeypatch.undo()
    assert [p for p in os.listdir(ckpt_dir) if not p.startswith(".")] == []
    assert cv.save_async(ckpt_dir / "f", _big_state(), max_staging_bytes=64 * 1024).wait().step == 0
    assert cv.verify(ckpt_dir / "f").ok
