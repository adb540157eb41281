"""Validation on creation: checksum / readback / full levels, the manager's background validation,
failed checkpoints never restored, probes, exported programs and the validate/ls commands.

A full validation spawns a Python process that imports torch (about 2 s here), so these tests use
few of them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.models_for_validation import MLP, output_of, trained_mlp
from typer.testing import CliRunner

import ckptvault as cv
from ckptvault import RestoreRefusedError, validation
from ckptvault.cli.main import app
from ckptvault.engine import writer
from ckptvault.engine.sidecar import sidecar_name
from ckptvault.testing import serialization_bug
from ckptvault.training.state import probe_from_batch

REPO = Path(__file__).resolve().parents[1]
SIZES = [4, 8, 3]
KWARGS = {"sizes": SIZES}
# serialization_bug flips the lowest bit of the first weight; with this seed (model and probe) that
# changes the probe output, so full validation can see it (asserted where it matters).
VISIBLE_SEED = 1


def cli(*args: str) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def probe_for(seed: int, n: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(n, SIZES[0], generator=generator)


def make_state(seed: int = VISIBLE_SEED, **kwargs: object) -> cv.TrainState:
    model = trained_mlp(SIZES, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return cv.TrainState(model, optimizer, model_kwargs=KWARGS, probe=probe_for(seed), **kwargs)


def train_step(state: cv.TrainState) -> None:
    model = state.parts["model"]["model"]
    optimizer = state.parts["optimizer"]["optimizer"]
    loss = model(torch.randn(16, SIZES[0])).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def flip_byte(path: Path, offset_from_end: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


# -- full validation of save_model -----------------------------------------------------------------
def test_save_model_full_validation_passes_and_a_fresh_process_reproduces_the_output(tmp_path: Path) -> None:
    model = trained_mlp(SIZES, seed=0)
    probe = probe_for(0, n=6)
    assert model.training
    rng_before = torch.get_rng_state()
    path = tmp_path / "ckpts" / "model"
    info = cv.save_model(
        path, model, kwargs=KWARGS, probe=probe, validate="full", metadata={"metrics": {"loss": 0.25}}
    )
    # the probe ran in eval mode, but the live model and the RNG are left as they were
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert (path / validation.PROBE_FILE).is_file()

    result = validation.read_result(path)
    assert result is not None
    assert result["level"] == "full" and result["requested"] == "full"
    assert result["passed"] is True and result["problems"] == []
    assert result["checkpoint_id"] == info.checkpoint_id
    assert any("rebuilt MLP" in c for c in result["checks"])
    assert any("compared 1 metrics" in c for c in result["checks"])

    done = cli("validate", path)
    assert done.exit_code == 0, done.output
    assert "OK" in done.output and "full validation" in done.output

    # Acceptance: a fresh process given only the checkpoint path rebuilds the model and computes
    # the same output bit for bit.
    probe_file, out_file = tmp_path / "probe.safetensors", tmp_path / "out.safetensors"
    save_file({"probe": probe}, str(probe_file))
    code = (
        "import sys, torch, ckptvault as cv\n"
        "from safetensors.torch import load_file, save_file\n"
        "torch.set_num_threads(1)\n"
        # the one thing the fresh process must be told: which module it may import for the model
        "model = cv.load_model(sys.argv[1], trusted_modules=['tests.models_for_validation'])\n"
        # a fresh (aligned) copy: MKL's results depend on the input's 16-byte alignment, and
        # load_file maps the probe at whatever offset the file header leaves
        "probe = load_file(sys.argv[2])['probe'].clone()\n"
        "with torch.no_grad():\n"
        "    out = model(probe)\n"
        "save_file({'out': out.contiguous()}, sys.argv[3])\n"
        "print(type(model).__module__, type(model).__qualname__, model.training)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    fresh = subprocess.run(
        [sys.executable, "-c", code, str(path), str(probe_file), str(out_file)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert fresh.stdout.split() == ["tests.models_for_validation", "MLP", "False"]
    assert torch.equal(load_file(str(out_file))["out"], output_of(model, probe))


# -- the acceptance scenario: a serializer bug only full validation catches --------------------------
def test_manager_full_validation_catches_a_serialization_bug(tmp_path: Path) -> None:
    run = tmp_path / "run"
    state = make_state()
    model = state.parts["model"]["model"]
    with cv.CheckpointManager(run, validate="full", monitor="loss", mode="min") as manager:
        state.step = 1
        manager.save(state, metrics={"loss": 1.0})
        good = weights(model)
        train_step(state)
        state.step = 2
        with serialization_bug("weight") as corrupted:
            manager.save(state, metrics={"loss": 0.5})  # the better loss: best() would pick it
        assert corrupted == ["model.model.layers.0.weight"]
        bad = run / "step_00000002"

        # precondition: the stored weights differ from the live ones, and visibly on the probe
        stored = cv.load(bad)["model"]["model"]
        assert not torch.equal(stored["layers.0.weight"], model.state_dict()["layers.0.weight"])
        rebuilt = cv.load_model(bad)
        assert not torch.equal(output_of(rebuilt, state.probe), output_of(model, state.probe))

        # checksums and read-back cannot see it: the digests describe the wrong bytes
        assert cv.verify(bad).ok
        assert validation.readback(str(bad)).passed

        with pytest.warns(UserWarning, match="step_00000002 failed full validation"):
            manager.wait_validation()
        assert {r.name: r.valid for r in manager.checkpoints()} == {
            "step_00000001": True,
            "step_00000002": False,
        }
        failed = manager.validation_result("step_00000002")
        assert failed is not None and failed["passed"] is False and failed["level"] == "full"
        assert any("output 0 differs" in p for p in failed["problems"])
        passed = manager.validation_result("step_00000001")
        assert passed is not None and passed["passed"] is True and passed["level"] == "full"

        assert manager.latest().step == 1
        assert manager.best().step == 1
        fresh = make_state(seed=7)
        with pytest.warns(UserWarning, match=r"skipped checkpoint .*step_00000002: failed full validation"):
            info = manager.restore(fresh)
        assert info is not None and info.step == 1 and fresh.step == 1
        assert same_weights(weights(fresh.parts["model"]["model"]), good)

    listing = cli("ls", run)
    assert listing.exit_code == 0, listing.output
    assert "FAILED" in listing.output
    rows = {Path(r["path"]).name: r for r in json.loads(cli("ls", run, "--json").stdout)}
    assert rows["step_00000001"]["validation"]["passed"] is True
    assert rows["step_00000002"]["validation"]["passed"] is False
    assert rows["step_00000002"]["validation"]["level"] == "full"

    # a reopened manager still refuses it: from the index, and from the results once the index is lost
    for lose_index in (False, True):
        if lose_index:
            (run / ".ckptvault-index.json").unlink()
        with cv.CheckpointManager(run, validate="checksum", monitor="loss", mode="min") as reopened:
            assert {r.name: r.valid for r in reopened.checkpoints()} == {
                "step_00000001": True,
                "step_00000002": False,
            }
            assert reopened.best().step == 1
            assert reopened.latest().step == 1
            again = make_state(seed=8)
            assert reopened.restore(again).step == 1
            assert reopened.restore(make_state(seed=8), "best").step == 1
            assert same_weights(weights(again.parts["model"]["model"]), good)


def test_stale_failed_result_of_an_older_checkpoint_with_the_same_name(tmp_path: Path) -> None:
    run = tmp_path / "run"
    name = "step_00000001"
    model = trained_mlp(SIZES, seed=VISIBLE_SEED)
    # a checkpoint that fails full validation: committed, but the save raises
    with serialization_bug("weight"), pytest.raises(cv.ValidationFailedError) as caught:
        cv.save_model(run / name, model, kwargs=KWARGS, probe=probe_for(VISIBLE_SEED), validate="full")
    assert caught.value.result.passed is False
    old_id = cv.info(run / name).checkpoint_id
    assert validation.read_result(run / name)["checkpoint_id"] == old_id
    with cv.CheckpointManager(run, validate="checksum") as manager:
        assert [r.valid for r in manager.checkpoints()] == [False]
        assert manager.latest() is None

    shutil.rmtree(run / name)
    state = make_state()
    state.step = 1
    with cv.CheckpointManager(run, validate="checksum") as manager:
        info = manager.save(state)  # the same name, a new checkpoint: no new result recorded
    assert info.checkpoint_id != old_id
    assert validation.read_result(run / name)["passed"] is False  # the stale result is still there

    with cv.CheckpointManager(run, validate="checksum") as reopened:
        assert [(r.name, r.valid) for r in reopened.checkpoints()] == [(name, True)]
        assert reopened.latest().checkpoint_id == info.checkpoint_id
        assert reopened.restore(make_state(seed=3)).step == 1
    (run / ".ckptvault-index.json").unlink()
    with cv.CheckpointManager(run, validate="checksum") as rebuilt:
        assert [(r.name, r.valid) for r in rebuilt.checkpoints()] == [(name, True)]
    row = json.loads(cli("ls", run, "--json").stdout)[0]
    assert row["validation"] is None  # not the old checkpoint's failure


# -- the metric check -------------------------------------------------------------------------------
def test_full_validation_compares_the_sidecar_metrics(
    ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = writer.build_sidecar  # the writer's own binding (patching engine.sidecar has no effect)

    def altered(**kwargs: object) -> dict:
        doc = original(**kwargs)
        doc["metrics"] = {**doc["metrics"], "acc": 0.5}
        return doc

    monkeypatch.setattr(writer, "build_sidecar", altered)
    model = trained_mlp(SIZES, seed=0)
    path = ckpt_dir / "m"
    with pytest.raises(cv.ValidationFailedError) as caught:
        cv.save_model(
            path,
            model,
            kwargs=KWARGS,
            probe=probe_for(0),
            validate="full",
            metadata={"metrics": {"loss": 0.25, "acc": 0.9}},
        )
    result = caught.value.result
    assert result.level == "full" and not result.passed
    # two findings: the checksum level (verify) sees the manifest contradict its digested sidecar,
    # and the probe level names the metric the save was given
    assert len(result.problems) == 2, result.problems
    assert result.problems[0].startswith("metadata-mismatch")
    assert "metric 'acc'" in result.problems[1] and "0.9" in result.problems[1]
    assert "metric 'acc'" in str(caught.value)
    # the injection did what it should: the sidecar (digest-listed) says 0.5, and verify says so too
    sidecar = json.loads((path / sidecar_name(0)).read_text())
    assert sidecar["metrics"] == {"loss": 0.25, "acc": 0.5}
    report = cv.verify(path)
    assert not report.ok and [p.kind for p in report.problems] == ["metadata-mismatch"]
    recorded = validation.read_result(path)
    assert recorded is not None and recorded["passed"] is False


# -- readback and the fallback -------------------------------------------------------------------------
def test_readback_catches_a_flipped_byte(ckpt_dir: Path) -> None:
    path = ckpt_dir / "ck"
    cv.save(path, {"w": torch.arange(1000, dtype=torch.float32)}, validate="readback")
    result = validation.read_result(path)
    assert result["level"] == "readback" and result["passed"] is True

    flip_byte(path / "data-00000.safetensors")
    failed = cv.validate(path, "readback")
    assert failed.level == "readback" and not failed.passed and failed.problems
    assert validation.read_result(path)["passed"] is False

    done = cli("validate", path, "--level", "readback")
    assert done.exit_code == 1, done.output
    assert "FAILED" in done.output
    listing = cli("ls", ckpt_dir, "--json")
    assert json.loads(listing.stdout)[0]["validation"]["passed"] is False

    # "full" without a probe falls back to readback, which still fails
    assert not cv.validate(path, "full").passed
    with pytest.raises(ValueError, match="validate must be one of"):
        cv.validate(path, "thorough")


def test_full_without_architecture_or_probe_falls_back_to_readback(ckpt_dir: Path) -> None:
    note = "needs a recorded architecture and a probe"
    cv.save(ckpt_dir / "plain", {"w": torch.ones(3)}, validate="full")
    plain = validation.read_result(ckpt_dir / "plain")
    assert plain["requested"] == "full" and plain["level"] == "readback"
    assert plain["passed"] is True and note in plain["note"]

    cv.save_model(ckpt_dir / "noprobe", MLP(SIZES), kwargs=KWARGS, validate="full")
    noprobe = validation.read_result(ckpt_dir / "noprobe")
    assert noprobe["requested"] == "full" and noprobe["level"] == "readback" and note in noprobe["note"]

    done = cli("validate", ckpt_dir / "plain")
    assert done.exit_code == 0 and note in done.output

    # a manager whose state records no architecture: readback, saying why
    state = cv.TrainState(torch.nn.Linear(2, 2))
    with cv.CheckpointManager(ckpt_dir / "run", validate="full", every_n_steps=1) as manager:
        manager.step(state)
        manager.wait_validation()
        result = manager.validation_result("step_00000001")
    assert result["level"] == "readback" and result["passed"] is True and note in result["note"]
    assert not (ckpt_dir / "run" / "step_00000001" / validation.PROBE_FILE).exists()


# -- the manager's background validation --------------------------------------------------------------
def test_checksum_level_writes_no_results(tmp_path: Path) -> None:
    state = make_state()
    with cv.CheckpointManager(tmp_path / "run", validate="checksum", every_n_steps=1) as manager:
        for _ in range(2):
            manager.step(state)
        manager.wait_validation()
        assert manager.validation_result("step_00000002") is None
    assert not (tmp_path / "run" / validation.RESULTS_DIR).exists()
    # nor a probe file: nothing would read it
    assert not (tmp_path / "run" / "step_00000002" / validation.PROBE_FILE).exists()
    with pytest.raises(ValueError, match="validate must be one of"):
        cv.CheckpointManager(tmp_path / "other", validate="paranoid")


def test_full_validation_never_blocks_the_loop(tmp_path: Path) -> None:
    state = make_state()
    with cv.CheckpointManager(tmp_path / "run", validate="full", every_n_steps=1) as manager:
        started = time.perf_counter()
        info = manager.step(state)
        elapsed = time.perf_counter() - started
        assert info is not None and info.step == 1
        assert elapsed < 1.5, f"step() took {elapsed:.2f} s"
        assert manager.validation_result("step_00000001") is None  # still running
        manager.wait_validation()
        result = manager.validation_result("step_00000001")
    assert result is not None and result["level"] == "full" and result["passed"] is True
    assert result["seconds"] > elapsed  # the loop did not wait for it


# -- probes -------------------------------------------------------------------------------------------
def test_probe_from_batch() -> None:
    x, y = torch.randn(10, 3), torch.arange(10)
    probe = probe_from_batch((x, y))
    assert probe.shape == (4, 3) and torch.equal(probe, x[:4])
    x[0, 0] = 123.0  # a copy, not a view of the batch
    assert probe[0, 0] != 123.0
    assert torch.equal(probe_from_batch([x, y]), x[:4])
    assert torch.equal(probe_from_batch(x), x[:4])
    assert probe_from_batch((x[:2], y[:2])).shape == (2, 3)
    assert probe_from_batch({"input": x, "label": y}) is None
    assert probe_from_batch((["a", "b"], y)) is None
    assert probe_from_batch(torch.tensor(1.0)) is None
    assert probe_from_batch(()) is None


def test_manager_with_a_dataloader_captures_the_probe(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, SIZES[0]), torch.randn(32, SIZES[-1]))
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)
    model = MLP(SIZES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    state = cv.TrainState(model, optimizer, loader=loader, model_kwargs=KWARGS)
    assert state.probe is None
    with cv.CheckpointManager(tmp_path / "run", validate="full", every_n_steps=4) as manager:
        for _ in state.epochs(1):
            for xb, yb in state.batches():
                loss = (model(xb) - yb).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                manager.step(state, metrics={"loss": loss.item()})
        manager.wait_validation()
        result = manager.validation_result("step_00000004")
    assert torch.equal(state.probe, data.tensors[0][:4])
    assert result is not None
    assert result["level"] == "full" and result["passed"] is True, result
    assert any("ran the probe" in c for c in result["checks"])
    assert any("compared 1 metrics" in c for c in result["checks"])


def test_a_given_probe_is_kept(tmp_path: Path) -> None:
    data = torch.utils.data.TensorDataset(torch.randn(8, 4))
    given = torch.zeros(2, 4)
    state = cv.TrainState(MLP(SIZES), loader=torch.utils.data.DataLoader(data, batch_size=4), probe=given)
    for _ in state.batches():
        pass
    assert state.probe is given


# -- exported programs ----------------------------------------------------------------------------------
def test_export_program_round_trip(ckpt_dir: Path) -> None:
    model = trained_mlp(SIZES, seed=0).eval()
    probe = probe_for(0)
    cv.save_model(ckpt_dir / "m", model, kwargs=KWARGS, probe=probe, export_program=True)
    with pytest.raises(cv.UnsafeCheckpointError, match="trusted=True"):
        cv.load_program(ckpt_dir / "m")  # a program is code: never loaded without the caller's word
    program = cv.load_program(ckpt_dir / "m", trusted=True)
    with torch.no_grad():
        got = program.module()(probe)
    assert torch.equal(got, output_of(model, probe))
    assert cv.verify(ckpt_dir / "m").ok

    with pytest.raises(ValueError, match="probe"):
        cv.save_model(ckpt_dir / "np", model, kwargs=KWARGS, export_program=True)
    cv.save_model(ckpt_dir / "plain", model, kwargs=KWARGS)
    with pytest.raises(cv.CheckpointNotFoundError, match="no exported program"):
        cv.load_program(ckpt_dir / "plain", trusted=True)


# -- bugs found -------------------------------------------------------------------------------------------
def test_serialization_bug_is_always_caught_by_full_validation(ckpt_dir: Path) -> None:
    model = trained_mlp(SIZES, seed=0)
    with serialization_bug("weight") as corrupted, pytest.raises(cv.ValidationFailedError):
        cv.save_model(ckpt_dir / "m", model, kwargs=KWARGS, probe=probe_for(0), validate="full")
    assert corrupted == ["model.layers.0.weight"]
    stored = cv.load(ckpt_dir / "m")["model"]["layers.0.weight"]
    assert not torch.equal(stored, model.state_dict()["layers.0.weight"])


def test_a_crashed_validation_stays_a_failure_after_reopening(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(path: str, **_: object) -> validation.ValidationResult:
        raise RuntimeError("cannot start the validation process")

    monkeypatch.setattr(validation, "full", broken)
    run = tmp_path / "run"
    state = make_state()
    with cv.CheckpointManager(run, validate="full", every_n_steps=1) as manager:
        manager.step(state)
        with pytest.warns(UserWarning, match="cannot start the validation process"):
            manager.wait_validation()
        assert [r.valid for r in manager.checkpoints()] == [False]
    rows = json.loads(cli("ls", run, "--json").stdout)
    assert rows[0]["validation"]["passed"] is False
    (run / ".ckptvault-index.json").unlink()  # derived data: documented as rebuilt when lost
    with cv.CheckpointManager(run, validate="checksum") as reopened:
        assert [r.valid for r in reopened.checkpoints()] == [False]
        # The bytes verify; only the (crashed) validation failed: restore refuses a silent fresh
        # start (issue 13) and says how to load it anyway.
        with (
            pytest.warns(UserWarning, match="step_00000001"),
            pytest.raises(RestoreRefusedError, match="which=1"),
        ):
            reopened.restore(make_state(seed=3))


def test_retention_keeps_a_valid_checkpoint_until_the_next_one_passes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    state = make_state()
    with cv.CheckpointManager(run, validate="full", keep_last=1, every_n_steps=1) as manager:
        manager.step(state)
        manager.wait_validation()
        assert manager.validation_result("step_00000001")["passed"] is True
        train_step(state)
        with serialization_bug("weight"):
            manager.step(state)
        with pytest.warns(UserWarning, match="step_00000002 failed full validation"):
            manager.wait_validation()
        restored = manager.restore(make_state(seed=3))
        assert restored is not None and restored.step == 1


def test_full_validation_passes_with_an_unaligned_probe_view(ckpt_dir: Path) -> None:
    model = trained_mlp(SIZES, seed=0)
    flat = torch.randn(25, generator=torch.Generator().manual_seed(5))
    probe = flat[1:].view(6, SIZES[0])  # contiguous, 4 bytes past an aligned allocation
    assert probe.data_ptr() % 16 != 0
    cv.save_model(ckpt_dir / "m", model, kwargs=KWARGS, probe=probe, validate="full")
    assert validation.read_result(ckpt_dir / "m")["passed"] is True
