"""URLs are accepted everywhere a path is: the API and the CLI on ``s3://`` locations of a real S3
server (moto on loopback), configured by the standard AWS variables as a user's shell would be."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

import ckptvault as cv
from ckptvault.cli.main import app
from ckptvault.storage.resolve import storage_for
from ckptvault.testing.s3server import MotoServer


@pytest.fixture
def bucket(moto_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for name, value in moto_server.env().items():
        monkeypatch.setenv(name, value)
    return f"s3://{s3_bucket}"


def state(seed: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((256, 256)).astype(np.float32), "b": np.arange(10.0), "step": seed}


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_the_api_on_urls(bucket: str) -> None:
    one, two = f"{bucket}/runs/a/step_00000001", f"{bucket}/runs/a/step_00000002"
    cv.save(one, state(1), metadata={"metrics": {"loss": 0.5}})
    pending = cv.save_async(two, state(2))
    pending.wait()
    loaded = cv.load(two)
    assert np.array_equal(loaded["w"], state(2)["w"]) and loaded["step"] == 2
    with cv.open(one) as view:  # lazy: one tensor by ranged reads
        assert np.array_equal(np.asarray(view["w"]), state(1)["w"])
    assert cv.verify(one).ok and cv.info(one).num_tensors == 2
    assert cv.list_checkpoints(f"{bucket}/runs") == [one, two]
    with pytest.raises(cv.CheckpointExistsError):
        cv.save(one, state(3))
    cv.save(one, state(3), overwrite=True)
    assert cv.load(one)["step"] == 3


def test_the_cli_on_urls(bucket: str, tmp_path: Path) -> None:
    a, b = f"{bucket}/runs/r/step_00000001", f"{bucket}/runs/r/step_00000002"
    cv.save(a, state(1))
    cv.save(b, state(2))
    assert json.loads(cli("show", "--json", a))["path"] == a
    assert "OK" in cli("verify", a, b)
    rows = json.loads(cli("diff", "--json", a, b))
    assert {r["status"] for r in rows} >= {"changed"}
    assert [Path(r["path"]).name for r in json.loads(cli("ls", "--json", f"{bucket}/runs/r"))] == [
        "step_00000001",
        "step_00000002",
    ]
    local = tmp_path / "w.safetensors"
    cli("export", b, str(local))
    exported = [v for v in load_file(str(local)).values() if v.shape == (256, 256)]
    assert len(exported) == 1 and np.array_equal(exported[0], state(2)["w"])
    cli("export", b, f"{bucket}/exports/w.safetensors")  # straight into the bucket, whole or absent
    remote = storage_for(f"{bucket}/exports/w.safetensors")
    document = remote[0].get(remote[1], max_bytes=1 << 30)
    assert document is not None and document.data == local.read_bytes()
    assert "0 chunks" in cli("gc", f"{bucket}/runs/r")


def test_gc_of_an_incremental_run_in_a_bucket(bucket: str) -> None:
    run = f"{bucket}/runs/inc"
    for step in (1, 2, 3):
        cv.save(f"{run}/step_0000000{step}", state(step), incremental=True, chunk_bytes=16384)
    storage, _ = storage_for(run)
    assert storage.delete(f"{run}/step_00000001")
    report = json.loads(cli("gc", "--json", run))
    assert report["checkpoints"] == 2 and report["deleted_chunks"] > 0
    assert cv.verify(f"{run}/step_00000002").ok and cv.verify(f"{run}/step_00000003").ok
