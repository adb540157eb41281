"""Two tiers on a real S3 server (moto on loopback), configured the way users configure it: the
standard AWS variables and an ``s3://`` URL. A run on machine A mirrors to the bucket; machine B
starts with an empty disk, restores from the bucket, resumes exactly and mirrors on; ``ckptvault
ls`` reads the bucket run and the local run's tiers; an incremental run uploads only changed chunks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import ckptvault as cv
from ckptvault.cli.main import app
from ckptvault.engine.verify import verify_checkpoint
from ckptvault.storage.resolve import storage_for
from ckptvault.testing.s3server import MotoServer

from .test_mirror import make_state, steps, train_step


@pytest.fixture
def bucket_env(moto_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for name, value in moto_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_bucket


def ls_json(location: str) -> list[dict[str, Any]]:
    result = CliRunner().invoke(app, ["ls", "--json", location])
    assert result.exit_code == 0, result.output
    rows: list[dict[str, Any]] = json.loads(result.output)
    return rows


def test_a_run_survives_its_machine_through_the_bucket(tmp_path: Path, bucket_env: str) -> None:
    mirror = f"s3://{bucket_env}/runs/exp1"
    options: dict[str, Any] = {"every_n_steps": 2, "validate": "checksum", "mirror": mirror}
    reference = make_state(0)
    for _ in range(6):
        train_step(reference)
    first = make_state(0)
    with cv.CheckpointManager(tmp_path / "machine_a", **options) as manager:
        steps(manager, first, 4)
        assert manager.mirror is not None and manager.mirror.flush(60)
        tiers = {Path(r["path"]).name: r["tier"] for r in ls_json(str(tmp_path / "machine_a"))}
        assert tiers == {"step_00000002": "both", "step_00000004": "both"}
    remote = {Path(r["path"]).name for r in ls_json(mirror)}
    assert remote == {"step_00000002", "step_00000004"}
    storage, _ = storage_for(mirror)
    assert verify_checkpoint(storage, f"{mirror}/step_00000004").ok
    resumed = make_state(seed=7)  # machine B: nothing on its disk
    with cv.CheckpointManager(tmp_path / "machine_b", **options) as manager:
        info = manager.restore(resumed)
        assert info is not None and info.step == 4
        steps(manager, resumed, 2)
        assert manager.mirror is not None and manager.mirror.flush(60)
    got, want = resumed.parts["model"]["model"], reference.parts["model"]["model"]
    for (name, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert {Path(r["path"]).name for r in ls_json(mirror)} >= {"step_00000006"}
    loaded = cv.load(f"{mirror}/step_00000006")  # any reader goes straight to the bucket
    assert loaded["step"] == 6


def test_incremental_uploads_only_what_changed(tmp_path: Path, bucket_env: str) -> None:
    mirror = f"s3://{bucket_env}/runs/inc"
    model = torch.nn.Sequential(*[torch.nn.Linear(128, 128) for _ in range(10)])
    state = cv.TrainState(model)
    options: dict[str, Any] = {"every_n_steps": 1, "validate": "checksum", "mirror": mirror}
    with cv.CheckpointManager(tmp_path / "run", incremental=True, chunk_bytes=16384, **options) as manager:
        manager.step(state)
        assert manager.mirror is not None and manager.mirror.flush(60)
        first = manager.mirror.last_report
        with torch.no_grad():
            model[0].weight.add_(1.0)  # one layer of ten: ~10% of the bytes
        manager.step(state)
        assert manager.mirror.flush(60)
        second = manager.mirror.last_report
    assert first is not None and second is not None
    full = first.bytes_copied
    assert second.chunks_skipped > 0
    assert second.bytes_copied <= 0.12 * full, (second.bytes_copied, full)
