"""The write paths of the fault loops (tests/torture/test_fault_loops.py) and the crash replay
(test_crash_replay.py): each :class:`Case` builds a run, performs its operation, and checks the
promises after a fault and after the next, fault-free operation. Kept apart from the loop so the
two test modules share them and each stays readable."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptvault as cv
from ckptvault.catalog.registry import Registry, registered_in
from ckptvault.catalog.store import Catalog
from ckptvault.engine.gc import collect_garbage
from ckptvault.errors import CheckpointError
from ckptvault.storage import local_common as local
from ckptvault.testing import ALL_KINDS, WRITE_KINDS
from ckptvault.testing.invariants import (
    check_catalog,
    check_checkpoints,
    leftovers,
    same_state,
    visible_checkpoints,
)

CHUNK = 16384  # small chunks: an incremental save of a 64 KiB tensor writes a few chunk files


def state_of(seed: int, *, big: bool = False) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "weights": torch.randn(128, 128, generator=g),  # 64 KiB: chunked when incremental
        "bias": np.arange(16, dtype=np.float64) * seed,
        "big": torch.randn(9 * 2**20 // 4, generator=g) if big else None,  # 9 MiB: an O_DIRECT file
        "step": seed,
    }


def changed(state: dict[str, Any]) -> dict[str, Any]:
    """The state after one optimizer step that touched only a few rows (one chunk changes)."""
    out = dict(state)
    out["weights"] = state["weights"].clone()
    out["weights"][:4] += 1.0
    out["step"] = state["step"] + 1
    return out


# --------------------------------------------------------------------------- the write paths


@dataclasses.dataclass
class Case:
    """One write path: builds the run before it, runs it, and checks the promises after it."""

    name: str
    build: Callable[[Path], dict[str, Any]]  # writes the "before" run; returns what the checks need
    operation: Callable[[Path, dict[str, Any]], Any]
    check: Callable[[Path, dict[str, Any], bool], list[str]]  # (root, ctx, completed)
    next_operation: Callable[[Path, dict[str, Any]], Any]
    check_after_next: Callable[[Path, dict[str, Any]], list[str]]
    kinds: frozenset[str] = WRITE_KINDS
    catalog: bool = True


def save_case(name: str, *, big: bool = False, use_async: bool = False, incremental: bool = False) -> Case:
    options: dict[str, Any] = {"incremental": True, "chunk_bytes": CHUNK} if incremental else {}

    def build(root: Path) -> dict[str, Any]:
        a = state_of(1)
        b = changed(a) if incremental else state_of(2, big=big)
        cv.save(root / "c1", a, metadata={"step": 1}, **options)
        return {"a": a, "b": b}

    def operation(root: Path, ctx: dict[str, Any]) -> None:
        if use_async:
            cv.save_async(root / "c2", ctx["b"], metadata={"step": 2}).wait()
        else:
            cv.save(root / "c2", ctx["b"], metadata={"step": 2}, **options)

    def check(root: Path, ctx: dict[str, Any], completed: bool) -> list[str]:
        return check_checkpoints(
            root,
            expected={"c1": [ctx["a"]], "c2": [ctx["b"]]},
            must_exist=["c1", "c2"] if completed else ["c1"],
            may_exist=["c1", "c2"],
        )

    def next_operation(root: Path, ctx: dict[str, Any]) -> None:
        cv.save(root / "c2", ctx["b"], metadata={"step": 2}, overwrite=True, **options)
        if incremental:
            collect_garbage(root)

    def after(root: Path, ctx: dict[str, Any]) -> list[str]:
        problems = check_checkpoints(
            root,
            expected={"c1": [ctx["a"]], "c2": [ctx["b"]]},
            must_exist=["c1", "c2"],
            may_exist=["c1", "c2"],
        )
        if incremental and collect_garbage(root, dry_run=True).deleted_chunks:
            problems.append("unreferenced chunks left after the next save and a GC")
        return problems

    return Case(name, build, operation, check, next_operation, after)


def distributed_save_case(name: str, *, incremental: bool = False) -> Case:
    """ckptvault.distributed.save from one process (DCP's no-dist mode): the writer, its commit
    and its clean-up on failure go through the same file operations a multi-rank save makes."""
    from ckptvault import distributed

    options: dict[str, Any] = {"incremental": True, "chunk_bytes": CHUNK} if incremental else {}

    def build(root: Path) -> dict[str, Any]:
        a = state_of(1)
        b = changed(a) if incremental else state_of(2)
        distributed.save(a, root / "c1", metadata={"step": 1}, piece_bytes=16384, **options)
        return {"a": a, "b": b}

    def operation(root: Path, ctx: dict[str, Any]) -> None:
        distributed.save(ctx["b"], root / "c2", metadata={"step": 2}, piece_bytes=16384, **options)

    def check(root: Path, ctx: dict[str, Any], completed: bool) -> list[str]:
        return check_checkpoints(
            root,
            expected={"c1": [ctx["a"]], "c2": [ctx["b"]]},
            must_exist=["c1", "c2"] if completed else ["c1"],
            may_exist=["c1", "c2"],
        )

    def next_operation(root: Path, ctx: dict[str, Any]) -> None:
        distributed.save(
            ctx["b"], root / "c2", metadata={"step": 2}, overwrite=True, piece_bytes=16384, **options
        )
        if incremental:
            collect_garbage(root)

    def after(root: Path, ctx: dict[str, Any]) -> list[str]:
        problems = check_checkpoints(
            root,
            expected={"c1": [ctx["a"]], "c2": [ctx["b"]]},
            must_exist=["c1", "c2"],
            may_exist=["c1", "c2"],
        )
        if incremental and collect_garbage(root, dry_run=True).deleted_chunks:
            problems.append("unreferenced chunks left after the next save and a GC")
        return problems

    return Case(name, build, operation, check, next_operation, after)


def overwrite_case() -> Case:
    def build(root: Path) -> dict[str, Any]:
        a, b, c = state_of(1), state_of(2), state_of(3)
        cv.save(root / "c1", a)
        return {"a": a, "b": b, "c": c}

    def operation(root: Path, ctx: dict[str, Any]) -> None:
        cv.save(root / "c1", ctx["b"], overwrite=True)

    def check(root: Path, ctx: dict[str, Any], completed: bool) -> list[str]:
        allowed = [ctx["b"]] if completed else [ctx["a"], ctx["b"]]
        return check_checkpoints(root, expected={"c1": allowed}, must_exist=["c1"], may_exist=["c1"])

    def next_operation(root: Path, ctx: dict[str, Any]) -> None:
        cv.save(root / "c1", ctx["c"], overwrite=True)

    def after(root: Path, ctx: dict[str, Any]) -> list[str]:
        return check_checkpoints(root, expected={"c1": [ctx["c"]]}, must_exist=["c1"], may_exist=["c1"])

    return Case("overwrite", build, operation, check, next_operation, after)


def _small_train_state(seed: int) -> cv.TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return cv.TrainState(model, optimizer)


def _train(state: cv.TrainState) -> None:
    model = state.parts["model"]["model"]
    optimizer = state.parts["optimizer"]["optimizer"]
    loss = model(torch.ones(2, 8)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _manager(root: Path, **kwargs: Any) -> cv.CheckpointManager:
    return cv.CheckpointManager(
        root / "run", every_n_steps=1, keep_last=2, validate="checksum", preemption_signals=(), **kwargs
    )


def _steps(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith("run/step_")]


def _manager_view_problems(root: Path) -> list[str]:
    """The run index never lies: a reopened manager lists exactly the visible checkpoints."""
    with _manager(root) as manager:
        listed = sorted(f"run/{r.name}" for r in manager.checkpoints())
    visible = _steps(visible_checkpoints(root))
    return [] if listed == visible else [f"manager lists {listed}, disk has {visible}"]


def retention_case() -> Case:
    def build(root: Path) -> dict[str, Any]:
        state = _small_train_state(0)
        with _manager(root) as manager:
            for _ in range(2):
                _train(state)
                manager.step(state)
        before = {n: cv.load(root / n) for n in _steps(visible_checkpoints(root))}
        return {"before": before}

    def operation(root: Path, ctx: dict[str, Any]) -> None:
        state = _small_train_state(0)
        with _manager(root) as manager:
            manager.restore(state)
            _train(state)
            manager.step(state)  # step 3: retention deletes step 1

    def check(root: Path, ctx: dict[str, Any], completed: bool) -> list[str]:
        names = ["run/step_00000001", "run/step_00000002", "run/step_00000003"]
        expected = {n: [s] for n, s in ctx["before"].items()}
        problems = check_checkpoints(root, expected=expected, must_exist=names[1:2], may_exist=names)
        visible = visible_checkpoints(root)
        if names[0] not in visible and names[2] not in visible:
            problems.append("step 1 deleted although step 3 was never committed")
        if completed and names[2] not in visible:
            problems.append("the step returned but step 3 is not visible")
        return problems

    def next_operation(root: Path, ctx: dict[str, Any]) -> None:
        state = _small_train_state(0)
        with _manager(root) as manager:
            info = manager.restore(state)
            assert info is not None and info.step in (2, 3), info
            _train(state)
            manager.step(state)

    def after(root: Path, ctx: dict[str, Any]) -> list[str]:
        problems = check_checkpoints(root)
        if len(_steps(visible_checkpoints(root))) != 2:
            problems.append(f"keep_last=2 but {visible_checkpoints(root)} after the next step")
        return problems + _manager_view_problems(root)

    return Case("retention", build, operation, check, next_operation, after)


def manager_async_case() -> Case:
    """Retention through an async manager: the background commit fails, the failure surfaces at
    the manager's exit (``wait``), and the run must be unlocked and intact afterwards."""
    case = retention_case()

    def operation(root: Path, ctx: dict[str, Any]) -> None:
        state = _small_train_state(0)
        with _manager(root, async_save=True) as manager:
            manager.restore(state)
            _train(state)
            manager.step(state)

    return dataclasses.replace(case, name="manager_async", operation=operation)


def gc_case() -> Case:
    def build(root: Path) -> dict[str, Any]:
        a = state_of(1)
        b = changed(a)
        c = changed(b)
        c["weights"][64:] -= 2.0
        for name, s in (("c1", a), ("c2", b), ("c3", c)):
            cv.save(root / name, s, incremental=True, chunk_bytes=CHUNK)
        shutil.rmtree(root / "c2")  # its unique chunks are now garbage
        return {"a": a, "c": c}

    def operation(root: Path, ctx: dict[str, Any]) -> None:
        collect_garbage(root)

    def check(root: Path, ctx: dict[str, Any], completed: bool) -> list[str]:
        return check_checkpoints(
            root,
            expected={"c1": [ctx["a"]], "c3": [ctx["c"]]},
            must_exist=["c1", "c3"],
            may_exist=["c1", "c3"],
        )

    def next_operation(root: Path, ctx: dict[str, Any]) -> None:
        collect_garbage(root)

    def after(root: Path, ctx: dict[str, Any]) -> list[str]:
        problems = check(root, ctx, True)
        if collect_garbage(root, dry_run=True).deleted_chunks:
            problems.append("a GC after the faulted one left unreferenced chunks")
        return problems

    return Case("gc", build, operation, check, next_operation, after)


def catalog_case() -> Case:
    def build(root: Path) -> dict[str, Any]:
        a, b = state_of(1), state_of(2)
        cv.save(root / "run" / "c1", a, metadata={"step": 1, "metrics": {"loss": 0.5}})
        Catalog(root).close()  # indexed c1
        cv.save(root / "run" / "c2", b, metadata={"step": 2, "metrics": {"loss": 0.25}})
        return {"a": a, "b": b}

    def operation(root: Path, ctx: dict[str, Any]) -> None:
        with Catalog(root) as catalog:  # syncs: indexes c2
            catalog.find("metrics.loss < 1", sort="metrics.loss")

    def check(root: Path, ctx: dict[str, Any], completed: bool) -> list[str]:
        names = ["run/c1", "run/c2"]
        return check_checkpoints(
            root, expected={"run/c1": [ctx["a"]], "run/c2": [ctx["b"]]}, must_exist=names, may_exist=names
        )

    def next_operation(root: Path, ctx: dict[str, Any]) -> None:
        with Catalog(root) as catalog:
            rows = catalog.find(sort="metrics.loss")
        assert [r.path for r in rows] == ["run/c2", "run/c1"], rows

    def after(root: Path, ctx: dict[str, Any]) -> list[str]:
        return check(root, ctx, True)

    return Case("catalog", build, operation, check, next_operation, after, kinds=WRITE_KINDS)


def registry_case() -> Case:
    def build(root: Path) -> dict[str, Any]:
        for i in (1, 2):
            cv.save(root / "run" / f"c{i}", state_of(i))
        Registry(root).register("model", root / "run" / "c1", alias="prod")
        return {}

    def operation(root: Path, ctx: dict[str, Any]) -> None:
        registry = Registry(root)
        registry.register("model", root / "run" / "c2", alias="candidate")
        registry.alias("model", 2, "prod", why="promoted")

    def check(root: Path, ctx: dict[str, Any], completed: bool) -> list[str]:
        problems = check_checkpoints(root, must_exist=["run/c1", "run/c2"], may_exist=["run/c1", "run/c2"])
        registry = Registry(root)
        try:
            doc = registry.show("model")
        except CheckpointError as exc:
            return [*problems, f"registry unreadable after the fault: {exc}"]
        versions = [v["version"] for v in doc["versions"]]
        if versions not in ([1], [1, 2]):
            problems.append(f"registry versions {versions}")
        pinned = registered_in(root / "run")
        for v in doc["versions"]:
            if v["checkpoint"].split("/")[-1] not in {p.split("/")[-1] for p in pinned}:
                problems.append(f"version {v['version']} ({v['checkpoint']}) registered but not pinned")
            if not cv.verify(registry.resolve("model", str(v["version"]))).ok:
                problems.append(f"version {v['version']} does not resolve to a verifying checkpoint")
        prod = registry.resolve("model", "prod").name
        if prod not in ("c1", "c2") or (prod == "c2" and versions != [1, 2]):
            problems.append(f"alias prod points at {prod} with versions {versions}")
        if completed and (versions != [1, 2] or prod != "c2"):
            problems.append("the change returned but is not recorded")
        return problems

    def next_operation(root: Path, ctx: dict[str, Any]) -> None:
        registry = Registry(root)
        if len(registry.show("model")["versions"]) < 2:
            registry.register("model", root / "run" / "c2", alias="candidate")
        registry.alias("model", 2, "prod", why="promoted again")

    def after(root: Path, ctx: dict[str, Any]) -> list[str]:
        problems = check(root, ctx, True)
        history = Registry(root).history("model")
        if not history:
            problems.append("empty registry history")
        return problems

    return Case("registry", build, operation, check, next_operation, after)


def restore_case() -> Case:
    def build(root: Path) -> dict[str, Any]:
        state = _small_train_state(0)
        with _manager(root) as manager:
            for _ in range(3):
                _train(state)
                manager.step(state)
        weights = state.parts["model"]["model"].weight.detach().clone()
        return {"weights": weights}

    def operation(root: Path, ctx: dict[str, Any]) -> Any:
        state = _small_train_state(7)
        with _manager(root) as manager:
            info = manager.restore(state)
        if info is None or info.step != 3 or state.step != 3:
            raise AssertionError(f"restored {info} / step {state.step} instead of step 3")
        if same_state(state.parts["model"]["model"].weight.detach(), ctx["weights"]):
            raise AssertionError("restored weights differ from the saved ones")

    def check(root: Path, ctx: dict[str, Any], completed: bool) -> list[str]:
        names = ["run/step_00000002", "run/step_00000003"]
        return check_checkpoints(root, must_exist=names, may_exist=names)

    def after(root: Path, ctx: dict[str, Any]) -> list[str]:
        return check(root, ctx, True) + _manager_view_problems(root)

    return Case("restore", build, operation, check, operation, after, kinds=ALL_KINDS)


def _reclaimable_leftovers(root: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Leftovers that would survive the next sweep. A staging or trash directory of this (live)
    process is kept by the sweep for a grace period (another thread of ours may have just created
    it); past that grace any save's sweep removes it, which is checked here by sweeping as if the
    grace had passed. Temporary files (``.NAME.*.tmp``) must never be left at all."""
    with monkeypatch.context() as patch:
        patch.setattr(local, "_UNLOCKED_GRACE_SECONDS", 0.0)
        for current, _dirs, _files in os.walk(root):
            local.sweep_staging(Path(current))
    return leftovers(root)


def next_operation_problems(
    case: Any, root: Path, ctx: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """Promise 4 for a fault-loop ``Case`` or a crash-replay case: the next operation succeeds, its
    own checks hold, nothing is left behind that a sweep would keep, the catalog equals a rebuild."""
    try:
        case.next_operation(root, ctx)
    except Exception as exc:
        return [f"the next operation failed: {type(exc).__name__}: {exc}"]
    problems: list[str] = case.check_after_next(root, ctx)
    problems += [f"leftover {p}" for p in _reclaimable_leftovers(root, monkeypatch)]
    if case.catalog:
        problems += check_catalog(root)
    return problems
