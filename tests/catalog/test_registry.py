"""The model registry: versions, aliases and their history, ``registry://`` references, pinning
against the manager's retention, concurrent registrations, and the ``ckptvault registry`` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ckptvault as cv
from ckptvault.catalog.registry import REGISTERED_NAME, Registry, RegistryError, registered_in
from ckptvault.cli.main import app


def save(path: Path, value: float, step: int = 1) -> cv.CheckpointInfo:
    return cv.save(path, {"w": torch.full((3,), value)}, metadata={"step": step})


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A tree with three checkpoints of one run; ``w`` holds the step number."""
    out = tmp_path / "root"
    for step in (1, 2, 3):
        save(out / "runs" / "exp" / f"step_{step}", float(step), step)
    return out


def ckpt(root: Path, step: int) -> Path:
    return root / "runs" / "exp" / f"step_{step}"


# --------------------------------------------------------------------------- versions and aliases


def test_register_numbers_versions_and_aliases_move_with_history(root: Path) -> None:
    registry = Registry(root)
    assert registry.names() == []
    v1 = registry.register("resnet", ckpt(root, 1), note="first")
    v2 = registry.register("resnet", ckpt(root, 2), alias="staging")
    assert (v1["version"], v2["version"]) == (1, 2)
    assert v1["checkpoint"] == "runs/exp/step_1" and v1["step"] == 1 and v1["note"] == "first"
    assert v1["checkpoint_id"] == cv.info(ckpt(root, 1)).checkpoint_id
    assert {"host", "user", "registered_at"} <= set(v1)

    registry.alias("resnet", 1, "production", why="passed review")
    registry.alias("resnet", 2, "production", why="better val_acc")
    doc = Registry(root).show("resnet")  # another object, as another process would
    assert doc["aliases"] == {"staging": 2, "production": 2}
    assert [v["version"] for v in doc["versions"]] == [1, 2]

    history = registry.history("resnet")
    assert [(h["alias"], h["from"], h["to"], h["why"]) for h in history] == [
        ("staging", None, 2, "registered version 2"),
        ("production", None, 1, "passed review"),
        ("production", 1, 2, "better val_acc"),
    ]
    for entry in history:
        assert {"when", "from", "to", "why", "host", "user"} <= set(entry)
        assert entry["host"] and entry["user"]
        assert datetime.fromisoformat(entry["when"]).tzinfo is not None

    # resolve by version, alias and newest
    assert registry.resolve("resnet", "1") == ckpt(root, 1)
    assert registry.resolve("resnet", "production") == ckpt(root, 2)
    assert registry.resolve("resnet") == ckpt(root, 2)
    assert registry.resolve("resnet", "latest") == ckpt(root, 2)
    registry.register("resnet", ckpt(root, 3))
    assert registry.resolve("resnet") == ckpt(root, 3)
    assert registry.resolve("resnet", "production") == ckpt(root, 2)
    # the same checkpoint may be registered again (a new version), and under another model
    assert registry.register("resnet", ckpt(root, 1))["version"] == 4
    assert registry.register("other.model_v2", ckpt(root, 1))["version"] == 1
    assert registry.names() == ["other.model_v2", "resnet"]
    assert registered_in(root / "runs" / "exp") == {"step_1", "step_2", "step_3"}
    pins = json.loads((root / "runs" / "exp" / REGISTERED_NAME).read_text())["checkpoints"]
    assert sorted(map(tuple, pins["step_1"])) == [("other.model_v2", 1), ("resnet", 1), ("resnet", 4)]


