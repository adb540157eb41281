"""Architecture capture: factory references are inferred, checked at save time and resolved safely;
load_model rebuilds the model or says exactly why the weights do not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.models_for_validation import MLP, DeclaredMLP, make_mlp, output_of, trained_mlp
from torch import nn

import ckptvault as cv
from ckptvault.training.architecture import ModelSpec, resolve, spec_for

MODULE = "tests.models_for_validation"
SIZES = [4, 8, 3]


# -- spec_for: inferring and checking the reference ------------------------------------------------
def test_spec_for_infers_module_class_from_model_kwargs() -> None:
    spec = spec_for(MLP(SIZES), None, {"sizes": SIZES}, ("model",))
    assert spec == ModelSpec(f"{MODULE}:MLP", {"sizes": SIZES}, ("model",))
    assert spec.to_metadata() == {
        "factory": f"{MODULE}:MLP",
        "kwargs": {"sizes": SIZES},
        "weights": ["model"],
    }


def test_spec_for_uses_the_ckptvault_kwargs_attribute() -> None:
    spec = spec_for(DeclaredMLP(SIZES), None, None, ("model", "net"))
    assert spec.factory == f"{MODULE}:DeclaredMLP"
    assert spec.kwargs == {"sizes": SIZES}
    assert spec.weights == ("model", "net")


def test_spec_for_needs_kwargs_to_infer_the_factory() -> None:
    with pytest.raises(cv.ArchitectureError, match="model_kwargs"):
        spec_for(MLP(SIZES), None, None, ("model",))


def test_spec_for_refuses_a_class_defined_in_main() -> None:
    scripted = type("ScriptNet", (nn.Linear,), {"__module__": "__main__"})
    with pytest.raises(cv.ArchitectureError, match="__main__"):
        spec_for(scripted(2, 2), None, {"in_features": 2, "out_features": 2}, ("model",))


def test_spec_for_refuses_a_class_defined_inside_a_function() -> None:
    class Local(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

    assert "<locals>" in Local.__qualname__
    with pytest.raises(cv.ArchitectureError, match="module level"):
        spec_for(Local(), None, {}, ("model",))
    # TrainState checks it when the run starts, not when the checkpoint is needed
    with pytest.raises(cv.ArchitectureError, match="module level"):
        cv.TrainState(Local(), model_kwargs={})


@pytest.mark.parametrize("bad", [{"sizes": object()}, {"sizes": {4, 8}}, {"eps": float("nan")}, {"b": b"x"}])
def test_spec_for_refuses_non_json_kwargs(bad: dict) -> None:
    with pytest.raises(cv.ArchitectureError, match="JSON"):
        spec_for(MLP(SIZES), None, bad, ("model",))


def test_spec_for_refuses_kwargs_that_load_model_would_refuse(ckpt_dir: Path) -> None:
    with pytest.raises(cv.ArchitectureError):
        cv.save_model(ckpt_dir / "k", MLP(SIZES), kwargs={"sizes": SIZES, 1: 2})


def test_spec_for_checks_an_explicit_factory() -> None:
    assert spec_for(MLP(SIZES), f"{MODULE}:make_mlp", {"sizes": SIZES}, ("model",)).factory == (
        f"{MODULE}:make_mlp"
    )
    assert spec_for(MLP(SIZES), make_mlp, {"sizes": SIZES}, ("model",)).factory == f"{MODULE}:make_mlp"
    with pytest.raises(cv.ArchitectureError, match="does not build"):
        spec_for(MLP(SIZES), "torch.nn:Linear", {"in_features": 4, "out_features": 3}, ("model",))
    with pytest.raises(cv.ArchitectureError, match="refusing"):
        spec_for(MLP(SIZES), f"{MODULE}:unmarked_factory", {"sizes": SIZES}, ("model",))
    with pytest.raises(cv.ArchitectureError, match="cannot import"):
        spec_for(MLP(SIZES), f"{MODULE}:NoSuchModel", {"sizes": SIZES}, ("model",))


# -- resolve: what a checkpoint may name -----------------------------------------------------------
@pytest.mark.parametrize("reference", ["os:system", "subprocess:run", "builtins:eval", "builtins:exec"])
def test_resolve_refuses_arbitrary_callables(reference: str) -> None:
    with pytest.raises(cv.ArchitectureError, match="refusing to call"):
        resolve(reference)


@pytest.mark.parametrize(
    "reference", ["torch.nn:Module.__subclasses__", "os:__builtins__", f"{MODULE}:MLP.__init__"]
)
def test_resolve_refuses_dunder_paths(reference: str) -> None:
    with pytest.raises(cv.ArchitectureError, match="dunder"):
        resolve(reference)


@pytest.mark.parametrize(
    "reference", ["os.system", "a:b:c", "", "os:", ":system", "1os:x", "os:system()", "os :system", "x" * 600]
)
def test_resolve_refuses_malformed_references(reference: str) -> None:
    with pytest.raises(cv.ArchitectureError, match="bad factory reference"):
        resolve(reference)


def test_resolve_refuses_an_unmarked_function_and_a_missing_module() -> None:
    with pytest.raises(cv.ArchitectureError, match="refusing to call"):
        resolve(f"{MODULE}:unmarked_factory")
    with pytest.raises(cv.ArchitectureError, match="cannot import"):
        resolve("ckptvault_no_such_module_xyz:Net")


def test_resolve_allowed_modules() -> None:
    with pytest.raises(cv.ArchitectureError, match="allowed_modules"):
        resolve("torch.nn:Linear", allowed_modules=["tests"])
    # a prefix of the name is not a parent package
    with pytest.raises(cv.ArchitectureError, match="allowed_modules"):
        resolve(f"{MODULE}:MLP", allowed_modules=["tests.models"])
    assert resolve(f"{MODULE}:MLP", allowed_modules=["tests"]) is MLP
    assert resolve(f"{MODULE}:MLP", allowed_modules=[MODULE]) is MLP
    # refused by allowed_modules before anything is imported or looked up
    with pytest.raises(cv.ArchitectureError, match="allowed_modules"):
        resolve("ckptvault_no_such_module_xyz:Net", allowed_modules=["tests"])


def test_resolve_accepts_module_classes_and_marked_factories() -> None:
    assert resolve(f"{MODULE}:MLP") is MLP
    assert resolve("torch.nn:Linear") is nn.Linear
    factory = resolve(f"{MODULE}:make_mlp")
    assert factory is make_mlp
    assert isinstance(factory(sizes=SIZES), MLP)


# -- load_model -------------------------------------------------------------------------------------
def test_load_model_round_trip_with_a_marked_factory(ckpt_dir: Path) -> None:
    model = trained_mlp(SIZES)
    cv.save_model(ckpt_dir / "m", model, factory=make_mlp, kwargs={"sizes": SIZES})
    back = cv.load_model(ckpt_dir / "m")
    assert type(back) is MLP and not back.training
    probe = torch.randn(5, 4)
    assert torch.equal(output_of(back, probe), output_of(model, probe))


def test_load_model_allowed_modules(ckpt_dir: Path) -> None:
    cv.save_model(ckpt_dir / "m", MLP(SIZES), kwargs={"sizes": SIZES})
    with pytest.raises(cv.ArchitectureError, match="allowed_modules"):
        cv.load_model(ckpt_dir / "m", allowed_modules=["torch"])
    assert isinstance(cv.load_model(ckpt_dir / "m", allowed_modules=["tests"]), MLP)


def test_load_model_lists_missing_keys_and_shape_mismatches(ckpt_dir: Path) -> None:
    # kwargs that do not describe the saved weights: a wider, deeper model
    cv.save_model(ckpt_dir / "m", trained_mlp(SIZES), kwargs={"sizes": [4, 6, 6, 3]})
    with pytest.raises(cv.ModelMismatchError) as caught:
        cv.load_model(ckpt_dir / "m")
    error = caught.value
    assert error.missing == ["layers.2.bias", "layers.2.weight"]
    assert error.unexpected == []
    assert "layers.0.weight: saved (8, 4) vs model (6, 4)" in error.shapes
    assert "layers.1.weight: saved (3, 8) vs model (6, 6)" in error.shapes
    assert "norm.running_mean: saved (8,) vs model (6,)" in error.shapes
    message = str(error)
    assert "missing keys" in message and "layers.2.weight" in message
    assert "shape mismatches" in message and "layers.0.weight: saved (8, 4)" in message


def test_load_model_lists_unexpected_keys(ckpt_dir: Path) -> None:
    cv.save_model(ckpt_dir / "m", trained_mlp([4, 8, 8, 3]), kwargs={"sizes": SIZES, "bias": False})
    with pytest.raises(cv.ModelMismatchError) as caught:
        cv.load_model(ckpt_dir / "m")
    error = caught.value
    assert error.missing == []
    assert error.unexpected == [
        "layers.0.bias",
        "layers.1.bias",
        "layers.2.bias",
        "layers.2.weight",
    ]
    assert error.shapes == ["layers.1.weight: saved (8, 8) vs model (3, 8)"]
    assert "unexpected keys" in str(error) and "layers.2.weight" in str(error)


def test_load_model_without_architecture(ckpt_dir: Path) -> None:
    cv.save(ckpt_dir / "plain", {"model": MLP(SIZES).state_dict()})
    with pytest.raises(cv.ArchitectureError, match="no model factory"):
        cv.load_model(ckpt_dir / "plain")


def test_load_model_refuses_a_dangerous_recorded_factory(ckpt_dir: Path) -> None:
    # A hand-made checkpoint naming os:system must be refused before anything is called.
    marker = ckpt_dir / "pwned"
    arch = {"factory": "os:system", "kwargs": {"command": f"touch {marker}"}, "weights": ["model"]}
    cv.save(ckpt_dir / "evil", {"model": {}}, metadata={"architecture": arch})
    with pytest.raises(cv.ArchitectureError, match="refusing to call"):
        cv.load_model(ckpt_dir / "evil")
    assert not marker.exists()
