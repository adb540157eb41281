"""The promises a fault must not break, as checks a test can run on any directory of runs.

After any failure -- an injected I/O error, a killed process, a replayed power cut -- the tree must
satisfy, in the words of the reliability document:

1. **only complete checkpoints are visible**: every checkpoint ``list_checkpoints`` finds verifies
   and loads;
2. **nothing committed before is harmed**: every checkpoint committed before the operation is still
   there (unless the operation was deleting it) and still holds what it held (or, for an overwrite,
   exactly the old or exactly the new state -- never a mix);
3. **the catalog equals a rebuild**: syncing the catalog gives the rows a rebuild from the manifests
   gives;
4. **the next operation succeeds** (the caller runs it) and leaves no staging leftovers.

Each check returns a list of problems (empty: kept), so a loop can report every broken promise of a
case at once instead of the first.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..api import list_checkpoints, load, verify
from ..catalog.store import Catalog
from ..errors import CheckpointError
from ..storage.local import STAGING_MARK
from ..training.state_compare import first_difference as same_state


def visible_checkpoints(root: str | os.PathLike[str]) -> list[str]:
    """Committed checkpoints under ``root``, relative to it, sorted."""
    base = Path(root)
    return sorted(os.path.relpath(p, base) for p in list_checkpoints(base))


def check_checkpoints(
    root: str | os.PathLike[str],
    *,
    expected: Mapping[str, Sequence[Any]] | None = None,
    must_exist: Iterable[str] = (),
    may_exist: Iterable[str] | None = None,
) -> list[str]:
    """Promises 1 and 2. ``expected`` maps a checkpoint (relative path) to the states it may hold
    (one, or old and new for an overwrite); ``must_exist`` names checkpoints that must be visible;
    ``may_exist`` (when given) is everything that is allowed to be visible."""
    base = Path(root)
    problems: list[str] = []
    visible = visible_checkpoints(base)
    for name in must_exist:
        if name not in visible:
            problems.append(f"{name}: committed before, no longer visible")
    if may_exist is not None:
        allowed = set(may_exist)
        problems += [f"{name}: visible but never committed" for name in visible if name not in allowed]
    for name in visible:
        path = base / name
        try:
            report = verify(path)
        except CheckpointError as exc:
            problems.append(f"{name}: visible but verify raised {type(exc).__name__}: {exc}")
            continue
        if not report.ok:
            problems.append(f"{name}: visible but does not verify: {report.problems}")
            continue
        if expected is None or name not in expected:
            continue
        try:
            state = load(path)
        except CheckpointError as exc:
            problems.append(f"{name}: verifies but load raised {type(exc).__name__}: {exc}")
            continue
        differences = [same_state(state, want) for want in expected[name]]
        if all(differences):
            problems.append(f"{name}: holds none of the expected states ({differences[0]})")
    return problems


def _rows(root: Path, *, rebuild: bool) -> list[str]:
    with Catalog(root) as catalog:
        if rebuild:
            catalog.rebuild()
        rows = catalog.find()
    return sorted(json.dumps(row.as_dict(), sort_keys=True, default=str) for row in rows)


def check_catalog(root: str | os.PathLike[str]) -> list[str]:
    """Promise 3: the synced catalog lists exactly what a rebuild from the manifests lists."""
    base = Path(root)
    try:
        synced = _rows(base, rebuild=False)
        rebuilt = _rows(base, rebuild=True)
    except CheckpointError as exc:
        return [f"catalog: {type(exc).__name__}: {exc}"]
    if synced == rebuilt:
        return []
    only_synced = sorted(set(synced) - set(rebuilt))[:3]
    only_rebuilt = sorted(set(rebuilt) - set(synced))[:3]
    return [f"catalog differs from a rebuild: only synced {only_synced}, only rebuilt {only_rebuilt}"]


_TEMP_FILE = re.compile(r"^\..+\.tmp$")


def leftovers(root: str | os.PathLike[str]) -> list[str]:
    """Staging and deletion leftovers (anything carrying the staging mark) and the temporary files
    of atomic JSON writes (``.NAME.<token>.tmp``) -- neither may outlive the next operation."""
    found = []
    for current, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if STAGING_MARK in name or (name in filenames and _TEMP_FILE.match(name)):
                found.append(os.path.relpath(os.path.join(current, name), root))
    return sorted(found)
