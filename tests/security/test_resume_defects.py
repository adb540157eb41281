"""Issue 13: the two resume defects, the run index retention trusts, and oracles that could not fail.

* A same-step re-save must not lose the run: a validation result belongs to the checkpoint id it
  checked, and ``restore`` never quietly starts fresh while a committed checkpoint that verifies exists.
* A failed ``save_async`` nobody waited on is raised by the next save, or reported at exit.
* A tampered or stale run index never makes retention delete what the manifests say to keep.
* The exact-comparison helper tells NaN payloads apart.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tests.helpers import assert_exact

import ckptvault as cv
from ckptvault import validation
from ckptvault.engine import background

REPO = Path(__file__).resolve().parents[2]
INDEX = ".ckptvault-index.json"


def make_state(seed: int = 0) -> cv.TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    return cv.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))


def weight(state: cv.TrainState) -> torch.Tensor:
    return state.parts["model"]["model"].weight.detach().clone()


def names(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if not p.name.startswith(".") and p.is_dir())


# -- a same-step re-save ---------------------------------------------------------------------------------
class _RacingReadback:
    """Holds the first save's background readback until the second save has replaced the checkpoint.

    What the real check reports when the directory it is reading is swapped out and deleted under it is
    a failure (files vanish mid-read); ``fail_with`` gives that outcome deterministically, either as a
    failed result (``"result"``) or as an exception escaping the check (``"raise"``).
    """

    def __init__(self, fail_with: str) -> None:
        self.real = validation.readback
        self.fail_with = fail_with
        self.calls = 0
        self.first_running = threading.Event()
        self.overwritten = threading.Event()

    def __call__(self, path: str, requested: str = "readback", note: str = "") -> validation.ValidationResult:
        self.calls += 1
        if self.calls > 1:
            return self.real(path, requested, note)
        self.first_running.set()
        assert self.overwritten.wait(30)
        if self.fail_with == "raise":
            raise FileNotFoundError(2, "No such file or directory", f"{path}/data-00000.safetensors")
        result = self.real(path, requested, note)
        return dataclasses.replace(
            result, passed=False, problems=("missing-file: data-00000.safetensors vanished while read",)
        )


@pytest.mark.parametrize("fail_with", ["result", "raise"])
def test_same_step_resave_keeps_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_with: str
) -> None:
    racing = _RacingReadback(fail_with)
    monkeypatch.setattr(validation, "readback", racing)
    run = tmp_path / "run"
    state = make_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # whatever is said about the stale check, restore must work
        with cv.CheckpointManager(run) as manager:  # the default manager: background validation
            manager.save(state)
            assert racing.first_running.wait(30)
            with torch.no_grad():
                state.parts["model"]["model"].weight.add_(1.0)
            second = manager.save(state)  # the same step: replaces the checkpoint being checked
            racing.overwritten.set()
            manager.wait_validation()
            expected = weight(state)
            fresh = make_state(seed=7)
            info = manager.restore(fresh)
            assert info is not None and info.checkpoint_id == second.checkpoint_id
            assert torch.equal(weight(fresh), expected)
            assert [r.valid for r in manager.checkpoints()] == [True]
        with cv.CheckpointManager(run) as reopened:  # nor does the next process lose it
            fresh = make_state(seed=8)
            info = reopened.restore(fresh)
            assert info is not None and info.checkpoint_id == second.checkpoint_id
            assert torch.equal(weight(fresh), expected)


def _two_checkpoints(run: Path) -> tuple[cv.CheckpointInfo, cv.CheckpointInfo]:
    state = make_state()
    with cv.CheckpointManager(run, validate="checksum") as manager:
        state.step = 1
        first = manager.save(state)
        state.step = 2
        second = manager.save(state)
    return first, second


def _record_failed_validation(info: cv.CheckpointInfo) -> None:
    validation.record_result(
        validation.ValidationResult(
            info.path,
            "full",
            "full",
            False,
            ("output 0 differs from the in-memory model's",),
            checkpoint_id=info.checkpoint_id,
        )
    )


def test_restore_says_why_it_skipped_each_newer_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first, second = _two_checkpoints(run)
    _record_failed_validation(second)
    with cv.CheckpointManager(run, validate="checksum") as manager:
        with pytest.warns(UserWarning, match=r"step_00000002.*failed full validation.*output 0 differs"):
            info = manager.restore(make_state(seed=3))
        assert info is not None and info.checkpoint_id == first.checkpoint_id


def test_restore_refuses_a_silent_fresh_start_when_only_validation_failed(tmp_path: Path) -> None:
    """Decision: when every candidate was skipped only because its validation failed while its bytes
    verify, ``restore`` raises ``RestoreRefusedError`` (naming each one and how to load it) instead of
    returning None: the caller would start fresh, and retention would then delete the run's work."""
    run = tmp_path / "run"
    first, second = _two_checkpoints(run)
    _record_failed_validation(first)
    _record_failed_validation(second)
    with cv.CheckpointManager(run, validate="checksum") as manager:
        with pytest.warns(UserWarning) as warned, pytest.raises(cv.CheckpointError) as caught:
            manager.restore(make_state(seed=3))
        said = " ".join(str(w.message) for w in warned)
        assert "step_00000002" in said and "step_00000001" in said  # each skip is named
        assert type(caught.value).__name__ == "RestoreRefusedError"
        message = str(caught.value)
        assert "step_00000002" in message and "step_00000001" in message and "which=2" in message
        # the explicit escape hatch loads it anyway
        fresh = make_state(seed=3)
        info = manager.restore(fresh, which=2)
        assert info is not None and info.checkpoint_id == second.checkpoint_id and fresh.step == 2


