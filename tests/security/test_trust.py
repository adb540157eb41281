"""Class 1 of the hostile-input audit: a checkpoint names code, and naming is not trusting.

A ``module:qualname`` recorded in a checkpoint (its architecture's factory) is imported only when the
running program trusted the module *before* the import: it is imported already, or an explicit
allow-list names it (``trusted_modules=``, ``--trust``, ``CKPTVAULT_TRUSTED_MODULES``). Even a
trusted module is never imported from the current directory or the checkpoint's directories, an
import or build that raises ``SystemExit`` (or any ``BaseException`` but ``KeyboardInterrupt``) is an
``ArchitectureError``, and the model is built on the meta device and compared with the checkpoint
before any real memory is allocated. Every path that rebuilds a model is covered: ``load_model``,
``validate`` (API, CLI, the validation server and one-shot workers, the manager) and ONNX export.

Each module these tests write creates a marker file when it is imported: a marker that appears is
code that ran.
"""

from __future__ import annotations

import json
import secrets
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tests.models_for_validation import MLP
from typer.testing import CliRunner

import ckptvault as cv
from ckptvault import validation
from ckptvault.cli.main import app

PREFIX = "ckv_trust_"
NET = """
import torch


class Net(torch.nn.Linear):
    def __init__(self, in_features: int = 4, out_features: int = 3) -> None:
        super().__init__(in_features, out_features)
"""


@pytest.fixture(autouse=True)
def forget_test_modules() -> Iterator[None]:
    """Modules written by a test are dropped afterwards, so that each test imports its own."""
    yield
    for name in [n for n in sys.modules if n.startswith(PREFIX)]:
        del sys.modules[name]


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[validation._Server]:
    """A validation server of this test's own: it starts in this test's current directory."""
    monkeypatch.delenv(validation.PROCESS_ENV, raising=False)
    fresh = validation._Server()
    monkeypatch.setattr(validation, "_SERVER", fresh)
    yield fresh
    fresh.stop()


def module_name() -> str:
    return PREFIX + secrets.token_hex(4)


def write_module(directory: Path, name: str, marker: Path, body: str = NET) -> Path:
    """``name.py`` in ``directory`` that creates ``marker`` when imported (then runs ``body``)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.py"
    head = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n"
    path.write_text(head + textwrap.dedent(body))
    return path


def hostile_checkpoint(path: Path, factory: str, kwargs: dict | None = None, probe: bool = True) -> Path:
    """A checkpoint of a 4→3 Linear whose recorded architecture names ``factory`` (and a probe)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    arch = {
        "factory": factory,
        "kwargs": kwargs or {"in_features": 4, "out_features": 3},
        "weights": ["model"],
    }
    extra = {}
    if probe:
        extra[validation.PROBE_FILE] = validation.make_probe_file(model, torch.randn(2, 4), None)
    cv.save(path, {"model": model.state_dict()}, metadata={"architecture": arch}, extra_files=extra)
    return path


def pycache_under(*directories: Path) -> list[Path]:
    return [p for d in directories if d.exists() for p in d.rglob("__pycache__")]


