"""ckptvault.integrations.transformers: the Trainer mirror, complete checkpoints, the HF export."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

import torch
from transformers.trainer_utils import get_last_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
import hf_helpers as h

import ckptvault
from ckptvault.export import export_checkpoint
from ckptvault.integrations.transformers import (
    VaultCallback,
    latest_complete_checkpoint,
    materialize_checkpoint,
)


def assert_equal_tree(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), "tensors differ"
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_equal_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_equal_tree(x, y)
    else:
        assert a == b


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    """One 6-step run saving every 2 steps, mirrored (shared by the tests: Trainer costs seconds)."""
    root = tmp_path_factory.mktemp("hf")
    callback = VaultCallback(root / "run", keep_last=5)
    trainer = h.trainer(root / "out", [callback])
    trainer.train()
    assert callback.saved == [2, 4, 6]
    return root / "out", root / "run", trainer


def test_mirror_holds_every_save_and_restores_bitwise(trained: tuple[Path, Path, Any]) -> None:
    out, run, trainer = trained
    names = [Path(p).name for p in ckptvault.list_checkpoints(run)]
    assert names == ["step_00000002", "step_00000004", "step_00000006"]
    for name in names:
        assert ckptvault.verify(run / name).ok
    tree = ckptvault.load(run / "step_00000006")
    assert_equal_tree(tree["model"]["model"], dict(trainer.model.state_dict()))
    assert_equal_tree(tree["optimizer"]["optimizer"], trainer.optimizer.state_dict())
    assert_equal_tree(tree["scheduler"]["scheduler"], trainer.lr_scheduler.state_dict())
    saved_state = json.loads(tree["extras"]["trainer_state"]["json"])
    assert saved_state == json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert {"python", "numpy", "torch"} <= set(tree["rng"])


def test_incomplete_newest_checkpoint_is_skipped_and_resume_works(
    trained: tuple[Path, Path, Any], tmp_path: Path
) -> None:
    out, run, _ = trained
    crashed = tmp_path / "out"
    crashed.mkdir()
    for step in (2, 4, 6):
        (crashed / f"checkpoint-{step}").symlink_to(out / f"checkpoint-{step}", target_is_directory=True)
    # A crash during the save of step 6: weights half written, trainer_state.json never written.
    (crashed / "checkpoint-6").unlink()
    broken = crashed / "checkpoint-6"
    broken.mkdir()
    data = (out / "checkpoint-6" / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert get_last_checkpoint(str(crashed)) == str(broken)  # transformers picks the wreck
    assert latest_complete_checkpoint(crashed) == str(crashed / "checkpoint-4")
    assert latest_complete_checkpoint(crashed, run) == str(crashed / "checkpoint-4")

    # Resume from Trainer's checkpoint-4 and, separately, from the mirror's step 4 materialised:
    # both finish at step 6 with identical weights (the mirror resumes exactly like Trainer's own).
    resumed = h.trainer(tmp_path / "a", [])
    resumed.train(resume_from_checkpoint=latest_complete_checkpoint(crashed))
    path = materialize_checkpoint(run, tmp_path / "b", step=4)
    assert Path(path).name == "checkpoint-4"
    from_mirror = h.trainer(tmp_path / "b", [])
    from_mirror.train(resume_from_checkpoint=path)
    assert resumed.state.global_step == from_mirror.state.global_step == 6
    assert_equal_tree(dict(resumed.model.state_dict()), dict(from_mirror.model.state_dict()))


def test_hf_export_round_trip_gives_identical_logits(trained: tuple[Path, Path, Any], tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    _, run, trainer = trained
    export_checkpoint(run / "step_00000006", tmp_path / "hf", format="hf")
    rebuilt = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    probe = torch.arange(8).reshape(1, 8) % h.VOCAB
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(probe).logits, trainer.model(probe).logits)


def _accelerated(tmp: Path, **project: Any) -> tuple[Any, Any, Any]:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    accelerator = Accelerator(cpu=True, project_config=ProjectConfiguration(str(tmp), **project))
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def _train_step(model: Any, optimizer: Any) -> None:
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_accelerate_total_limit_deletes_before_the_new_state_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import accelerate.accelerator as acc_module

    accelerator, model, optimizer = _accelerated(tmp_path, automatic_checkpoint_naming=True, total_limit=1)
    _train_step(model, optimizer)
    accelerator.save_state()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint_0"]

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("simulated crash inside save_state")

    monkeypatch.setattr(acc_module, "save_accelerator_state", crash)
    _train_step(model, optimizer)
    with pytest.raises(OSError, match="simulated"):
        accelerator.save_state()
    # checkpoint_0 was deleted before the failed save: nothing complete is left to load.
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "checkpoint_0" not in left


def test_vault_accelerate_failed_save_keeps_the_previous_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptvault.integrations.transformers_accelerate import VaultAccelerate
    from ckptvault.training.state import TrainState

    accelerator, model, optimizer = _accelerated(tmp_path / "acc")
    vault = VaultAccelerate(accelerator, tmp_path / "run", keep_last=1)
    _train_step(model, optimizer)
    vault.save_state()
    good = {k: v.clone() for k, v in model.state_dict().items()}
    _train_step(model, optimizer)

    def crash(self: TrainState, scope: str = "full") -> Any:
        raise OSError("simulated crash inside the save")

    with monkeypatch.context() as patch:
        patch.setattr(TrainState, "capture", crash)
        with pytest.raises(OSError, match="simulated"):
            vault.save_state()
    assert [Path(p).name for p in ckptvault.list_checkpoints(tmp_path / "run")] == ["step_00000001"]
    vault.save_state()  # step 2 commits; step 1 may go only after that (keep_last=1)
    names = [Path(p).name for p in ckptvault.list_checkpoints(tmp_path / "run")]
    assert names[-1] == "step_00000002" and set(names) <= {"step_00000001", "step_00000002"}
    vault.close()

    accelerator2, model2, _ = _accelerated(tmp_path / "acc2")
    vault2 = VaultAccelerate(accelerator2, tmp_path / "run", keep_last=1)
    info = vault2.load_state()
    assert info is not None and vault2.step == 2
    assert_equal_tree(dict(model2.state_dict()), dict(model.state_dict()))
    assert not torch.equal(good["weight"], model2.state_dict()["weight"])
    vault2.close()


def test_callback_saves_the_fp16_grad_scaler_of_accelerates_optimizer(tmp_path: Path) -> None:
    """Trainer's fp16 scaler rides on Accelerate's optimizer wrapper; the mirror must hold it (its
    scale and growth tracker), or a resumed fp16 run restarts at the initial loss scale."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from transformers import TrainerControl, TrainerState

    Accelerator(cpu=True)  # the process state AcceleratedOptimizer reads
    model = h.tiny_gpt2()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=7)
    optimizer = AcceleratedOptimizer(
        torch.optim.AdamW(model.parameters()), device_placement=False, scaler=scaler
    )
    scaler.scale(torch.ones(()))  # the scale tensor exists from the first scaled loss on
    scaler.update(2.0**9)  # a scale the run has moved to: not the constructor's
    state = TrainerState(global_step=3, epoch=1.0, is_world_process_zero=True)
    callback = VaultCallback(tmp_path / "run", validate="checksum")
    callback.on_save(None, state, TrainerControl(), model=model, optimizer=optimizer, lr_scheduler=None)
    callback.on_train_end(None, state, TrainerControl())

    tree = ckptvault.load(tmp_path / "run" / "step_00000003")
    assert tree["scaler"]["scaler"] == scaler.state_dict()
    fresh = torch.amp.GradScaler("cpu")
    fresh.load_state_dict(tree["scaler"]["scaler"])
    assert fresh.get_scale() == 2.0**9


