"""VaultCheckpointIO against real Lightning (CPU, a tiny module, a few steps): what a fit writes,
what top-k pruning removes, resume from ``ckpt_path="last"`` (also after SIGKILL, bit for bit),
refusals, tampering, async and incremental saves."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptvault

L = pytest.importorskip("lightning")

from lightning.fabric.utilities.data import AttributeDict  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from tests.integrations.lightning_fit_script import TinyModule, loader, make_trainer  # noqa: E402

from ckptvault.integrations.lightning import (  # noqa: E402
    ShardedStrategyError,
    VaultCheckpointIO,
    check_strategy,
)

REPO = Path(__file__).resolve().parents[2]


class RecordingIO(VaultCheckpointIO):
    """Records what Lightning asks the plugin to remove."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.removed: list[str] = []

    def remove_checkpoint(self, path: Any) -> None:
        self.removed.append(os.fspath(path))
        super().remove_checkpoint(path)


class StartStep(Callback):
    """The global step a fit starts at (after a resume restored it)."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.step = trainer.global_step


def fit(
    root: Path, steps: int, plugin: Any, resume: bool = False, every: int = 4
) -> tuple[Any, TinyModule, StartStep]:
    L.seed_everything(0, workers=True)
    start = StartStep()
    trainer = make_trainer(str(root), steps, plugin, every=every, extra=[start])
    model = TinyModule()
    trainer.fit(model, loader(), ckpt_path="last" if resume else None)
    return trainer, model, start


@pytest.fixture
def no_torch_save(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any pickle checkpoint write fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torch.save was called")

    monkeypatch.setattr(torch, "save", refuse)


def test_fit_writes_verified_checkpoints_prunes_top_k_and_resumes_last(
    tmp_path: Path, no_torch_save: None
) -> None:
    plugin = RecordingIO()
    fit(tmp_path, 12, plugin)
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert names == ["epoch=0-step=8.ckpt", "epoch=1-step=12.ckpt", "last.ckpt"]
    assert all((tmp_path / n).is_dir() and ckptvault.verify(tmp_path / n).ok for n in names)
    assert plugin.removed == [str(tmp_path / "epoch=0-step=4.ckpt")]
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".ckpt", ".pt", ".pkl")]
    assert ckptvault.info(tmp_path / "last.ckpt").step == 12

    trainer, _, start = fit(tmp_path, 16, VaultCheckpointIO(), resume=True)
    assert start.step == 12 and trainer.global_step == 16
    assert ckptvault.load(tmp_path / "last.ckpt")["global_step"] == 16


def test_sigkill_then_resume_matches_uninterrupted_run_bitwise(tmp_path: Path) -> None:
    # Checkpoints at epoch ends (8 batches an epoch): Lightning cannot resume a plain DataLoader
    # mid-epoch at the same batch, with any CheckpointIO, so only those resume bit for bit.
    _, reference, _ = fit(tmp_path / "reference", 24, VaultCheckpointIO(), every=8)
    root = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.integrations.lightning_fit_script",
            str(root),
            "24",
            "--every",
            "8",
            "--sleep",
            "0.25",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if ckptvault.info(root / "last.ckpt").step >= 8:
                    break
            except ckptvault.CheckpointError:
                pass
            time.sleep(0.05)
        assert proc.poll() is None, "the fit finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed_at = ckptvault.info(root / "last.ckpt").step
    assert killed_at in (8, 16)
    trainer, resumed, start = fit(root, 24, VaultCheckpointIO(), resume=True, every=8)
    assert start.step == killed_at and trainer.global_step == 24
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b) and a.dtype == b.dtype, name


def test_unencodable_value_is_refused_with_its_path(tmp_path: Path) -> None:
    plugin = VaultCheckpointIO()
    with pytest.raises(ckptvault.UnsupportedStateError, match="hyper_parameters") as caught:
        plugin.save_checkpoint(
            {"state_dict": {}, "hyper_parameters": {"fn": lambda x: x}}, tmp_path / "a.ckpt"
        )
    assert "fn" in str(caught.value)
    assert not (tmp_path / "a.ckpt").exists()


def test_safe_hparam_containers_become_plain(tmp_path: Path) -> None:
    plugin = VaultCheckpointIO()
    hp = AttributeDict(lr=0.1, args=argparse.Namespace(depth=3), data=Path("/data/x"))
    plugin.save_checkpoint({"global_step": 3, "hyper_parameters": hp}, tmp_path / "a.ckpt")
    back = plugin.load_checkpoint(tmp_path / "a.ckpt")
    assert back["hyper_parameters"] == {"lr": 0.1, "args": {"depth": 3}, "data": "/data/x"}
    assert type(back["hyper_parameters"]) is dict


def test_tampered_checkpoint_is_refused_on_load(tmp_path: Path) -> None:
    plugin = VaultCheckpointIO()
    plugin.save_checkpoint({"state_dict": {"w": torch.arange(64.0)}}, tmp_path / "a.ckpt")
    data = max((p for p in (tmp_path / "a.ckpt").iterdir() if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ckptvault.CorruptCheckpointError):
        plugin.load_checkpoint(tmp_path / "a.ckpt")


def test_remove_checkpoint_unlinks_symlinks_and_leaves_foreign_files(tmp_path: Path) -> None:
    plugin = VaultCheckpointIO()
    plugin.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, tmp_path / "a.ckpt")
    (tmp_path / "last.ckpt").symlink_to("a.ckpt")
    assert torch.equal(plugin.load_checkpoint(tmp_path / "last.ckpt")["state_dict"]["w"], torch.ones(3))
    plugin.remove_checkpoint(tmp_path / "last.ckpt")
    assert not (tmp_path / "last.ckpt").exists() and ckptvault.verify(tmp_path / "a.ckpt").ok
    (tmp_path / "foreign.ckpt").write_bytes(b"not ours")
    plugin.remove_checkpoint(tmp_path / "foreign.ckpt")
    assert (tmp_path / "foreign.ckpt").read_bytes() == b"not ours"
    plugin.remove_checkpoint(tmp_path / "a.ckpt")
    assert not (tmp_path / "a.ckpt").exists()


@pytest.mark.parametrize("options", [{"async_save": True}, {"incremental": True, "compression": "auto"}])
def test_async_and_incremental_variants_save_and_resume(tmp_path: Path, options: dict[str, Any]) -> None:
    fit(tmp_path, 8, VaultCheckpointIO(**options))
    assert ckptvault.verify(tmp_path / "last.ckpt").ok
    trainer, _, start = fit(tmp_path, 12, VaultCheckpointIO(**options), resume=True)
    assert start.step == 8 and trainer.global_step == 12
    assert ckptvault.info(tmp_path / "last.ckpt").step == 12


def test_sharded_strategies_are_refused() -> None:
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    with pytest.raises(ShardedStrategyError, match="StorageWriter"):
        check_strategy(FSDPStrategy(state_dict_type="sharded"))
    with pytest.raises(ShardedStrategyError, match="StorageWriter"):
        check_strategy(ModelParallelStrategy())
    check_strategy(FSDPStrategy(state_dict_type="full"))


def test_async_pruning_waits_for_the_new_checkpoints_to_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Top-k pruning right after an async save must not delete the old checkpoint before the new
    one is committed (Accelerate's ``total_limit`` bug): the removal is queued behind the save."""
    from ckptvault.engine import background

    plugin = VaultCheckpointIO(async_save=True)
    plugin.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 1}, tmp_path / "old.ckpt")
    plugin.wait()
    release = threading.Event()
    real = background.commit_plan

    def slow(*args: Any, **kwargs: Any) -> Any:
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(background, "commit_plan", slow)
    plugin.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 2}, tmp_path / "new.ckpt")
    plugin.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 2}, tmp_path / "last.ckpt")
    plugin.remove_checkpoint(tmp_path / "old.ckpt")  # returns at once: nothing waited for the commit
    time.sleep(0.2)
    assert ckptvault.verify(tmp_path / "old.ckpt").ok and not (tmp_path / "new.ckpt").exists()
    release.set()
    plugin.teardown()
    assert not (tmp_path / "old.ckpt").exists()
    assert ckptvault.info(tmp_path / "new.ckpt").step == 2 and ckptvault.verify(tmp_path / "last.ckpt").ok
