"""The functional API's contract: commit, overwrite, sidecar, metadata, lazy reads, export/import."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tests.helpers import assert_exact

import ckptvault as cv
from ckptvault.api import storage_for
from ckptvault.engine.inspect import diff_checkpoints, export_safetensors
from ckptvault.legacy import import_legacy


def test_public_surface_is_pinned() -> None:
    assert set(cv.__all__) == {
        "ArchitectureError", "ModelMismatchError", "ValidationFailedError", "ValidationResult",
        "load_model", "load_program", "model_factory", "save_model", "validate",
        "CheckpointError", "CheckpointExistsError", "CheckpointInfo", "CheckpointManager",
        "CheckpointNotFoundError", "ConcurrentWriteError", "CorruptCheckpointError", "DocumentConflictError",
        "IncompatibleCheckpointError", "IncompleteStateError", "PendingSave", "Problem", "Scope",
        "MirrorBehindError", "ResourceLimitError", "RestoreRefusedError",
        "CatalogError", "DamagedRunFileError", "ExportError", "ExportMismatchError", "QueryError",
        "RegistryError", "ReplacedCheckpointError", "ReportError", "UnsafeFileError",
        "StagingBudgetError", "StorageError", "DistributedCheckpointError",
        "TrainState", "UnsafeCheckpointError", "UnsafeLegacyFileError", "UnsupportedStateError",
        "VerifyReport", "__version__", "fingerprint", "info", "list_checkpoints", "load", "open",
        "save", "save_async", "verify",
    }  # fmt: skip
    for name in cv.__all__:
        value = getattr(cv, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert issubclass(value, cv.CheckpointError) and issubclass(value, Exception)


def test_layout_and_sidecar(ckpt_dir: Path) -> None:
    metadata = {"run_id": "run-1", "config": {"lr": 0.1, "layers": (2, 3)}, "metrics": {"loss": float("nan")},
                "data_version": "dvc:abc", "note": "hello"}  # fmt: skip
    info = cv.save(ckpt_dir / "step_120", {"w": torch.ones(2)}, metadata=metadata)
    assert info.step == 120
    names = sorted(os.listdir(ckpt_dir / "step_120"))
    assert names == ["checkpoint_00000120.meta.json", "data-00000.safetensors", "manifest.json"]
    sidecar = json.loads((ckpt_dir / "step_120" / "checkpoint_00000120.meta.json").read_text())
    assert sidecar["run_id"] == "run-1" and sidecar["data_version"] == "dvc:abc"
    assert sidecar["config"] == {"lr": 0.1, "layers": [2, 3]}
    assert sidecar["metrics"] == {"loss": "nan"}  # plain JSON for people; exact value in the manifest
    assert sidecar["user"] == {"note": "hello"}
    assert {"python", "numpy", "torch", "cpu", "hostname"} <= set(sidecar["system"])
    assert sidecar["checkpoint_id"] == info.checkpoint_id
    exact = cv.info(ckpt_dir / "step_120").metadata
    assert exact["config"]["layers"] == (2, 3) and np.isnan(exact["metrics"]["loss"])


def test_metadata_step_wins_over_the_name(ckpt_dir: Path) -> None:
    assert cv.save(ckpt_dir / "step_5", {}, metadata={"step": 9}).step == 9
    assert cv.save(ckpt_dir / "final", {}).step == 0


def test_existing_checkpoint_is_never_replaced_silently(ckpt_dir: Path) -> None:
    cv.save(ckpt_dir / "c", {"v": 1})
    with pytest.raises(cv.CheckpointExistsError):
        cv.save(ckpt_dir / "c", {"v": 2})
    assert cv.load(ckpt_dir / "c") == {"v": 1}
    cv.save(ckpt_dir / "c", {"v": 3}, overwrite=True)
    assert cv.load(ckpt_dir / "c") == {"v": 3}
    assert [p for p in os.listdir(ckpt_dir) if p.startswith(".")] == []  # old copy removed


def test_foreign_directories_are_not_touched(ckpt_dir: Path) -> None:
    (ckpt_dir / "notes").mkdir()
    (ckpt_dir / "notes" / "todo.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(cv.CheckpointExistsError):
            cv.save(ckpt_dir / "notes", {"v": 1}, overwrite=overwrite)
    assert (ckpt_dir / "notes" / "todo.txt").read_text() == "keep me"
    (ckpt_dir / "empty").mkdir()
    cv.save(ckpt_dir / "empty", {"v": 1})  # an empty directory is not a checkpoint: fine to fill
    assert cv.load(ckpt_dir / "empty") == {"v": 1}


def test_dead_writers_leftovers_are_swept_and_never_loaded(ckpt_dir: Path) -> None:
    from ckptvault.storage.local import HOST_TAG, STAGING_MARK

    leftover = ckpt_dir / f".step_1{STAGING_MARK}{HOST_TAG}.999999999.abcd1234"
    leftover.mkdir()
    (leftover / "data-00000.safetensors").write_bytes(b"partial")
    assert cv.list_checkpoints(ckpt_dir) == []
    with pytest.raises(cv.CheckpointNotFoundError):
        cv.load(leftover)
    cv.save(ckpt_dir / "step_2", {"v": 2})
    assert not leftover.exists()
    assert cv.list_checkpoints(ckpt_dir) == [str(ckpt_dir / "step_2")]


def test_missing_checkpoint_is_a_typed_error(ckpt_dir: Path) -> None:
    with pytest.raises(cv.CheckpointNotFoundError):
        cv.load(ckpt_dir / "nope")
    report = cv.verify(ckpt_dir / "nope")
    assert not report.ok and report.problems[0].kind == "CheckpointNotFoundError"


def test_lazy_open_reads_only_what_is_asked(ckpt_dir: Path) -> None:
    state = {"model": {"a": torch.randn(1000), "b": torch.randn(1000)}, "step": 7, "extra": [1, 2]}
    cv.save(ckpt_dir / "l", state)
    manifest = json.loads((ckpt_dir / "l" / "manifest.json").read_text())
    entry = manifest["tensors"]["model.b"]
    data = ckpt_dir / "l" / "data-00000.safetensors"
    header = int.from_bytes(data.read_bytes()[:8], "little")
    with data.open("r+b") as handle:  # damage b only
        handle.seek(8 + header + entry["offsets"][0])
        handle.write(b"\xff\xff\xff\xff")
    with cv.open(ckpt_dir / "l") as ck:
        assert ck.keys() == ["model", "step", "extra"]
        assert torch.equal(ck["model"]["a"], state["model"]["a"])  # untouched tensor reads fine
        assert ck["step"] == 7 and ck["extra"].load() == [1, 2] and len(ck["extra"]) == 2
        with pytest.raises(cv.CorruptCheckpointError) as caught:
            ck["model"]["b"]
        assert caught.value.tensor == "model.b" and caught.value.kind == "digest-mismatch"
        assert ck.info.step == 0 and ck.info.num_tensors == 2


def test_map_location_and_original_device(ckpt_dir: Path) -> None:
    """Every form of ``map_location`` has an observable effect: "meta" differs from the default
    ("cpu") on any machine, so a loader that ignored the argument would fail here."""
    state = {"t": torch.ones(2), "i": torch.arange(3, dtype=torch.int16), "shared": None}
    state["shared"] = state["t"]
    cv.save(ckpt_dir / "m", state)
    assert cv.load(ckpt_dir / "m", map_location="cpu")["t"].device.type == "cpu"
    assert cv.load(ckpt_dir / "m", map_location=None)["t"].device.type == "cpu"  # saved on the CPU
    assert cv.load(ckpt_dir / "m", map_location=torch.device("cpu"))["t"].device.type == "cpu"
    for location in ("meta", torch.device("meta"), {"cpu": "meta"}):
        for mmap in (True, False):
            back = cv.load(ckpt_dir / "m", map_location=location, mmap=mmap)
            assert {k: v.device.type for k, v in back.items()} == {"t": "meta", "i": "meta", "shared": "meta"}
            assert back["i"].dtype == torch.int16 and tuple(back["t"].shape) == (2,)
    unmapped = cv.load(ckpt_dir / "m", map_location={"cuda:0": "meta"})  # no entry for "cpu": stays
    assert unmapped["t"].device.type == "cpu" and torch.equal(unmapped["t"], torch.ones(2))
    with cv.open(ckpt_dir / "m", map_location="meta") as view:
        assert view["t"].device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_map_location_none_keeps_the_saved_device(ckpt_dir: Path) -> None:
    cv.save(ckpt_dir / "g", {"t": torch.ones(2, device="cuda")})
    assert cv.load(ckpt_dir / "g", map_location=None)["t"].device.type == "cuda"
    assert cv.load(ckpt_dir / "g")["t"].device.type == "cpu"  # the default maps to the CPU
    assert cv.load(ckpt_dir / "g", map_location={"cuda:0": "cpu"})["t"].device.type == "cpu"


def test_sha256_checkpoints_verify(ckpt_dir: Path) -> None:
    info = cv.save(ckpt_dir / "s", {"t": torch.ones(3)}, digest="sha256")
    assert info.digest_algorithm == "sha256"
    assert cv.verify(ckpt_dir / "s").ok
    assert torch.equal(cv.load(ckpt_dir / "s")["t"], torch.ones(3))


def test_export_is_a_standalone_safetensors_file(ckpt_dir: Path, tmp_path: Path) -> None:
    state = {"model": {"w": torch.randn(4, 4), "b": torch.randn(4).to(torch.bfloat16)}}
    cv.save(ckpt_dir / "e", state)
    storage, target = storage_for(ckpt_dir / "e")
    export_safetensors(storage, target, str(tmp_path / "out.safetensors"))
    flat = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(flat["model.w"], state["model"]["w"]) and torch.equal(
        flat["model.b"], state["model"]["b"]
    )


def test_diff_reports_identical_changed_added_removed(ckpt_dir: Path) -> None:
    a = {"w": torch.zeros(3), "same": torch.ones(2), "gone": torch.ones(1)}
    b = {"w": torch.tensor([0.0, 0.5, 0.0]), "same": torch.ones(2), "new": torch.ones(1)}
    cv.save(ckpt_dir / "a", a)
    cv.save(ckpt_dir / "b", b)
    storage, _ = storage_for(ckpt_dir)
    rows = {r.path: r for r in diff_checkpoints(storage, str(ckpt_dir / "a"), str(ckpt_dir / "b"))}
    assert rows["same"].status == "identical"
    assert rows["w"].status == "changed" and rows["w"].max_abs == pytest.approx(0.5)
    assert rows["gone"].status == "removed" and rows["new"].status == "added"


def test_import_legacy_torch_file(ckpt_dir: Path, tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    torch.save({"model": model.state_dict(), "epoch": 4}, tmp_path / "old.pt")
    import_legacy(tmp_path / "old.pt", ckpt_dir / "imported")
    back = cv.load(ckpt_dir / "imported")
    assert back["epoch"] == 4
    assert_exact(dict(model.state_dict()), dict(back["model"]))


class Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned-by-pickle",))


def test_import_refuses_malicious_pickle_and_names_globals(ckpt_dir: Path, tmp_path: Path) -> None:
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    os.chdir(tmp_path)
    with pytest.raises(cv.UnsafeLegacyFileError) as caught:
        import_legacy(tmp_path / "evil.pt", ckpt_dir / "evil")
    assert "system" in str(caught.value)  # posix.system / os.system named
    assert not (tmp_path / "pwned-by-pickle").exists()
    assert not (ckpt_dir / "evil").exists()


def test_every_checkpoint_error_is_drawn_in_the_errors_tree() -> None:
    """errors.py's module docstring is where a user learns what to catch: every subclass counts."""
    import importlib
    import pkgutil

    import ckptvault.errors

    for module in pkgutil.walk_packages(cv.__path__, "ckptvault."):
        if not module.name.startswith(("ckptvault.integrations", "ckptvault.testing")):
            importlib.import_module(module.name)
    pending, seen = [cv.CheckpointError], set()
    while pending:
        cls = pending.pop()
        for sub in cls.__subclasses__():
            if sub.__module__.startswith("ckptvault.") and sub not in seen:
                seen.add(sub)
                pending.append(sub)
    missing = sorted(c.__name__ for c in seen if c.__name__ not in (ckptvault.errors.__doc__ or ""))
    assert not missing, f"not drawn in errors.py: {missing}"