def test_registry_references_load_the_right_checkpoint(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry(root)
    registry.register("m", ckpt(root, 1))
    registry.register("m", ckpt(root, 2), alias="production")
    registry.register("m", ckpt(root, 3), alias="staging")

    monkeypatch.setenv("CKPTVAULT_ROOT", str(root))
    monkeypatch.chdir(root.parent)  # not the root: the environment says where the registry is
    for ref, step in [("m@1", 1), ("m@production", 2), ("m@staging", 3), ("m", 3), ("m@", 3)]:
        state = cv.load(f"registry://{ref}")
        assert torch.equal(state["w"], torch.full((3,), float(step))), ref
        info = cv.info(f"registry://{ref}")
        assert Path(info.path) == ckpt(root, step) and info.step == step
        assert info.checkpoint_id == cv.info(ckpt(root, step)).checkpoint_id
    with cv.open("registry://m@production") as view:
        assert torch.equal(view["w"], torch.full((3,), 2.0))

    # moving the alias moves what the reference loads
    registry.alias("m", 1, "production")
    assert torch.equal(cv.load("registry://m@production")["w"], torch.full((3,), 1.0))

    # without CKPTVAULT_ROOT the current directory is the root
    monkeypatch.delenv("CKPTVAULT_ROOT")
    monkeypatch.chdir(root)
    assert cv.info("registry://m@staging").step == 3
    monkeypatch.chdir(root.parent)
    with pytest.raises(RegistryError):
        cv.load("registry://m@staging")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r, c: r.register("", c), "bad model name"),
        (lambda r, c: r.register("../escape", c), "bad model name"),
        (lambda r, c: r.register("a b", c), "bad model name"),
        (lambda r, c: r.register(".hidden", c), "bad model name"),
        (lambda r, c: r.register("x" * 129, c), "bad model name"),
        (lambda r, c: r.register("m", c, alias="123"), "bad alias"),
        (lambda r, c: r.register("m", c, alias="a/b"), "bad alias"),
        (lambda r, c: r.alias("m", 1, "pro duction"), "bad alias"),
        (lambda r, c: r.alias("m", 7, "production"), "no version 7"),
        (lambda r, c: r.alias("unknown", 1, "production"), "no registered model"),
        (lambda r, c: r.resolve("m", "7"), "no version 7"),
        (lambda r, c: r.resolve("m", "nope"), "no alias 'nope'"),
        (lambda r, c: r.resolve("unknown"), "no registered model"),
        (lambda r, c: r.show("../../etc/passwd"), "bad model name"),
        (lambda r, c: r.history("unknown"), "no registered model"),
    ],
)
def test_bad_names_aliases_and_unknown_versions_raise_registry_error(
    root: Path, call: object, message: str
) -> None:
    registry = Registry(root)
    registry.register("m", ckpt(root, 1))
    before = registry.show("m")
    with pytest.raises(RegistryError, match=message):
        call(registry, ckpt(root, 2))  # type: ignore[operator]
    assert registry.show("m") == before  # a refused change changes nothing


def test_a_refused_registration_pins_nothing(root: Path) -> None:
    registry = Registry(root)
    with pytest.raises(RegistryError, match="bad alias"):
        registry.register("m", ckpt(root, 2), alias="123")
    assert registered_in(root / "runs" / "exp") == set()


