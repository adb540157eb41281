"""A run's trajectory: its metric curves and what became of every checkpoint it committed.

Why a module of its own: this is the data every picture and the HTML report draw, and it needs no
plotting stack (matplotlib is imported only by :mod:`ckptvault.report_plots`). It reads only what
runs already leave behind, so it works on a live run, on a finished one and on a copy of one
without the process that wrote it:

* the curves come from the newest full checkpoint's ``metrics_history`` (every recorded step, read
  lazily: only those few tensors), else from the commit events' metrics, else from the checkpoints'
  metadata;
* every checkpoint ever committed is marked by what happened to it: kept, deleted (from the event
  log ``.ckptvault-events.jsonl``), best (by the monitor recorded in ``run.json``), pinned
  (``pins.json`` or a registry), registered (``.ckptvault-registered.json``) and failed validation
  (``.ckptvault-validation/<name>.json``);
* the report joins the catalog (every checkpoint under a root), the runs' ``run.json`` and the
  registry.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import api
from .catalog.registry import registered_in
from .engine.manifests import read_manifest
from .engine.rundir import RunDirectory
from .errors import CheckpointError
from .policy.metrics import finite_metrics
from .policy.records import best_of
from .training.history import MetricsHistory
from .training.state import FULL, WEIGHTS

KEPT = "kept"
DELETED = "deleted"
BEST = "best"
PINNED = "pinned"
REGISTERED = "registered"
FAILED = "failed validation"
STATUSES = (KEPT, DELETED, BEST, PINNED, REGISTERED, FAILED)


class ReportError(CheckpointError):
    """A picture or report cannot be made: not a run, an unknown metric, matplotlib missing."""


# -- what happened in a run -------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointMark:
    """One checkpoint ever committed in a run, with what became of it."""

    name: str
    step: int
    scope: str
    statuses: frozenset[str]
    metrics: Mapping[str, float]


@dataclass
class Trajectory:
    """A run's metric curves and checkpoint marks (what ``plot`` draws)."""

    run_dir: Path
    run_id: str | None
    source: str  # where the curves came from, for the picture's subtitle
    curves: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    marks: list[CheckpointMark] = field(default_factory=list)
    monitor: str | None = None

    def metric_names(self) -> list[str]:
        return sorted(self.curves)


def _scope_of(name: str, metadata: Mapping[str, Any] | None = None) -> str:
    scope = metadata.get("scope") if metadata else None
    if isinstance(scope, str):
        return scope
    return WEIGHTS if name.startswith("weights_") else FULL


def _plottable_step(step: Any) -> bool:
    """A step an axis can place: an int in int64 (a manifest may declare 10**4000)."""
    return isinstance(step, int) and not isinstance(step, bool) and 0 <= step < 2**63


def _committed_names(run: RunDirectory) -> list[str]:
    """Committed checkpoints of the run, whatever their names (any directory of checkpoints can be
    plotted); hidden ones are staging or trash, links are never listed."""
    try:
        entries = run.storage.list(run.path)
    except OSError:
        return []
    return sorted(e.name for e in entries if e.kind == "checkpoint" and not e.name.startswith("."))


def _failed(run: RunDirectory, name: str, checkpoint_id: str | None, committed_at: float | None) -> bool:
    """Whether the recorded validation of this very checkpoint failed.

    A result belongs to an existing checkpoint only when its ``checkpoint_id`` matches (a name is
    reused after an overwrite); a deleted checkpoint's id is unknown, so its result counts when it
    was written after the last commit of that name.
    """
    result = run.read_validation(name)
    if result is None or result.get("passed") is not False:
        return False
    if checkpoint_id is not None:
        return bool(result.get("checkpoint_id") == checkpoint_id)
    finished = result.get("finished_at")
    return committed_at is None or (isinstance(finished, (int, float)) and finished >= committed_at)


def _best_kept(candidates: list[CheckpointMark], monitor: str, mode: str) -> CheckpointMark | None:
    kept = [m for m in candidates if KEPT in m.statuses and FAILED not in m.statuses]
    newest_first = sorted(kept, key=lambda m: m.step, reverse=True)  # a tie goes to the newer
    return best_of(newest_first, lambda m: m.metrics.get(monitor), mode)


def _best_names(marks: Iterable[CheckpointMark], scopes: Mapping[str, Any]) -> set[str]:
    """The best kept, not-failed checkpoint of each scope by its monitor (the manager's choice)."""
    best: set[str] = set()
    by_scope: dict[str, list[CheckpointMark]] = {}
    for mark in marks:
        by_scope.setdefault(mark.scope, []).append(mark)
    for scope, candidates in by_scope.items():
        settings = scopes.get(scope)
        if not isinstance(settings, dict) or not isinstance(settings.get("monitor"), str):
            continue
        winner = _best_kept(candidates, settings["monitor"], str(settings.get("mode")))
        if winner is not None:
            best.add(winner.name)
    return best


