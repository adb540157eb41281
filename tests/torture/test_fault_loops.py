"""SQLite-style fault loops: every write path, a fault at operation 1, 2, 3, ... until it completes.

For each write path (save, save with O_DIRECT files, overwrite, async save, incremental save,
retention deletion through the manager, garbage collection, catalog update, registry change,
restore, the Lightning plugin's queued async saves and pruning) the loop first counts the path's
file operations, then re-runs it on a fresh copy of the same run with
:class:`ckptvault.testing.FaultInjector` failing operation N, for N = 1, 2, ... until a run
completes without reaching N. Modes: an I/O error once (a transient failure), an I/O error
at N and every operation after (the disk died), and a torn write (half the bytes, then the error).
The CI slice runs the first mode; ``make torture`` all three.

After every faulted run, the promises of :mod:`ckptvault.testing.invariants`:

* the operation either completed or raised a typed ``CheckpointError`` (a raw ``OSError`` escaping
  is a bug), and when it *returned normally* its result is fully there (a swallowed fsync failure
  reported as success would show up here);
* only complete checkpoints are visible; everything committed before is intact (an overwrite
  holds exactly the old or exactly the new state);
* the catalog equals a rebuild;
* the next operation (the path again, without faults) succeeds, and afterwards no staging or
  temporary file is left that a sweep would not reclaim.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

from ckptvault.errors import CheckpointError
from ckptvault.testing import FaultInjector, InjectedFault
from ckptvault.testing.invariants import check_catalog

from .conftest import Figures, pick
from .fault_cases import (
    Case,
    catalog_case,
    distributed_save_case,
    gc_case,
    manager_async_case,
    next_operation_problems,
    overwrite_case,
    registry_case,
    restore_case,
    retention_case,
    save_case,
)
from .fault_cases_queue import lightning_queue_case

# (action, persistent) per scale
MODES = pick([("error", False)], [("error", False), ("error", True), ("torn", False)])

CASES = [
    save_case("save"),
    save_case("save_direct", big=True),
    overwrite_case(),
    save_case("async_save", use_async=True),
    save_case("incremental", incremental=True),
    distributed_save_case("distributed_save"),
    distributed_save_case("distributed_incremental", incremental=True),
    retention_case(),
    manager_async_case(),
    gc_case(),
    catalog_case(),
    registry_case(),
    restore_case(),
    lightning_queue_case(),
]

# --------------------------------------------------------------------------- the loop


def _fresh(template: Path, work: Path) -> Path:
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(template, work, symlinks=True)
    return work


def _typed(error: BaseException) -> bool:
    """A typed error: a CheckpointError (the library's own), or an assertion of the case itself."""
    return isinstance(error, (CheckpointError, AssertionError)) and not isinstance(error, InjectedFault)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault_at_every_operation(
    case: Case, tmp_path: Path, figures: Figures, monkeypatch: pytest.MonkeyPatch
) -> None:
    template = tmp_path / "template"
    template.mkdir()
    ctx = case.build(template)
    work = _fresh(template, tmp_path / "count")
    with FaultInjector(work, kinds=case.kinds) as counter:
        case.operation(work, ctx)
    total = counter.count
    assert total > 0, f"{case.name}: no file operation counted"
    figures.add(f"fault_loops.{case.name}.operations", total)

    failures: list[str] = []
    for action, persistent in MODES:
        mode = f"{action}{' persistent' if persistent else ''}"
        n = 0
        while True:
            n += 1
            assert n <= 3 * total + 20, f"{case.name}: the loop does not end (n={n}, {total} operations)"
            work = _fresh(template, tmp_path / "work")
            error: BaseException | None = None
            with FaultInjector(
                work, fail_at=n, action=action, persistent=persistent, kinds=case.kinds, errno=errno.EIO
            ) as injector:
                try:
                    case.operation(work, ctx)
                except Exception as exc:  # judged below: it must be typed
                    error = exc
            if injector.fired == 0:
                assert error is None, f"{case.name}: failed without a fault: {error!r}"
                break
            where = f"{case.name} [{mode}] fault at op {n}"
            figures.add("fault_loops.faults_injected")
            if error is not None and not _typed(error):
                failures.append(f"{where}: untyped {type(error).__name__}: {error}")
            problems = case.check(work, ctx, error is None)
            if case.catalog:
                problems += check_catalog(work)
            problems += next_operation_problems(case, work, ctx, monkeypatch)
            failures += [f"{where}: {p}" for p in problems]
            if not problems:
                figures.add("fault_loops.nothing_lost_checks")
        figures.add(f"fault_loops.{case.name}.points", n - 1)
    assert not failures, "\n".join(failures[:40])