def test_vault_accelerate_killed_mid_save_leaves_the_previous_state_loadable(tmp_path: Path) -> None:
    """SIGKILL while step 2's files are being written (its staging directory holds data): step 1
    is still the run's newest checkpoint, nothing partial is visible, and load_state restores it
    bitwise -- where Accelerate's own save_state with total_limit=1 has deleted it already."""
    import os
    import signal
    import subprocess
    import time

    from accelerate import Accelerator

    from ckptvault.integrations.transformers_accelerate import VaultAccelerate

    run, weights = tmp_path / "run", tmp_path / "step1-weights"
    script = Path(__file__).parent / "accelerate_save_script.py"
    child = subprocess.Popen(
        [sys.executable, str(script), str(run), str(weights)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "saved 1"
        deadline, killed_at = time.monotonic() + 60, None
        while killed_at is None and time.monotonic() < deadline and child.poll() is None:
            for staging in run.glob(".step_00000002.*"):
                if any(f.stat().st_size > 0 for f in staging.glob("data-*")):
                    os.kill(child.pid, signal.SIGKILL)
                    killed_at = staging.name
                    break
        assert killed_at is not None, "the child finished step 2 before it could be killed mid-write"
    finally:
        child.kill()
        child.wait()
    assert [Path(p).name for p in ckptvault.list_checkpoints(run)] == ["step_00000001"]

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 2048))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model, optimizer = accelerator.prepare(model, optimizer)
    vault = VaultAccelerate(accelerator, run, keep_last=1, validate="checksum")
    info = vault.load_state()
    assert info is not None and vault.step == 1
    assert_equal_tree(dict(model.state_dict()), dict(ckptvault.load(weights)))
    vault.save_state()  # the run goes on: the dead writer's staging area is no obstacle
    assert [Path(p).name for p in ckptvault.list_checkpoints(run)] == ["step_00000002"]
    vault.close()