def test_restore_does_not_trust_an_invalid_mark_without_evidence(tmp_path: Path) -> None:
    """A run hit by the same-step race before the fix: the index says invalid, the recorded failure
    belongs to the replaced checkpoint. The bytes verify, so restore loads it."""
    run = tmp_path / "run"
    _, second = _two_checkpoints(run)
    stale = dataclasses.replace(second, checkpoint_id="0" * 32)  # the id of the replaced checkpoint
    _record_failed_validation(stale)
    doc = json.loads((run / INDEX).read_text())
    for record in doc["records"]:
        record["valid"] = False
    (run / INDEX).write_text(json.dumps(doc))
    with cv.CheckpointManager(run, validate="checksum") as manager:
        info = manager.restore(make_state(seed=3))
        assert info is not None and info.checkpoint_id == second.checkpoint_id
        assert manager.latest() is not None and manager.latest().checkpoint_id == second.checkpoint_id


def test_restore_returns_none_loudly_when_nothing_verifies(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _, second = _two_checkpoints(run)
    _record_failed_validation(second)
    for name in ("step_00000001", "step_00000002"):
        data = run / name / "data-00000.safetensors"
        raw = bytearray(data.read_bytes())
        raw[-1] ^= 0x01
        data.write_bytes(bytes(raw))
    with cv.CheckpointManager(run, validate="checksum") as manager:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert manager.restore(make_state(seed=3)) is None
        said = " ".join(str(w.message) for w in caught)
        assert "step_00000001" in said and "step_00000002" in said


# -- a failed save_async nobody waited on --------------------------------------------------------------
def _broken_commit(*args: object, **kwargs: object) -> None:
    raise cv.StorageError(5, "Input/output error (injected)")


def test_unobserved_async_failure_is_raised_by_the_next_save_async(
    ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(background, "commit_plan", _broken_commit)
    observed = cv.save_async(ckpt_dir / "a", {"w": torch.ones(3)})
    with pytest.raises(cv.StorageError):
        observed.wait()  # seen by the caller: not raised again
    pending = cv.save_async(ckpt_dir / "a", {"w": torch.ones(3)})
    while not pending.done():
        threading.Event().wait(0.01)
    monkeypatch.undo()
    with pytest.raises(cv.StorageError, match="injected"):
        cv.save_async(ckpt_dir / "b", {"w": torch.ones(3)})
    assert not (ckpt_dir / "b").exists()
    assert cv.save_async(ckpt_dir / "b", {"w": torch.ones(3)}).wait().step == 0  # raised once only


def test_unobserved_async_failure_is_raised_by_the_next_save(
    ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(background, "commit_plan", _broken_commit)
    pending = cv.save_async(ckpt_dir / "a", {"w": torch.ones(3)})
    while not pending.done():
        threading.Event().wait(0.01)
    monkeypatch.undo()
    with pytest.raises(cv.StorageError, match="injected"):
        cv.save(ckpt_dir / "b", {"w": torch.ones(3)})
    assert cv.save(ckpt_dir / "b", {"w": torch.ones(3)}).step == 0


def test_unobserved_async_failure_is_reported_at_exit(ckpt_dir: Path) -> None:
    code = (
        "import torch, ckptvault as cv\n"
        "from ckptvault.engine import background\n"
        "def broken(*a, **k):\n"
        "    raise cv.StorageError(5, 'Input/output error (injected)')\n"
        "background.commit_plan = broken\n"
        f"cv.save_async({str(ckpt_dir / 'lost')!r}, {{'w': torch.ones(3)}})\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "injected" in done.stderr and "lost" in done.stderr, done.stderr
    assert not (ckpt_dir / "lost").exists()


def test_unobserved_manager_async_failure_is_reported_at_exit(tmp_path: Path) -> None:
    code = (
        "import torch, ckptvault as cv\n"
        "from ckptvault.engine import background\n"
        "def broken(*a, **k):\n"
        "    raise cv.StorageError(28, 'No space left on device (injected)')\n"
        "background.commit_plan = broken\n"
        "model = torch.nn.Linear(2, 2)\n"
        "state = cv.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))\n"
        f"manager = cv.CheckpointManager({str(tmp_path / 'run')!r}, every_n_steps=1, async_save=True,"
        " validate='checksum')\n"
        "manager.step(state)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "No space left on device (injected)" in done.stderr, done.stderr


# -- the run index retention decides from ------------------------------------------------------------------
def _run_with(run: Path, losses: list[float], **options: Any) -> None:
    state = make_state()
    with cv.CheckpointManager(run, validate="checksum", **options) as manager:
        for loss in losses:
            state.step += 1
            manager.save(state, metrics={"loss": loss})


def _tamper(run: Path, name: str, **fields: Any) -> None:
    doc = json.loads((run / INDEX).read_text())
    for record in doc["records"]:
        if record["name"] == name:
            record.update(fields)
    (run / INDEX).write_text(json.dumps(doc))


def _index_record(run: Path, name: str) -> dict[str, Any]:
    return next(r for r in json.loads((run / INDEX).read_text())["records"] if r["name"] == name)


def _one_more_save(run: Path, step: int, loss: float, **options: Any) -> None:
    state = make_state()
    state.step = step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cv.CheckpointManager(run, validate="checksum", **options) as manager:
            manager.save(state, metrics={"loss": loss})


def test_index_with_a_worse_metric_never_deletes_the_best(tmp_path: Path) -> None:
    run = tmp_path / "run"
    options = {"keep_last": 1, "keep_best": 1, "monitor": "loss"}
    _run_with(run, [0.1, 0.5, 0.6], **options)
    assert names(run) == ["step_00000001", "step_00000003"]
    _tamper(run, "step_00000001", metrics={"loss": 9.9})
    _one_more_save(run, 4, 0.7, **options)
    assert names(run) == ["step_00000001", "step_00000004"]
    assert _index_record(run, "step_00000001")["metrics"] == {"loss": 0.1}  # rebuilt from the manifest


def test_index_saying_invalid_never_deletes_a_checkpoint_that_verifies(tmp_path: Path) -> None:
    run = tmp_path / "run"
    options = {"keep_last": 1, "keep_every_n_steps": 2}
    _run_with(run, [0.3, 0.3, 0.3], **options)
    assert names(run) == ["step_00000002", "step_00000003"]
    _tamper(run, "step_00000002", valid=False)
    _one_more_save(run, 5, 0.3, **options)
    assert names(run) == ["step_00000002", "step_00000005"]
    assert _index_record(run, "step_00000002")["valid"] is True


def test_index_saying_older_never_deletes_a_newer_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    options = {"keep_last": 2}
    _run_with(run, [0.3, 0.3, 0.3], **options)
    assert names(run) == ["step_00000002", "step_00000003"]
    _tamper(run, "step_00000003", step=1, created=0.0)
    _one_more_save(run, 4, 0.3, **options)
    assert names(run) == ["step_00000003", "step_00000004"]


# -- the exact-comparison helper ------------------------------------------------------------------------
def _float(bits: str) -> float:
    value: float = struct.unpack(">d", bytes.fromhex(bits))[0]
    return value


def test_exact_comparison_tells_nan_payloads_apart() -> None:
    quiet, payload, negative = (
        _float("7ff8000000000000"),
        _float("7ff8000000000001"),
        _float("fff8000000000000"),
    )
    assert math.isnan(quiet) and math.isnan(payload) and math.isnan(negative)
    assert_exact(quiet, _float("7ff8000000000000"))
    for other in (payload, negative):
        with pytest.raises(AssertionError):
            assert_exact(quiet, other)
        with pytest.raises(AssertionError):
            assert_exact({"x": [quiet]}, {"x": [other]})
        with pytest.raises(AssertionError):
            assert_exact(complex(quiet, 0.0), complex(other, 0.0))
    assert_exact(complex(quiet, 1.0), complex(_float("7ff8000000000000"), 1.0))
    # tensors and arrays compare their bytes
    a = torch.tensor([quiet, 1.0], dtype=torch.float64)
    b = torch.tensor([payload, 1.0], dtype=torch.float64)
    with pytest.raises(AssertionError):
        assert_exact(a, b)
    with pytest.raises(AssertionError):
        assert_exact(a.numpy(), b.numpy())
    with pytest.raises(AssertionError):
        assert_exact(np.float64(quiet), np.float64(payload))
    assert_exact(a, a.clone())
