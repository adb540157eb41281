"""Exports checked by their real consumers: safetensors, torch.load(weights_only), a rebuilt model
from an HF directory (single file and shards), onnxruntime; failures typed and never partial."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tests.models_for_export import MLP, TiedLM, TwoHeads
from typer.testing import CliRunner

import ckptvault as cv
import ckptvault.export.hf as ex_hf
import ckptvault.export.onnx_graph as ex_onnx
from ckptvault.cli.main import app
from ckptvault.export import ExportError, ExportMismatchError, export_checkpoint, parse_size, plan_shards

MLP_KWARGS = {"in_features": 4, "hidden": 8, "out_features": 3}
ADDED_CONFIG_KEYS = ("ckptvault_factory", "torch_dtype")


def trained_mlp() -> MLP:
    torch.manual_seed(0)
    model = MLP(**MLP_KWARGS)
    model.train()
    model(torch.randn(16, 4))  # moves the batch-norm statistics away from their defaults
    return model.eval()


@pytest.fixture
def mlp_ckpt(ckpt_dir: Path) -> tuple[Path, MLP]:
    model = trained_mlp()
    cv.save_model(ckpt_dir / "mlp", model, kwargs=MLP_KWARGS, probe=torch.randn(5, 4))
    return ckpt_dir / "mlp", model


@pytest.fixture
def plain_ckpt(ckpt_dir: Path) -> Path:
    """A checkpoint with a "model" dict but no recorded architecture."""
    cv.save(ckpt_dir / "plain", {"model": trained_mlp().state_dict(), "step": 3})
    return ckpt_dir / "plain"


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want) or set(got) == set(want), (sorted(got), sorted(want))
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def rebuild_from_hf(directory: Path, cls: type[torch.nn.Module], weights: dict[str, torch.Tensor]) -> Any:
    config = json.loads((directory / "config.json").read_text())
    model = cls(**{k: v for k, v in config.items() if k not in ADDED_CONFIG_KEYS})
    model.load_state_dict(weights, strict=True)
    return model.eval()


# -- safetensors and torch --------------------------------------------------------------------------
def test_safetensors_export_holds_the_state_dict(mlp_ckpt: tuple[Path, MLP], tmp_path: Path) -> None:
    ckpt, model = mlp_ckpt
    result = export_checkpoint(ckpt, tmp_path / "m.safetensors", format="safetensors")
    flat = load_file(str(tmp_path / "m.safetensors"))
    assert_same_state({k.removeprefix("model."): v for k, v in flat.items()}, model.state_dict())
    assert result.num_tensors == len(model.state_dict())


def test_torch_export_loads_with_weights_only(mlp_ckpt: tuple[Path, MLP], tmp_path: Path) -> None:
    ckpt, model = mlp_ckpt
    result = export_checkpoint(ckpt, tmp_path / "m.pt", format="torch")
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert list(state) == list(model.state_dict())
    assert_same_state(state, model.state_dict())
    fresh = MLP(**MLP_KWARGS).eval()
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(3, 4)
    assert torch.equal(fresh(x), model(x))
    assert result.source == "architecture weights ['model']" and leftovers(tmp_path) == []


def test_torch_export_keeps_tied_weights_tied(ckpt_dir: Path, tmp_path: Path) -> None:
    model = TiedLM()
    cv.save_model(ckpt_dir / "lm", model, kwargs={})
    export_checkpoint(ckpt_dir / "lm", tmp_path / "lm.pt", format="torch")
    state = torch.load(tmp_path / "lm.pt", weights_only=True)
    assert_same_state(state, model.state_dict())
    assert state["embed.weight"].data_ptr() == state["head.weight"].data_ptr()


def test_torch_export_follows_the_recorded_weights_path(ckpt_dir: Path, tmp_path: Path) -> None:
    model = trained_mlp()
    architecture = {
        "factory": "tests.models_for_export:MLP",
        "kwargs": MLP_KWARGS,
        "weights": ["model", "net"],
    }
    other = {"w": torch.ones(2)}
    cv.save(
        ckpt_dir / "ts",
        {"model": {"net": model.state_dict(), "ema": other}},
        metadata={"architecture": architecture},
    )
    export_checkpoint(ckpt_dir / "ts", tmp_path / "ts.pt", format="torch")
    assert_same_state(torch.load(tmp_path / "ts.pt", weights_only=True), model.state_dict())  # fmt: skip


def test_torch_export_finds_the_model_dict_without_architecture(ckpt_dir: Path, tmp_path: Path) -> None:
    model = trained_mlp()
    cv.save(ckpt_dir / "top", {"model": model.state_dict(), "optimizer": {"lr": torch.tensor(0.1)}})
    result = export_checkpoint(ckpt_dir / "top", tmp_path / "top.pt", format="torch")
    assert result.source == "tree['model']"
    assert_same_state(torch.load(tmp_path / "top.pt", weights_only=True), model.state_dict())
    # The TrainState layout: tree["model"]["model"].
    cv.save(ckpt_dir / "trainstate", {"model": {"model": model.state_dict()}, "rng": {"seed": 1}})
    result = export_checkpoint(ckpt_dir / "trainstate", tmp_path / "ts.pt", format="torch")
    assert result.source == "tree['model']['model']"
    assert_same_state(torch.load(tmp_path / "ts.pt", weights_only=True), model.state_dict())


def test_torch_export_of_other_trees_uses_dotted_leaf_paths(ckpt_dir: Path, tmp_path: Path) -> None:
    state = {
        "encoder": {"w": torch.randn(3, 2), "layers": [torch.ones(2), torch.zeros(1, dtype=torch.int64)]},
        "stats": np.arange(4, dtype=np.float32),
        "names": np.array(["a", "bc"]),  # torch has no string tensors: left out, and said so
        "step": 7,
    }
    cv.save(ckpt_dir / "tree", state)
    result = export_checkpoint(ckpt_dir / "tree", tmp_path / "tree.pt", format="torch")
    back = torch.load(tmp_path / "tree.pt", weights_only=True)
    assert sorted(back) == ["encoder.layers.0", "encoder.layers.1", "encoder.w", "stats"]
    assert torch.equal(back["encoder.w"], state["encoder"]["w"])
    assert torch.equal(back["encoder.layers.1"], state["encoder"]["layers"][1])
    assert np.array_equal(back["stats"].numpy(), state["stats"])
    assert "names" in result.source


# -- Hugging Face -------------------------------------------------------------------------------------
def test_hf_export_rebuilds_the_model(mlp_ckpt: tuple[Path, MLP], tmp_path: Path) -> None:
    ckpt, model = mlp_ckpt
    out = tmp_path / "hf"
    result = export_checkpoint(ckpt, out, format="hf")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"] == list(result.files)
    config = json.loads((out / "config.json").read_text())
    assert config == {
        **MLP_KWARGS,
        "ckptvault_factory": "tests.models_for_export:MLP",
        "torch_dtype": "float32",
    }
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    weights = load_file(str(out / "model.safetensors"))
    assert_same_state(weights, model.state_dict())
    rebuilt = rebuild_from_hf(out, MLP, weights)
    x = torch.randn(6, 4)
    assert torch.equal(rebuilt(x), model(x))
    assert leftovers(tmp_path) == []


def test_hf_export_shards_like_transformers(mlp_ckpt: tuple[Path, MLP], tmp_path: Path) -> None:
    ckpt, model = mlp_ckpt
    out = tmp_path / "hf"
    limit = 140  # bytes: fc1.weight (128) alone, the vectors, the rest, and fc2.bias: 4 shards
    export_checkpoint(ckpt, out, format="hf", max_shard_size=f"{limit}B")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    state = model.state_dict()
    sizes = {k: t.numel() * t.element_size() for k, t in state.items()}
    assert index["metadata"] == {"total_size": sum(sizes.values())}
    assert set(index["weight_map"]) == set(state)
    shards = sorted(set(index["weight_map"].values()))
    count = len(shards)
    assert count == 4 and shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert sorted(os.listdir(out)) == sorted(["config.json", "model.safetensors.index.json", *shards])
    union: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = load_file(str(out / shard))
        assert set(part) == {k for k, f in index["weight_map"].items() if f == shard}
        assert sum(sizes[k] for k in part) <= limit or len(part) == 1
        union.update(part)
    assert_same_state(union, state)
    x = torch.randn(2, 4)
    assert torch.equal(rebuild_from_hf(out, MLP, union)(x), model(x))


def test_shard_plan_follows_the_huggingface_rule() -> None:
    sizes = {"a": 4, "b": 4, "big": 20, "c": 6, "d": 1}
    # "big" exceeds the limit: a shard of its own, while the current shard goes on after it.
    assert plan_shards(sizes, 10) == [["big"], ["a", "b"], ["c", "d"]]
    assert plan_shards(sizes, 100) == [["a", "b", "big", "c", "d"]]
    assert plan_shards({}, 10) == [[]]


def test_hf_export_clones_tied_tensors(ckpt_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = TiedLM(vocab=13, dim=4).eval()
    cv.save_model(ckpt_dir / "lm", model, kwargs={"vocab": 13, "dim": 4})
    export_checkpoint(ckpt_dir / "lm", tmp_path / "hf", format="hf")
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert torch.equal(weights["embed.weight"], weights["head.weight"])
    rebuilt = rebuild_from_hf(tmp_path / "hf", TiedLM, weights)
    assert rebuilt.head.weight is rebuilt.embed.weight  # the class ties them again
    tokens = torch.randint(0, 13, (2, 5))
    assert torch.equal(rebuilt(tokens), model(tokens))


def test_hf_export_records_the_weights_dtype(ckpt_dir: Path, tmp_path: Path) -> None:
    model = MLP(**MLP_KWARGS).to(torch.bfloat16).eval()
    cv.save_model(ckpt_dir / "bf16", model, kwargs=MLP_KWARGS)
    export_checkpoint(ckpt_dir / "bf16", tmp_path / "hf", format="hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert_same_state(load_file(str(tmp_path / "hf" / "model.safetensors")), model.state_dict())


def test_hf_and_onnx_need_a_recorded_architecture(plain_ckpt: Path, tmp_path: Path) -> None:
    for fmt in ("hf", "onnx"):
        out = tmp_path / f"out-{fmt}"
        with pytest.raises(ExportError, match="needs the model's recorded architecture") as info:
            export_checkpoint(plain_ckpt, out, format=fmt)
        assert "save_model" in str(info.value) and "--format torch" in str(info.value)
        assert not out.exists()
    assert leftovers(tmp_path) == []


def test_hf_export_replaces_only_an_earlier_export(mlp_ckpt: tuple[Path, MLP], tmp_path: Path) -> None:
    ckpt, _ = mlp_ckpt
    out = tmp_path / "hf"
    export_checkpoint(ckpt, out, format="hf", max_shard_size=140)
    with pytest.raises(ExportError, match="exists"):
        export_checkpoint(ckpt, out, format="hf")
    export_checkpoint(ckpt, out, format="hf", overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]  # no stale shards
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an earlier export"):
        export_checkpoint(ckpt, foreign, format="hf", overwrite=True)
    assert (foreign / "todo.txt").read_text() == "keep me"
    assert leftovers(tmp_path) == []


def test_failures_never_leave_a_partial_output(
    mlp_ckpt: tuple[Path, MLP], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt, _ = mlp_ckpt
    real_write = ex_hf._write_safetensors
    calls: list[Path] = []

    def disk_full_on_second_shard(path: Path, *args: Any) -> int:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_write(path, *args)

    monkeypatch.setattr(ex_hf, "_write_safetensors", disk_full_on_second_shard)
    with pytest.raises(cv.StorageError, match="No space left"):
        export_checkpoint(ckpt, tmp_path / "hf", format="hf", max_shard_size=140)
    assert not (tmp_path / "hf").exists() and leftovers(tmp_path) == []

    def failing_save(obj: Any, handle: Any) -> None:
        handle.write(b"partial")
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(torch, "save", failing_save)
    (tmp_path / "m.pt").write_bytes(b"the previous export")
    with pytest.raises(cv.StorageError, match="Input/output error"):
        export_checkpoint(ckpt, tmp_path / "m.pt", format="torch")
    assert (tmp_path / "m.pt").read_bytes() == b"the previous export" and leftovers(tmp_path) == []


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(" 1.5 kb ") == 1500
    assert parse_size("1000") == parse_size(1000) == 1000
    for bad in ("", "5XB", "-1GB", "0", "GB"):
        with pytest.raises(ValueError):
            parse_size(bad)


# -- ONNX -------------------------------------------------------------------------------------------
def ort_run(path: Path, *inputs: torch.Tensor) -> list[np.ndarray]:
    ort = pytest.importorskip(
        "onnxruntime", reason="onnxruntime is not installed (pip install 'ckptvault[onnx]')"
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {arg.name: t.numpy() for arg, t in zip(session.get_inputs(), inputs, strict=True)}
    return list(session.run(None, feed))


@pytest.fixture
def onnx_installed() -> None:
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'ckptvault[onnx]')")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'ckptvault[onnx]')")


@pytest.mark.usefixtures("onnx_installed")
def test_onnx_export_matches_the_model_on_the_probe(mlp_ckpt: tuple[Path, MLP], tmp_path: Path) -> None:
    ckpt, model = mlp_ckpt
    result = export_checkpoint(ckpt, tmp_path / "m.onnx", format="onnx")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-5
    with cv.open(ckpt) as view:
        probe = load_file_bytes(view, "validation-probe.safetensors")["input.0"]
    with torch.no_grad():
        for x in (probe, torch.randn(9, 4)):  # the batch dimension stays dynamic
            (got,) = ort_run(tmp_path / "m.onnx", x)
            np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-5)
    assert leftovers(tmp_path) == []


def load_file_bytes(view: Any, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    from ckptvault.engine.reader import CheckpointReader
    from ckptvault.storage.local import LocalStorage

    with CheckpointReader(LocalStorage(), view.path) as reader:
        return load(reader.read_file(name))


@pytest.mark.usefixtures("onnx_installed")
def test_onnx_export_of_several_inputs_and_dict_outputs(ckpt_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = TwoHeads(dim=5).eval()
    x, y = torch.randn(3, 5), torch.randn(3, 5)
    cv.save_model(ckpt_dir / "two", model, kwargs={"dim": 5}, probe=(x, y))
    export_checkpoint(ckpt_dir / "two", tmp_path / "two.onnx", format="onnx")
    with torch.no_grad():
        want = model(x, y)
    got = ort_run(tmp_path / "two.onnx", x, y)
    for a, b in zip(got, want.values(), strict=True):  # outputs in the model's own order
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("onnx_installed")
def test_onnx_export_takes_a_probe_file(ckpt_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = TiedLM().eval()
    cv.save_model(ckpt_dir / "lm", model, kwargs={})  # no probe stored
    with pytest.raises(ExportError, match="--probe"):
        export_checkpoint(ckpt_dir / "lm", tmp_path / "lm.onnx", format="onnx")
    tokens = torch.randint(0, 11, (2, 7))
    save_file({"input.0": tokens}, str(tmp_path / "probe.safetensors"))
    export_checkpoint(
        ckpt_dir / "lm", tmp_path / "lm.onnx", format="onnx", probe=tmp_path / "probe.safetensors"
    )
    (got,) = ort_run(tmp_path / "lm.onnx", tokens)
    with torch.no_grad():
        np.testing.assert_allclose(got, model(tokens).numpy(), rtol=1e-4, atol=1e-5)
    # A probe whose recorded output the checkpoint's model does not reproduce is refused.
    save_file({"input.0": tokens, "expected.0": torch.zeros(2, 7, 11)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ExportError, match="does not reproduce"):
        export_checkpoint(
            ckpt_dir / "lm", tmp_path / "x.onnx", format="onnx", probe=tmp_path / "wrong.safetensors"
        )
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.usefixtures("onnx_installed")
def test_onnx_mismatch_is_typed_and_writes_nothing(
    mlp_ckpt: tuple[Path, MLP], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt, _ = mlp_ckpt
    real_export = ex_onnx._run_exporter

    def export_a_different_model(model: Any, *args: Any) -> str:
        with torch.no_grad():
            model.fc2.bias += 0.01  # the graph no longer computes what the checkpoint's model does
        return real_export(model, *args)

    monkeypatch.setattr(ex_onnx, "_run_exporter", export_a_different_model)
    with pytest.raises(ExportMismatchError, match="differs from the torch model") as info:
        export_checkpoint(ckpt, tmp_path / "m.onnx", format="onnx")
    assert info.value.max_abs_diff == pytest.approx(0.01, rel=1e-3)
    assert not (tmp_path / "m.onnx").exists() and leftovers(tmp_path) == []


@pytest.mark.usefixtures("onnx_installed")
def test_onnx_exporter_failure_is_typed_and_writes_nothing(
    mlp_ckpt: tuple[Path, MLP], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(*args: Any, **kwargs: Any) -> None:
        Path(args[2]).write_bytes(b"half a graph")
        raise RuntimeError("simulated unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    with pytest.raises(ExportError, match="TorchScript-based exporter: RuntimeError: simulated") as info:
        export_checkpoint(mlp_ckpt[0], tmp_path / "m.onnx", format="onnx")
    assert "torch.export-based exporter" in str(info.value)  # tried too, or said why not
    assert not (tmp_path / "m.onnx").exists() and leftovers(tmp_path) == []


def test_onnx_without_the_extra_names_the_install(
    mlp_ckpt: tuple[Path, MLP], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ExportError, match=r"pip install 'ckptvault\[onnx\]'"):
        export_checkpoint(mlp_ckpt[0], tmp_path / "m.onnx", format="onnx")
    result = CliRunner().invoke(
        app, ["export", str(mlp_ckpt[0]), str(tmp_path / "m.onnx"), "--format", "onnx"]
    )
    assert result.exit_code == 1 and "pip install 'ckptvault[onnx]'" in result.output
    assert not (tmp_path / "m.onnx").exists()


# -- the command ------------------------------------------------------------------------------------
def test_cli_exports_every_format(mlp_ckpt: tuple[Path, MLP], tmp_path: Path) -> None:
    ckpt, model = mlp_ckpt
    runner = CliRunner()
    formats = ["safetensors", "torch", "hf"]
    if all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")):
        formats.append("onnx")
    for fmt in formats:
        out = tmp_path / f"out-{fmt}"
        result = runner.invoke(app, ["export", str(ckpt), str(out), "--format", fmt])
        assert result.exit_code == 0, result.output
        assert out.exists() and "wrote" in result.output
    doc = json.loads(
        runner.invoke(
            app,
            [
                "export",
                str(ckpt),
                str(tmp_path / "j"),
                "--format",
                "hf",
                "--max-shard-size",
                "140B",
                "--json",
            ],
        ).output
    )
    assert doc["format"] == "hf" and "model.safetensors.index.json" in doc["files"]
    assert doc["num_tensors"] == len(model.state_dict())


def test_cli_errors_exit_non_zero(mlp_ckpt: tuple[Path, MLP], plain_ckpt: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    ckpt, _ = mlp_ckpt
    cases = [
        (["export", str(ckpt), str(tmp_path / "o"), "--format", "keras"], 2, "unknown export format"),
        (["export", str(ckpt), str(tmp_path / "o"), "--format", "hf", "--max-shard-size", "lots"], 2, "size"),
        (["export", str(ckpt), str(tmp_path / "o"), "--format", "torch", "--probe", "p"], 2, "--probe"),
        (["export", str(plain_ckpt), str(tmp_path / "o"), "--format", "hf"], 1, "recorded architecture"),
        (["export", str(tmp_path / "missing"), str(tmp_path / "o")], 1, "CheckpointNotFoundError"),
    ]
    for args, code, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == code, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
        assert not (tmp_path / "o").exists()