def _history_of(run_dir: Path, marks: Sequence[CheckpointMark]) -> tuple[MetricsHistory, str] | None:
    """The metrics history saved in the newest readable full checkpoint (tried newest first)."""
    candidates = sorted(
        (m for m in marks if KEPT in m.statuses and m.scope == FULL),
        key=lambda m: (FAILED not in m.statuses, m.step),
        reverse=True,
    )
    for mark in candidates[:3]:  # a damaged newest one falls back to an older one, within reason
        try:
            with api.open(run_dir / mark.name) as view:
                names = view.keys()  # the root's keys: a view has no `in` of its own
                if "metrics_history" not in names:
                    continue
                tree = view["metrics_history"]
                history = MetricsHistory.from_tree(tree.load() if hasattr(tree, "load") else tree)
        except (CheckpointError, KeyError, TypeError, ValueError, OSError):
            continue
        if len(history):
            return history, f"metrics history of {mark.name}"
    return None


def trajectory(run_dir: str | os.PathLike[str]) -> Trajectory:
    """Everything ``plot`` draws for a run directory (a CheckpointManager run or any directory of
    checkpoints); raises :class:`ReportError` when it holds neither checkpoints nor events."""
    root = Path(run_dir)
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory")
    directory = RunDirectory(root)
    run = directory.read_run_or_empty()
    events = directory.read_events()  # damaged lines (not UTF-8, not JSON) are skipped
    existing = _committed_names(directory)
    if not existing and not any(e.get("event") == "commit" for e in events):
        raise ReportError(f"{root}: no checkpoints and no commit events: not a run directory")

    # The last commit of each name (a name is committed again after a resume). Whether it still
    # exists is the directory's word, not the log's: a delete event is written before the rename
    # that could fail, and a checkpoint deleted by hand leaves no event at all.
    commits: dict[str, dict[str, Any]] = {}
    for event in events:
        name = event.get("name")
        if isinstance(name, str) and _plottable_step(event.get("step")) and event.get("event") == "commit":
            commits[name] = event

    try:
        pins = directory.read_pins()
    except CheckpointError:  # damaged: the report shows no pins rather than failing
        pins = set()
    try:
        registered = registered_in(root)
    except CheckpointError:  # a damaged pin list: the report shows no pins rather than failing
        registered = set()
    marks: list[CheckpointMark] = []
    for name in sorted(set(existing) | set(commits)):
        statuses: set[str] = set()
        commit = commits.get(name, {})
        committed_at = commit.get("time") if isinstance(commit.get("time"), (int, float)) else None
        if name in existing:
            try:
                manifest, metadata = read_manifest(directory.storage, directory.key(name))
            except (CheckpointError, OSError, ValueError):
                continue  # damaged or unreadable now: not a checkpoint anyone can load
            if not _plottable_step(manifest.step):
                continue  # a step no axis can hold: hostile, left out of the picture
            step, scope, checkpoint_id = manifest.step, _scope_of(name, metadata), manifest.checkpoint_id
            metrics = finite_metrics(metadata.get("metrics")) or finite_metrics(commit.get("metrics"))
            statuses.add(KEPT)
        else:
            step, scope, checkpoint_id = int(commit["step"]), _scope_of(name), None
            metrics = finite_metrics(commit.get("metrics"))
            statuses.add(DELETED)
        if _failed(directory, name, checkpoint_id, committed_at):
            statuses.add(FAILED)
        if KEPT in statuses and name in registered:  # pins and registrations protect what exists
            statuses.update((REGISTERED, PINNED))
        if KEPT in statuses and step in pins:
            statuses.add(PINNED)
        marks.append(CheckpointMark(name, step, scope, frozenset(statuses), metrics))

    scopes = run.get("scopes") if isinstance(run.get("scopes"), dict) else {}
    best = _best_names(marks, scopes or {})
    marks = [
        CheckpointMark(m.name, m.step, m.scope, m.statuses | {BEST}, m.metrics) if m.name in best else m
        for m in marks
    ]
    marks.sort(key=lambda m: (m.step, m.scope, m.name))
    full = scopes.get(FULL) if isinstance(scopes, dict) else None
    monitor = full.get("monitor") if isinstance(full, dict) else None

    points: dict[str, dict[int, float]] = {}
    found = _history_of(root, marks)
    last_history_step = -1
    if found is not None:
        history, source = found
        for row in history.rows():
            for key, value in row.items():
                if key not in ("step", "epoch") and math.isfinite(value):
                    points.setdefault(key, {})[int(row["step"])] = float(value)
            last_history_step = max(last_history_step, int(row["step"]))
    else:
        source = "commit events" if commits else "checkpoint metadata"
    # Checkpoints after the newest full one (weights-only saves, a crash before the next full one)
    # still extend the curves with the metrics they recorded.
    for mark in marks:
        if mark.step > last_history_step:
            for key, value in mark.metrics.items():
                points.setdefault(key, {}).setdefault(mark.step, value)
    curves = {
        key: ([s for s in sorted(by_step)], [by_step[s] for s in sorted(by_step)])
        for key, by_step in points.items()
        if by_step
    }
    run_id = run.get("run_id")
    return Trajectory(
        run_dir=root,
        run_id=str(run_id) if run_id is not None else None,
        source=source,
        curves=curves,
        marks=marks,
        monitor=monitor if isinstance(monitor, str) else None,
    )