def test_registry_references_with_bad_parts_raise_registry_error(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Registry(root).register("m", ckpt(root, 1))
    monkeypatch.setenv("CKPTVAULT_ROOT", str(root))
    for ref in ["registry://", "registry://m@9", "registry://m@nope", "registry://nope", "registry://../m"]:
        with pytest.raises(RegistryError):
            cv.load(ref)


def test_a_unicode_digit_version_raises_registry_error(root: Path) -> None:
    registry = Registry(root)
    registry.register("m", ckpt(root, 1))
    with pytest.raises(RegistryError):
        registry.resolve("m", "²")


@pytest.mark.parametrize("what", ["name", "alias"])
def test_a_trailing_newline_is_not_a_valid_name(root: Path, what: str) -> None:
    registry = Registry(root)
    with pytest.raises(RegistryError):
        if what == "name":
            registry.register("m\n", ckpt(root, 1))
        else:
            registry.register("m", ckpt(root, 1), alias="production\n")


def test_a_checkpoint_outside_the_root_is_refused(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "ck"
    save(outside, 9.0)
    registry = Registry(root)
    with pytest.raises(RegistryError, match="not under"):
        registry.register("m", outside)
    with pytest.raises(cv.CheckpointNotFoundError):
        registry.register("m", root / "runs" / "exp")  # under the root, but not a checkpoint
    assert registry.names() == []
    assert not (outside.parent / REGISTERED_NAME).exists()


@pytest.mark.parametrize("how", ["dotdot", "symlink"])
def test_a_checkpoint_outside_the_root_is_refused_however_spelled(
    root: Path, tmp_path: Path, how: str
) -> None:
    outside = tmp_path / "elsewhere" / "ck"
    save(outside, 9.0)
    if how == "dotdot":
        path = root / ".." / "elsewhere" / "ck"
    else:
        os.symlink(outside.parent, root / "link")
        path = root / "link" / "ck"
    registry = Registry(root)
    try:
        with pytest.raises(RegistryError):
            registry.register("m", path)
    finally:
        assert not (outside.parent / REGISTERED_NAME).exists(), "a file was written outside the root"


# --------------------------------------------------------------------------- pinning vs retention


def test_a_registered_checkpoint_survives_retention(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "exp"
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    state = cv.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))

    def names() -> list[str]:
        return sorted(p.name for p in run.iterdir() if p.is_dir() and not p.name.startswith("."))

    with cv.CheckpointManager(run, every_n_steps=1, keep_last=1, validate="checksum") as manager:
        for _ in range(2):
            state.parts["model"]["model"].weight.data.add_(1.0)
            manager.step(state)
        assert names() == ["step_00000002"]
        weight_at_2 = state.parts["model"]["model"].weight.detach().clone()
        # registered by another registry object (as another process would)
        version = Registry(tmp_path).register("m", run / "step_00000002", alias="production")
        assert version["version"] == 1
        for _ in range(4):
            state.parts["model"]["model"].weight.data.add_(1.0)
            manager.step(state)
        manager.wait_validation()
        assert names() == ["step_00000002", "step_00000006"]  # 3, 4, 5 deleted; 2 pinned
    back = cv.load(run / "step_00000002")
    assert back["step"] == 2
    loaded = Registry(tmp_path).resolve("m", "production")
    assert loaded == run / "step_00000002"
    assert torch.equal(cv.load(loaded)["model"]["model"]["weight"], weight_at_2)


# --------------------------------------------------------------------------- concurrency

_REGISTER_SNIPPET = textwrap.dedent(
    """
    import sys, time
    from ckptvault.catalog.registry import Registry
    root, checkpoint, who, start = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    registry = Registry(root)
    while time.time() < start:
        time.sleep(0.001)
    for i in range(10):
        registry.register("shared", checkpoint, note=f"{who}-{i}", alias=f"last-{who}")
    """
)


def test_concurrent_registrations_lose_no_update(root: Path) -> None:
    start = time.time() + 1.5  # both processes imported and waiting by then
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _REGISTER_SNIPPET, str(root), str(ckpt(root, step)), who, str(start)]
        )
        for who, step in (("a", 1), ("b", 2))
    ]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    doc = Registry(root).show("shared")
    assert [v["version"] for v in doc["versions"]] == list(range(1, 21))
    notes = [v["note"] for v in doc["versions"]]
    assert sorted(notes) == sorted(f"{who}-{i}" for who in "ab" for i in range(10))
    for who in "ab":  # each process's registrations in its own order
        mine = [n for n in notes if n.startswith(who)]
        assert mine == [f"{who}-{i}" for i in range(10)]
    by_note = {v["note"]: v for v in doc["versions"]}
    assert {by_note[f"a-{i}"]["checkpoint"] for i in range(10)} == {"runs/exp/step_1"}
    assert {by_note[f"b-{i}"]["checkpoint"] for i in range(10)} == {"runs/exp/step_2"}
    assert doc["aliases"] == {"last-a": by_note["a-9"]["version"], "last-b": by_note["b-9"]["version"]}
    assert len(doc["history"]) == 20
    pins = json.loads((root / "runs" / "exp" / REGISTERED_NAME).read_text())["checkpoints"]
    assert sorted(v for _, v in pins["step_1"]) == sorted(by_note[f"a-{i}"]["version"] for i in range(10))
    assert sorted(v for _, v in pins["step_2"]) == sorted(by_note[f"b-{i}"]["version"] for i in range(10))
    leftovers = [p.name for p in (root / ".ckptvault" / "registry").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


# --------------------------------------------------------------------------- CLI


def test_cli_registry_commands(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    monkeypatch.chdir(tmp_path)  # neither the cwd nor CKPTVAULT_ROOT is the root: --root says it
    monkeypatch.delenv("CKPTVAULT_ROOT", raising=False)
    r = str(root)

    def ok(*args: str) -> str:
        result = runner.invoke(app, ["registry", *args], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        return " ".join(result.stdout.split())

    def fails(*args: str) -> str:
        result = runner.invoke(app, ["registry", *args], env={"COLUMNS": "200"})
        assert result.exit_code == 1, result.output
        assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
        return " ".join(result.stderr.split())

    assert "model" in ok("ls", "--root", r) and json.loads(ok("ls", "--root", r, "--json")) == []
    assert "m version 1 -> runs/exp/step_1" in ok("register", "m", str(ckpt(root, 1)), "--root", r)
    out = ok("register", "m", str(ckpt(root, 2)), "--alias", "staging", "--note", "n2", "--root", r)
    assert "m version 2 -> runs/exp/step_2" in out
    assert "m@production -> version 1" in ok("alias", "m", "1", "production", "--why", "first", "--root", r)
    assert "m@production -> version 2" in ok("alias", "m", "2", "production", "--why", "better", "--root", r)

    listing = ok("ls", "--root", r)
    assert "m" in listing and "production->v2" in listing and "staging->v2" in listing
    assert json.loads(ok("ls", "--root", r, "--json")) == [
        {"name": "m", "aliases": {"staging": 2, "production": 2}, "versions": 2}
    ]
    shown = ok("show", "m", "--root", r)
    assert "runs/exp/step_1" in shown and "runs/exp/step_2" in shown and "production" in shown
    doc = json.loads(ok("show", "m", "--root", r, "--json"))
    assert [v["checkpoint"] for v in doc["versions"]] == ["runs/exp/step_1", "runs/exp/step_2"]
    assert Registry(root).resolve("m", "production") == ckpt(root, 2)

    history = ok("history", "m", "--root", r)
    assert "production: (new) -> v1" in history and "production: v1 -> v2" in history
    assert "(better)" in history and "staging: (new) -> v2" in history
    moves = json.loads(ok("history", "m", "--root", r, "--json"))
    assert [(h["alias"], h["from"], h["to"], h["why"]) for h in moves] == [
        ("staging", None, 2, "registered version 2"),
        ("production", None, 1, "first"),
        ("production", 1, 2, "better"),
    ]

    # CKPTVAULT_ROOT instead of --root
    monkeypatch.setenv("CKPTVAULT_ROOT", r)
    assert json.loads(ok("show", "m", "--json"))["aliases"]["production"] == 2
    monkeypatch.delenv("CKPTVAULT_ROOT")

    # failures: exit 1 with a one-line error, nothing changed
    assert "no registered model 'nope'" in fails("show", "nope", "--root", r)
    assert "no registered model" in fails("history", "nope", "--root", r)
    assert "no version 9" in fails("alias", "m", "9", "production", "--root", r)
    assert "bad alias" in fails("alias", "m", "1", "12", "--root", r)
    assert "bad model name" in fails("register", "bad name", str(ckpt(root, 1)), "--root", r)
    assert "not under" in fails("register", "m", str(tmp_path), "--root", r)
    assert "not a committed checkpoint" in fails("register", "m", str(root / "runs"), "--root", r)
    assert "no registered model" in fails("show", "m")  # cwd is not the root
    assert len(Registry(root).show("m")["versions"]) == 2
    assert Registry(root).resolve("m", "production") == ckpt(root, 2)
