"""The command line, run as a user runs it: a real subprocess, real exit codes, JSON parsed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptvault as cv


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "ckptvault.cli.main", *args], capture_output=True, text=True)
    if ok:
        assert done.returncode == 0, done.stderr + done.stdout
    return done


@pytest.fixture
def run_dir(ckpt_dir: Path) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    cv.save(ckpt_dir / "step_00000010", {"model": model.state_dict()}, metadata={"metrics": {"loss": 1.5}})
    with torch.no_grad():
        model.weight[0, 0] += 2.0
    cv.save(ckpt_dir / "step_00000020", {"model": model.state_dict()}, metadata={"metrics": {"loss": 0.5}})
    return ckpt_dir


def test_ls_lists_steps_and_metrics(run_dir: Path) -> None:
    rows = json.loads(run("ls", str(run_dir), "--json").stdout)
    assert [r["step"] for r in rows] == [10, 20]
    assert rows[1]["metrics"] == {"loss": 0.5}
    assert "step_00000020" in run("ls", str(run_dir)).stdout


def test_show_prints_tensor_table(run_dir: Path) -> None:
    doc = json.loads(run("show", str(run_dir / "step_00000010"), "--json").stdout)
    assert doc["step"] == 10
    assert {t["name"]: t["shape"] for t in doc["tensors"]} == {"model.weight": [3, 4], "model.bias": [3]}
    assert "model.weight" in run("show", str(run_dir / "step_00000010")).stdout


def test_verify_exit_codes(run_dir: Path) -> None:
    good = run_dir / "step_00000010"
    assert json.loads(run("verify", str(good), "--json").stdout)[0]["ok"] is True
    data = good / "data-00000.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    failed = run("verify", str(good), str(run_dir / "step_00000020"), ok=False)
    assert failed.returncode == 1
    assert "FAIL" in failed.stdout and "digest" in failed.stdout
    assert "OK" in failed.stdout  # the healthy one is still reported healthy


def test_diff_shows_the_changed_tensor(run_dir: Path) -> None:
    rows = json.loads(
        run("diff", str(run_dir / "step_00000010"), str(run_dir / "step_00000020"), "--json").stdout
    )
    status = {r["path"]: r for r in rows}
    assert status["model.bias"]["status"] == "identical"
    assert status["model.weight"]["status"] == "changed" and status["model.weight"][
        "max_abs"
    ] == pytest.approx(2.0)


def test_export_and_import_round_trip(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "flat.safetensors"
    run("export", str(run_dir / "step_00000010"), str(out))
    run("import", str(out), str(tmp_path / "reimported"))
    back = cv.load(tmp_path / "reimported")
    original = cv.load(run_dir / "step_00000010")["model"]
    assert torch.equal(back["model.weight"], original["weight"])


def test_errors_are_one_line_not_tracebacks(tmp_path: Path) -> None:
    done = run("show", str(tmp_path / "missing"), ok=False)
    assert done.returncode == 1
    assert "CheckpointNotFoundError" in done.stderr and "Traceback" not in done.stderr


def test_hostile_tree_is_reported_not_crashed(run_dir: Path) -> None:
    target = run_dir / "step_00000010"
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["tree"] = json.loads("[" * 600 + "]" * 600)  # deeper than the format allows
    (target / "manifest.json").write_text(json.dumps(manifest))
    for command in ("show", "verify"):
        done = run(command, str(target), ok=False)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr


def test_trust_is_passed_to_validate_and_onnx_export_only(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--trust MODULE`` (repeatable) is ``trusted_modules=[...]``; absent, None (the environment
    variable then applies); on an export format that builds no model it is a usage error."""
    from typer.testing import CliRunner

    from ckptvault.cli import main as cli_main

    seen: list[object] = []

    def fake_validate(path: object, level: str, *, trusted_modules: list[str] | None = None) -> object:
        seen.append(trusted_modules)
        raise cv.CheckpointError("stopped here")

    monkeypatch.setattr(cli_main.api, "validate", fake_validate)
    target = str(run_dir / "step_00000010")
    runner = CliRunner()
    runner.invoke(cli_main.app, ["validate", target, "--trust", "mypkg.models", "--trust", "other"])
    runner.invoke(cli_main.app, ["validate", target])
    assert seen == [["mypkg.models", "other"], None]
    done = runner.invoke(
        cli_main.app, ["export", target, str(tmp_path / "x.safetensors"), "--trust", "mypkg"]
    )
    assert done.exit_code == 2 and "--trust does not apply to --format safetensors" in done.output
