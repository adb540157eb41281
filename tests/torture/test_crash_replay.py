"""Lost un-synced writes: every state a power cut could leave during a write path, replayed.

Each write path runs once under :class:`ckptvault.testing.FaultInjector` with ``record=True``; the
recorded operations (with the bytes of every write) are replayed by
:mod:`ckptvault.testing.crashsim` into the states a crash after each prefix of them could leave --
un-synced file data dropped, directory entries kept only up to a prefix that reaches at least the
last directory fsync (the CI slice takes the two extremes per prefix, ``make torture`` every prefix
in between). Each state is written out as a real directory and must keep the promises:

* only complete checkpoints are visible, everything committed before is intact (an overwrite: old
  or new, never a mix; retention: an old checkpoint is gone only if the new one is durable);
* the library opens the run and the next operation succeeds, leaving nothing a sweep would keep.

This is what proves the fsync order (file data, then the manifest, then the staging directory,
then the rename, then the parent): drop any of those fsyncs from the code and some replayed state
shows a visible checkpoint that does not verify (the test ``test_the_replay_catches_a_missing_fsync``
checks exactly that, so the harness itself cannot silently pass).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ckptvault as cv
from ckptvault.catalog.registry import Registry
from ckptvault.engine.gc import collect_garbage
from ckptvault.storage import local_write as local
from ckptvault.testing import FaultInjector, crashsim
from ckptvault.testing.invariants import check_catalog, check_checkpoints

from .conftest import Figures, pick
from .fault_cases import CHUNK, changed, next_operation_problems, retention_case, state_of

EVERY_M = pick(False, True)


@dataclasses.dataclass
class ReplayCase:
    name: str
    build: Callable[[Path], dict[str, Any]]
    operation: Callable[[Path, dict[str, Any]], Any]
    check: Callable[[Path, dict[str, Any]], list[str]]  # any crash state
    next_operation: Callable[[Path, dict[str, Any]], Any]
    check_after_next: Callable[[Path, dict[str, Any]], list[str]]
    catalog: bool = False


def _save_replay(name: str, *, incremental: bool = False, overwrite: bool = False) -> ReplayCase:
    options: dict[str, Any] = {"incremental": True, "chunk_bytes": CHUNK} if incremental else {}

    def build(root: Path) -> dict[str, Any]:
        a = state_of(1)
        b = changed(a) if incremental else state_of(2)
        cv.save(root / "c1", a, **options)
        return {"a": a, "b": b}

    target = "c1" if overwrite else "c2"

    def operation(root: Path, ctx: dict[str, Any]) -> None:
        cv.save(root / target, ctx["b"], overwrite=overwrite, **options)

    def check(root: Path, ctx: dict[str, Any]) -> list[str]:
        if overwrite:
            return check_checkpoints(
                root, expected={"c1": [ctx["a"], ctx["b"]]}, must_exist=["c1"], may_exist=["c1"]
            )
        return check_checkpoints(
            root, expected={"c1": [ctx["a"]], "c2": [ctx["b"]]}, must_exist=["c1"], may_exist=["c1", "c2"]
        )

    def next_operation(root: Path, ctx: dict[str, Any]) -> None:
        cv.save(root / target, ctx["b"], overwrite=True, **options)
        if incremental:
            collect_garbage(root)

    def after(root: Path, ctx: dict[str, Any]) -> list[str]:
        names = ["c1"] if overwrite else ["c1", "c2"]
        expected = {"c1": [ctx["b"]]} if overwrite else {"c1": [ctx["a"]], "c2": [ctx["b"]]}
        problems = check_checkpoints(root, expected=expected, must_exist=names, may_exist=names)
        if incremental and collect_garbage(root, dry_run=True).deleted_chunks:
            problems.append("unreferenced chunks after the next save and a GC")
        return problems

    return ReplayCase(name, build, operation, check, next_operation, after)


def _retention_replay() -> ReplayCase:
    """The fault loops' retention path (restore, train, a step that makes retention delete step 1):
    its checks for a failed run are exactly the checks for any crash state."""
    case = retention_case()
    return ReplayCase(
        "retention",
        case.build,
        case.operation,
        lambda root, ctx: case.check(root, ctx, False),
        case.next_operation,
        case.check_after_next,
        catalog=True,
    )


def _gc_replay() -> ReplayCase:
    def build(root: Path) -> dict[str, Any]:
        a = state_of(1)
        b = changed(a)
        c = changed(b)
        c["weights"][64:] -= 2.0
        for name, s in (("c1", a), ("c2", b), ("c3", c)):
            cv.save(root / name, s, incremental=True, chunk_bytes=CHUNK)
        shutil.rmtree(root / "c2")
        return {"a": a, "c": c}

    def check(root: Path, ctx: dict[str, Any]) -> list[str]:
        return check_checkpoints(
            root,
            expected={"c1": [ctx["a"]], "c3": [ctx["c"]]},
            must_exist=["c1", "c3"],
            may_exist=["c1", "c3"],
        )

    def after(root: Path, ctx: dict[str, Any]) -> list[str]:
        problems = check(root, ctx)
        if collect_garbage(root, dry_run=True).deleted_chunks:
            problems.append("unreferenced chunks after the next GC")
        return problems

    return ReplayCase(
        "gc", build, lambda r, c: collect_garbage(r), check, lambda r, c: collect_garbage(r), after
    )


def _registry_replay() -> ReplayCase:
    def build(root: Path) -> dict[str, Any]:
        for i in (1, 2):
            cv.save(root / "run" / f"c{i}", state_of(i))
        Registry(root).register("model", root / "run" / "c1", alias="prod")
        return {}

    def operation(root: Path, ctx: dict[str, Any]) -> None:
        Registry(root).register("model", root / "run" / "c2", alias="prod")

    def check(root: Path, ctx: dict[str, Any]) -> list[str]:
        problems = check_checkpoints(root, must_exist=["run/c1", "run/c2"], may_exist=["run/c1", "run/c2"])
        try:
            doc = Registry(root).show("model")
        except cv.CheckpointError as exc:
            return [*problems, f"registry unreadable: {exc}"]
        versions = [v["version"] for v in doc["versions"]]
        if versions not in ([1], [1, 2]):
            problems.append(f"versions {versions}")
        return problems

    def next_operation(root: Path, ctx: dict[str, Any]) -> None:
        registry = Registry(root)
        if len(registry.show("model")["versions"]) < 2:
            registry.register("model", root / "run" / "c2", alias="prod")

    def after(root: Path, ctx: dict[str, Any]) -> list[str]:
        problems = check(root, ctx)
        if Registry(root).resolve("model", "prod").name != "c2":
            problems.append("alias prod does not point at the new version")
        return problems

    return ReplayCase("registry", build, operation, check, next_operation, after)


CASES = [
    _save_replay("save"),
    _save_replay("overwrite", overwrite=True),
    _save_replay("incremental", incremental=True),
    _retention_replay(),
    _gc_replay(),
    _registry_replay(),
]


def _record(case: ReplayCase, root: Path) -> tuple[crashsim.Snapshot, list[Any], dict[str, Any]]:
    ctx = case.build(root)
    snapshot = crashsim.Snapshot.take(root)
    with FaultInjector(root, record=True) as recorder:
        case.operation(root, ctx)
    return snapshot, recorder.log, ctx


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_crash_state_keeps_the_promises(
    case: ReplayCase, tmp_path: Path, figures: Figures, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot, log, ctx = _record(case, tmp_path / "recorded")
    assert log, "nothing recorded"
    failures: list[str] = []
    states = 0
    for state in crashsim.crash_states(snapshot, log, every_m=EVERY_M):
        states += 1
        root = crashsim.materialize(state, tmp_path / "state")
        where = state.describe(log)
        problems = case.check(root, ctx)
        if case.catalog:
            problems += check_catalog(root)
        problems += next_operation_problems(case, root, ctx, monkeypatch)
        failures += [f"{case.name}: {where}: {p}" for p in problems]
    figures.add("crash_replay.operations_recorded", len(log))
    figures.add(f"crash_replay.{case.name}.states", states)
    figures.add("crash_replay.states", states)
    if not failures:
        figures.add("crash_replay.nothing_lost_checks", states)
    assert states >= len(log) + 1
    assert not failures, "\n".join(failures[:30])


def test_the_replay_catches_a_missing_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness must be able to fail: with the data files' fsync removed from the writer (a
    bug), some replayed crash state shows a committed checkpoint whose data is gone."""
    original_close = local.LocalWritableFile.close

    def close_without_fsync(self: local.LocalWritableFile) -> None:
        if self._fd >= 0 and not str(self._path).endswith("manifest.json"):
            os.close(self._fd)
            self._fd = -1
            return
        original_close(self)

    case = _save_replay("save")
    root = tmp_path / "recorded"
    ctx = case.build(root)
    snapshot = crashsim.Snapshot.take(root)
    monkeypatch.setattr(local.LocalWritableFile, "close", close_without_fsync)
    monkeypatch.setenv("CKPTVAULT_DIRECT_IO", "0")
    with FaultInjector(root, record=True) as recorder:
        case.operation(root, ctx)
    monkeypatch.undo()
    broken = 0
    for state in crashsim.crash_states(snapshot, recorder.log):
        if case.check(crashsim.materialize(state, tmp_path / "state"), ctx):
            broken += 1
    assert broken > 0, "no crash state exposed the missing fsync: the replay model is too lenient"


def test_crash_states_of_a_simple_log(tmp_path: Path) -> None:
    """The model itself on a hand-made log: write+rename without fsync loses the data but may keep
    the name; with fsync of the file and the directory, the last state keeps both."""
    root = tmp_path / "r"
    root.mkdir()
    snapshot = crashsim.Snapshot.take(root)
    path, final = str(root / "tmp"), str(root / "final")
    log = [
        crashsim.Op(1, "open", path, flags=os.O_CREAT | os.O_WRONLY),
        crashsim.Op(2, "write", path, offset=0, data=b"hello"),
        crashsim.Op(3, "rename", path, dest=final),
    ]
    states = {(s.ops, s.metadata): s.tree for s in crashsim.crash_states(snapshot, log, every_m=True)}
    assert states[(3, 3)] == {"final": b""}  # name durable, data not: the classic lost rename
    assert states[(3, 0)] == {}
    synced = [
        *log[:2],
        crashsim.Op(3, "fsync", path),
        log[2],
        crashsim.Op(5, "fsync", str(root), is_dir=True),
    ]
    last = list(crashsim.crash_states(snapshot, synced))[-1]
    assert last.tree == {"final": b"hello"} and last.metadata == 5