def place(where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(checkpoint path, directory holding the hostile module) for each way a module can sit on
    sys.path beside a checkpoint: the current directory as ``python -c`` puts it there (''), the
    checkpoint directory itself as the current directory, and the checkpoint directory by path."""
    ckpt = tmp_path / "run" / "step_1"
    ckpt.parent.mkdir(parents=True)
    if where == "cwd":
        home = tmp_path / "cwd"
        home.mkdir()
        monkeypatch.chdir(home)
        monkeypatch.setattr(sys, "path", ["", *sys.path])
        return ckpt, home
    if where == "checkpoint-as-cwd":
        return ckpt, ckpt  # the caller chdirs once the checkpoint exists
    monkeypatch.setattr(sys, "path", [str(ckpt), *sys.path])
    return ckpt, ckpt


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


def how_to_trust(message: str, name: str) -> None:
    message = flat(message)
    assert f"trusted_modules=['{name}']" in message, message
    assert f"--trust {name}" in message, message
    assert "CKPTVAULT_TRUSTED_MODULES" in message, message


# -- load_model ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["cwd", "checkpoint-as-cwd", "checkpoint-on-path"])
def test_load_model_never_imports_a_module_it_does_not_trust(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, marker = module_name(), tmp_path / "marker"
    ckpt, home = place(where, tmp_path, monkeypatch)
    hostile_checkpoint(ckpt, f"{name}:Net")
    write_module(home, name, marker)
    if where == "checkpoint-as-cwd":
        monkeypatch.chdir(ckpt)
        monkeypatch.setattr(sys, "path", ["", *sys.path])
    if where != "cwd":  # a file added to a checkpoint: refused as such, as load refuses it
        with pytest.raises(cv.CorruptCheckpointError, match="unexpected file"):
            cv.load_model(ckpt)
    with pytest.raises(cv.ArchitectureError) as caught:
        cv.load_model(ckpt, verify=False)  # and without that check: not trusted
    how_to_trust(str(caught.value), name)
    assert not marker.exists() and name not in sys.modules
    assert pycache_under(ckpt, home) == []


@pytest.mark.parametrize("where", ["cwd", "checkpoint-as-cwd", "checkpoint-on-path"])
def test_a_trusted_module_is_never_imported_from_cwd_or_the_checkpoint(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, marker = module_name(), tmp_path / "marker"
    ckpt, home = place(where, tmp_path, monkeypatch)
    hostile_checkpoint(ckpt, f"{name}:Net")
    write_module(home, name, marker)
    if where == "checkpoint-as-cwd":
        monkeypatch.chdir(ckpt)
        monkeypatch.setattr(sys, "path", ["", *sys.path])
    with pytest.raises(cv.ArchitectureError, match="cannot import"):
        cv.load_model(ckpt, trusted_modules=[name], verify=False)
    assert not marker.exists() and name not in sys.modules
    assert pycache_under(ckpt, home) == []


def test_an_allow_listed_module_is_imported_from_the_program_path_and_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package, marker = module_name(), tmp_path / "marker"
    lib = tmp_path / "lib"
    write_module(lib / package, "nets", marker)
    (lib / package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(lib))
    ckpt = hostile_checkpoint(tmp_path / "ck", f"{package}.nets:Net", probe=False)
    with pytest.raises(cv.ArchitectureError) as caught:  # not imported, not listed
        cv.load_model(ckpt)
    how_to_trust(str(caught.value), f"{package}.nets")
    assert not marker.exists()
    # a prefix of the name is not a parent package
    with pytest.raises(cv.ArchitectureError, match="not trusted"):
        cv.load_model(ckpt, trusted_modules=[package + ".ne"])
    assert not marker.exists()
    model = cv.load_model(ckpt, trusted_modules=[package])  # a package trusts its submodules
    assert marker.exists() and type(model).__module__ == f"{package}.nets"
    assert torch.equal(model.weight, cv.load(ckpt)["model"]["weight"])
    assert pycache_under(ckpt) == []
    # imported now, by the program's own choice: trusted without a list from here on
    assert type(cv.load_model(ckpt)).__name__ == "Net"


def test_the_environment_variable_trusts_a_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name, marker = module_name(), tmp_path / "marker"
    write_module(tmp_path / "lib", name, marker)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    ckpt = hostile_checkpoint(tmp_path / "ck", f"{name}:Net", probe=False)
    monkeypatch.setenv("CKPTVAULT_TRUSTED_MODULES", "other_pkg")
    with pytest.raises(cv.ArchitectureError, match="not trusted"):
        cv.load_model(ckpt)
    assert not marker.exists()
    with pytest.raises(cv.ArchitectureError, match="not trusted"):  # an explicit list replaces it
        cv.load_model(ckpt, trusted_modules=[])
    monkeypatch.setenv("CKPTVAULT_TRUSTED_MODULES", f"other_pkg, {name}")
    assert type(cv.load_model(ckpt)).__name__ == "Net" and marker.exists()


def test_an_already_imported_module_needs_no_list_and_another_list_does_not_trust(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cv.save_model(tmp_path / "mlp", MLP([4, 8, 3]), kwargs={"sizes": [4, 8, 3]})
    assert isinstance(cv.load_model(tmp_path / "mlp"), MLP)  # tests.models_for_validation is imported
    name, marker = module_name(), tmp_path / "marker"
    write_module(tmp_path / "lib", name, marker)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    ckpt = hostile_checkpoint(tmp_path / "ck", f"{name}:Net", probe=False)
    with pytest.raises(cv.ArchitectureError, match="not trusted"):
        cv.load_model(ckpt, trusted_modules=["tests"])
    assert not marker.exists()


# -- BaseException during an import or a build ----------------------------------------------------------
class Escape(BaseException):
    """Neither an Exception nor SystemExit: the kind of thing ``except Exception`` lets through."""


@pytest.mark.parametrize(
    "body",
    ["raise SystemExit(3)", "raise GeneratorExit()", "class Out(BaseException):\n    pass\nraise Out('x')"],
)
def test_a_base_exception_at_import_is_an_architecture_error(
    body: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, marker = module_name(), tmp_path / "marker"
    write_module(tmp_path / "lib", name, marker, body)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    ckpt = hostile_checkpoint(tmp_path / "ck", f"{name}:Net", probe=False)
    with pytest.raises(cv.ArchitectureError, match="cannot import"):
        cv.load_model(ckpt, allowed_modules=[name])  # an allow-list that also trusts
    assert marker.exists()  # it was imported (trusted) and its SystemExit did not end the caller


BUILD = """
import torch


class Net(torch.nn.Linear):
    def __init__(self, in_features: int = 4, out_features: int = 3, escape: str = "") -> None:
        super().__init__(in_features, out_features)
        if escape == "exit":
            raise SystemExit(4)
        if escape == "interrupt":
            raise KeyboardInterrupt
"""


def test_a_base_exception_while_building_is_an_architecture_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, marker = module_name(), tmp_path / "marker"
    write_module(tmp_path / "lib", name, marker, BUILD)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    __import__(name)  # the program's own module
    kwargs = {"in_features": 4, "out_features": 3, "escape": "exit"}
    ckpt = hostile_checkpoint(tmp_path / "exit", f"{name}:Net", kwargs, probe=False)
    with pytest.raises(cv.ArchitectureError, match="SystemExit"):
        cv.load_model(ckpt)
    # Ctrl-C is the user's, not the checkpoint's: it still stops the program
    ckpt = hostile_checkpoint(tmp_path / "int", f"{name}:Net", {**kwargs, "escape": "interrupt"}, probe=False)
    with pytest.raises(KeyboardInterrupt):
        cv.load_model(ckpt)


# -- the meta-device check -------------------------------------------------------------------------
NONPERSISTENT = """
import torch


class Tabled(torch.nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(width, width)
        self.register_buffer("table", torch.arange(width, dtype=torch.float32) * 2 + 1, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.table
"""


def test_a_huge_declared_model_is_refused_before_allocating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 10^12 weights (4 TB) for a checkpoint that stores 12: compared on the meta device first
    huge = {"in_features": 10**6, "out_features": 10**6}
    ckpt = hostile_checkpoint(tmp_path / "huge", "torch.nn:Linear", huge, probe=False)
    with pytest.raises(cv.ModelMismatchError) as caught:
        cv.load_model(ckpt)
    assert "weight: saved (3, 4) vs model (1000000, 1000000)" in caught.value.shapes

    # a buffer computed in __init__ and not saved (persistent=False) is still right after loading
    name, marker = module_name(), tmp_path / "marker"
    write_module(tmp_path / "lib", name, marker, NONPERSISTENT)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    module = __import__(name)
    torch.manual_seed(1)
    model = module.Tabled(4)
    cv.save_model(tmp_path / "tabled", model, kwargs={"width": 4})
    back = cv.load_model(tmp_path / "tabled")
    assert torch.equal(back.table, torch.tensor([1.0, 3.0, 5.0, 7.0]))
    assert not back.table.is_meta and not back.lin.weight.is_meta
    x = torch.randn(2, 4)
    assert torch.equal(back(x), model.eval()(x))


# -- strict decoding: load_model reads as load does ------------------------------------------------------
def rewrite_tree(ckpt: Path, change: object) -> None:
    manifest = ckpt / "manifest.json"
    doc = json.loads(manifest.read_text())
    change(doc["tree"])  # type: ignore[operator]
    manifest.write_text(json.dumps(doc))


def duplicate_model_key(tree: dict) -> None:
    model = tree["v"]["model"]
    tree.pop("v")
    tree["items"] = [["model", model], ["model", model]]


def unknown_field_in_a_sibling(tree: dict) -> None:
    tree["v"]["other"] = {"t": "dict", "v": {}, "surprise": 1}


@pytest.mark.parametrize("change", [duplicate_model_key, unknown_field_in_a_sibling])
def test_load_model_decodes_as_strictly_as_load(change: object, tmp_path: Path) -> None:
    ckpt = tmp_path / "m"
    cv.save_model(ckpt, MLP([4, 8, 3]), kwargs={"sizes": [4, 8, 3]})
    rewrite_tree(ckpt, change)
    with pytest.raises(cv.CorruptCheckpointError):
        cv.load(ckpt)
    with pytest.raises(cv.CorruptCheckpointError):
        cv.load_model(ckpt)


# -- validation: API, CLI, the server, one-shot workers, the manager ---------------------------------
def test_validation_never_imports_an_untrusted_module(
    server: validation._Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, marker = module_name(), tmp_path / "marker"
    ckpt = hostile_checkpoint(tmp_path / "run" / "step_1", f"{name}:Net")
    home = tmp_path / "cwd"
    for directory in (home, ckpt.parent):
        write_module(directory, name, marker)
    monkeypatch.chdir(home)  # the server starts here: `-m` puts this directory on its sys.path
    monkeypatch.syspath_prepend(str(ckpt.parent))  # and the request's sys.path names the run

    result = cv.validate(ckpt)  # the server and its forked child
    assert not result.passed and any("not trusted" in p for p in result.problems), result.problems
    assert server.pid is not None and not server.disabled
    done = CliRunner().invoke(app, ["validate", str(ckpt)])
    assert done.exit_code == 1 and "not trusted" in flat(done.output), done.output
    monkeypatch.setenv(validation.PROCESS_ENV, "spawn")  # a one-shot worker
    spawned = cv.validate(ckpt)
    assert not spawned.passed and any("not trusted" in p for p in spawned.problems), spawned.problems
    assert not marker.exists()
    assert pycache_under(ckpt.parent, home) == []


def test_cli_validate_trusts_what_trust_names(
    server: validation._Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, marker = module_name(), tmp_path / "marker"
    write_module(tmp_path / "lib", name, marker)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))  # the program's path, handed to the worker
    ckpt = hostile_checkpoint(tmp_path / "ck", f"{name}:Net")
    refused = CliRunner().invoke(app, ["validate", str(ckpt)])
    assert refused.exit_code == 1 and f"--trust {name}" in flat(refused.output), refused.output
    assert not marker.exists()
    trusted = CliRunner().invoke(app, ["validate", str(ckpt), "--trust", name])
    assert trusted.exit_code == 0, trusted.output
    assert marker.exists() and name not in sys.modules  # imported by the worker only


def test_manager_validation_imports_the_programs_module_not_a_shadow_in_cwd(
    server: validation._Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = module_name()
    real_marker, shadow_marker = tmp_path / "real", tmp_path / "shadow"
    write_module(tmp_path / "lib", name, real_marker)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    module = __import__(name)  # the training script imports its model
    real_marker.unlink()
    write_module(tmp_path / "cwd", name, shadow_marker)  # and finds a same-named file in its cwd
    monkeypatch.chdir(tmp_path / "cwd")
    torch.manual_seed(0)
    state = cv.TrainState(
        module.Net(4, 3), model_kwargs={"in_features": 4, "out_features": 3}, probe=torch.randn(2, 4)
    )
    with cv.CheckpointManager(tmp_path / "run", validate="full", every_n_steps=1) as manager:
        manager.step(state)
        manager.wait_validation()
        result = manager.validation_result("step_00000001")
    assert result is not None and result["level"] == "full" and result["passed"], result
    assert real_marker.exists()  # the server imported the module the program uses...
    assert not shadow_marker.exists()  # ...and never the file in the current directory


# -- ONNX export -----------------------------------------------------------------------------------------
def test_onnx_export_never_imports_an_untrusted_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from ckptvault.export import export_checkpoint

    name, marker = module_name(), tmp_path / "marker"
    ckpt = hostile_checkpoint(tmp_path / "run" / "step_1", f"{name}:Net")
    write_module(tmp_path / "cwd", name, marker)
    write_module(ckpt.parent, name, marker)
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(sys, "path", ["", *sys.path])
    with pytest.raises(cv.ArchitectureError) as caught:
        export_checkpoint(ckpt, tmp_path / "m.onnx", format="onnx")
    how_to_trust(str(caught.value), name)
    done = CliRunner().invoke(app, ["export", str(ckpt), str(tmp_path / "m.onnx"), "--format", "onnx"])
    assert done.exit_code == 1 and "not trusted" in flat(done.output), done.output
    assert not marker.exists() and not (tmp_path / "m.onnx").exists()

    # trusted, from the program's path: exported
    lib_name, lib_marker = module_name(), tmp_path / "lib_marker"
    write_module(tmp_path / "lib", lib_name, lib_marker)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    good = hostile_checkpoint(tmp_path / "good", f"{lib_name}:Net")
    args = ["export", str(good), str(tmp_path / "g.onnx"), "--format", "onnx", "--trust", lib_name]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert lib_marker.exists() and (tmp_path / "g.onnx").is_file()
