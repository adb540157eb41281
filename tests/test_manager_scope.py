"""Scope is the one list of a stream's options (issue 14 item 4): the manager's keyword arguments
are checked against its fields, ``full=Scope(...)`` is the same configuration, and the package split
keeps every name importable from ``ckptvault.manager``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import ckptvault as cv
from ckptvault.manager.scope import SCOPE_OPTIONS, Scope, full_scope


def make_state() -> cv.TrainState:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return cv.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_scope_fields_are_the_option_list() -> None:
    assert {f.name for f in dataclasses.fields(Scope)} == SCOPE_OPTIONS
    assert full_scope(None, {"every_n_steps": 3, "keep_last": 2}) == Scope(every_n_steps=3, keep_last=2)
    assert full_scope(Scope(keep_best=1, monitor="loss"), {}) == Scope(keep_best=1, monitor="loss")


def test_unknown_option_is_a_type_error_like_pythons(tmp_path: Path) -> None:
    with pytest.raises(
        TypeError, match=r"CheckpointManager\(\) got an unexpected keyword argument 'keep_lst'"
    ):
        cv.CheckpointManager(tmp_path, keep_lst=2)
    assert not (tmp_path / ".ckptvault-run.lock").exists()  # refused before the run was touched
    with cv.CheckpointManager(tmp_path):  # and nothing was left locked
        pass


def test_full_scope_and_keywords_are_not_mixed(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="not both"):
        cv.CheckpointManager(tmp_path, full=Scope(keep_last=1), keep_last=2)


def test_full_scope_object_equals_keyword_options(tmp_path: Path) -> None:
    state = make_state()
    with cv.CheckpointManager(
        tmp_path / "a", full=Scope(every_n_steps=1, keep_last=2), validate="checksum"
    ) as a:
        for _ in range(4):
            a.step(state)
    state = make_state()
    with cv.CheckpointManager(tmp_path / "b", every_n_steps=1, keep_last=2, validate="checksum") as b:
        for _ in range(4):
            b.step(state)
    assert [r.step for r in a.checkpoints()] == [r.step for r in b.checkpoints()] == [3, 4]
    run_a = json.loads((tmp_path / "a" / "run.json").read_text())
    run_b = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run_a["scopes"] == run_b["scopes"]  # run.json records the same settings either way
    assert set(run_a["scopes"]["full"]) == SCOPE_OPTIONS


def test_public_names_still_importable_from_the_package() -> None:
    from ckptvault import RestoreRefusedError, manager

    for name in (
        "CheckpointManager",
        "Scope",
        "RUN_DIR_ENV",
        "EVENTS_NAME",
        "INDEX_NAME",
        "LOCK_NAME",
        "read_events",
        "kept_reasons",
        "load_pins",
        "checkpoint_name",
        "DamagedRunFileError",
    ):
        assert hasattr(manager, name), name
    assert RestoreRefusedError is manager.RestoreRefusedError
    assert issubclass(manager.DamagedRunFileError, cv.CheckpointError)
