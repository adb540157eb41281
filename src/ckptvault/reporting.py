"""Pictures of runs: a run's training trajectory as a PNG and a tree of runs as one HTML page.

Both read only what runs already leave behind, so they work on a live run, on a finished one and
on a copy of one without the process that wrote it:

* the curves come from the newest full checkpoint's ``metrics_history`` (every recorded step, read
  lazily: only those few tensors), else from the commit events' metrics, else from the checkpoints'
  metadata;
* every checkpoint ever committed is marked by what happened to it: kept, deleted (from the event
  log ``.ckptvault-events.jsonl``), best (by the monitor recorded in ``run.json``), pinned
  (``pins.json`` or a registry), registered (``.ckptvault-registered.json``) and failed validation
  (``.ckptvault-validation/<name>.json``);
* the report joins the catalog (every checkpoint under a root), the runs' ``run.json`` and the
  registry.

matplotlib is an optional dependency (``pip install 'ckptvault[plots]'``): checkpointing must not
pull in a plotting stack. It is imported only when a picture is drawn, and only through its Agg
canvas and ``Figure`` (never pyplot): no display is needed, no global figure state is touched, and
with matplotlib's default style and no timestamps the same run gives the same PNG bytes.

The HTML report itself is :mod:`ckptvault.report_html`. Text from the data drawn into a picture
(metric names, run names) has its control, bidi and surrogate characters spelled out
(:func:`ckptvault.visible.visible_str`). A checkpoint whose values no picture can hold (a step or
metric beyond any float) is left out of the curves like a damaged one.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import api
from .catalog.registry import registered_in
from .catalog.store import CatalogRow, read_manifest
from .config import MANIFEST_NAME
from .errors import CheckpointError
from .manager import load_pins, read_events
from .training.history import MetricsHistory, as_number
from .training.state import FULL, WEIGHTS
from .validation import read_result
from .visible import visible

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOTS_INSTALL_HINT = "pip install 'ckptvault[plots]'"

KEPT = "kept"
DELETED = "deleted"
BEST = "best"
PINNED = "pinned"
REGISTERED = "registered"
FAILED = "failed validation"
STATUSES = (KEPT, DELETED, BEST, PINNED, REGISTERED, FAILED)

MAX_SUBPLOTS = 16  # more metrics than this make unreadable strips; --metric picks others


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


def _finite_metrics(metrics: Any) -> dict[str, float]:
    """Numeric, finite metric values only: a NaN or inf has no place on a curve."""
    if not isinstance(metrics, Mapping):
        return {}
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            number = as_number(value)
        except OverflowError:  # an integer beyond any float: no place on a curve either
            continue
        if number is not None and math.isfinite(number):
            out[str(key)] = number
    return out


def _plottable_step(step: Any) -> bool:
    """A step an axis can place: an int in int64 (a manifest may declare 10**4000)."""
    return isinstance(step, int) and not isinstance(step, bool) and 0 <= step < 2**63


def _read_run_json(run_dir: Path) -> dict[str, Any]:
    try:
        doc = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _committed_names(run_dir: Path) -> list[str]:
    """Checkpoint directories of the run that have a manifest (hidden ones are staging or trash)."""
    names = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(run_dir):
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            if (Path(entry.path) / MANIFEST_NAME).is_file():
                names.append(entry.name)
    return sorted(names)


def _failed(run_dir: Path, name: str, checkpoint_id: str | None, committed_at: float | None) -> bool:
    """Whether the recorded validation of this very checkpoint failed.

    A result belongs to an existing checkpoint only when its ``checkpoint_id`` matches (a name is
    reused after an overwrite); a deleted checkpoint's id is unknown, so its result counts when it
    was written after the last commit of that name.
    """
    result = read_result(run_dir / name)
    if result is None or result.get("passed") is not False:
        return False
    if checkpoint_id is not None:
        return bool(result.get("checkpoint_id") == checkpoint_id)
    finished = result.get("finished_at")
    return committed_at is None or (isinstance(finished, (int, float)) and finished >= committed_at)


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
        monitor: str = settings["monitor"]
        sign = -1.0 if settings.get("mode") == "max" else 1.0
        scored = [
            m for m in candidates if KEPT in m.statuses and FAILED not in m.statuses and monitor in m.metrics
        ]
        if scored:
            best.add(min(scored, key=lambda m: (sign * m.metrics[monitor], -m.step)).name)
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
    run = _read_run_json(root)
    try:
        events = read_events(root)
    except ValueError:  # an event log that is not UTF-8: the directory's checkpoints still count
        events = []
    existing = _committed_names(root)
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
        pins = load_pins(root)
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
                manifest, metadata = read_manifest(root / name)
            except (CheckpointError, OSError, ValueError):
                continue  # damaged or unreadable now: not a checkpoint anyone can load
            if not _plottable_step(manifest.step):
                continue  # a step no axis can hold: hostile, left out of the picture
            step, scope, checkpoint_id = manifest.step, _scope_of(name, metadata), manifest.checkpoint_id
            metrics = _finite_metrics(metadata.get("metrics")) or _finite_metrics(commit.get("metrics"))
            statuses.add(KEPT)
        else:
            step, scope, checkpoint_id = int(commit["step"]), _scope_of(name), None
            metrics = _finite_metrics(commit.get("metrics"))
            statuses.add(DELETED)
        if _failed(root, name, checkpoint_id, committed_at):
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


# -- drawing ----------------------------------------------------------------------------------------
def _require_matplotlib() -> None:
    """Imports matplotlib, or raises a ReportError that says how to install it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ReportError(f"pictures need matplotlib ({exc.name} is missing): {PLOTS_INSTALL_HINT}") from exc


# Marker of each status: (label, marker, size, face colour, edge colour, z-order). A checkpoint has
# one base mark (kept or deleted) and an overlay for each other status, so combinations stay legible.
_STYLE: dict[str, tuple[str, str, float, str, str, int]] = {
    KEPT: ("kept", "o", 36, "#1f77b4", "#1f77b4", 4),
    DELETED: ("deleted", "o", 36, "none", "#8c8c8c", 3),
    BEST: ("best (monitor)", "*", 260, "#ffbf00", "#7a5c00", 2),
    PINNED: ("pinned", "s", 150, "none", "#2ca02c", 5),
    REGISTERED: ("registered", "D", 230, "none", "#9467bd", 5),
    FAILED: ("failed validation", "X", 110, "#d62728", "#ffffff", 6),
}


def _text(value: str, limit: int = 90) -> str:
    """Text from the data, shown as is: a ``$`` would otherwise start matplotlib's math mode (and an
    unbalanced one fails the whole picture); acting characters spelled out; cut to fit the picture."""
    return visible(value, limit).replace("$", r"\$")


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    # No "Software" text chunk: the same data gives the same bytes whatever wrote them.
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _mark_y(mark: CheckpointMark, metric: str, steps: list[int], values: list[float]) -> float | None:
    """Where a checkpoint sits on a metric's curve: its own value, else the curve at its step."""
    value = mark.metrics.get(metric)
    if value is not None:
        return value
    if not steps or mark.step < steps[0] or mark.step > steps[-1]:
        return None
    for i, step in enumerate(steps):  # linear interpolation; steps are sorted
        if step == mark.step:
            return values[i]
        if step > mark.step:
            s0, v0 = steps[i - 1], values[i - 1]
            return v0 + (values[i] - v0) * (mark.step - s0) / (step - s0)
    return None


def plot_png(traj: Trajectory, metrics: Sequence[str] | None = None, *, title: str | None = None) -> bytes:
    """The trajectory as PNG bytes: one subplot per metric against step, checkpoints marked.

    ``metrics`` picks and orders the subplots (:class:`ReportError` for a name the run never
    recorded); by default every metric, at most 16. A run without metrics gets one strip with its
    checkpoints on a timeline, so the picture still shows what was kept and deleted.
    """
    _require_matplotlib()
    import matplotlib.lines
    import matplotlib.style
    import matplotlib.ticker
    import matplotlib.transforms
    from matplotlib.figure import Figure

    available = traj.metric_names()
    if metrics:
        unknown = [m for m in metrics if m not in traj.curves]
        if unknown:
            raise ReportError(
                f"{traj.run_dir}: no metric {', '.join(map(repr, unknown))}; "
                f"recorded: {', '.join(available) or 'none'}"
            )
        names = list(dict.fromkeys(metrics))
    else:
        names = available[:MAX_SUBPLOTS]
    with matplotlib.style.context("default"):
        rows = max(1, len(names))
        figure = Figure(figsize=(9.0, 1.0 + 2.3 * rows), layout="constrained")
        axes = figure.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
        present: set[str] = set()
        for index, axis in enumerate(axes):
            metric = names[index] if names else None
            if metric is not None:
                steps, values = traj.curves[metric]
                axis.plot(steps, values, color="#555555", linewidth=1.2, zorder=1)
                label = metric + ("  (monitor)" if metric == traj.monitor else "")
                axis.set_ylabel(_text(label, 40))
            else:
                steps, values = [], []
                axis.set_yticks([])
                axis.set_ylabel("checkpoints")
            # A checkpoint with no value on this curve (outside its steps, or a metric it never
            # recorded) sits on the bottom edge at its step, so every checkpoint is on every strip.
            edge_of_axis = matplotlib.transforms.blended_transform_factory(axis.transData, axis.transAxes)
            for status in STATUSES:
                on_curve: tuple[list[float], list[float]] = ([], [])
                on_edge: tuple[list[float], list[float]] = ([], [])
                for mark in traj.marks:
                    if status not in mark.statuses:
                        continue
                    y = 0.5 if metric is None else _mark_y(mark, metric, steps, values)
                    target = on_curve if y is not None and metric is not None else on_edge
                    target[0].append(mark.step)
                    target[1].append(0.5 if metric is None else 0.0 if y is None else y)
                label, marker, size, face, edge, z = _STYLE[status]
                style = {"s": size, "marker": marker, "facecolors": face, "edgecolors": edge}
                if on_curve[0]:
                    axis.scatter(*on_curve, **style, linewidths=1.3, zorder=z)
                if on_edge[0]:
                    axis.scatter(
                        *on_edge, **style, linewidths=1.3, zorder=z, transform=edge_of_axis, clip_on=False
                    )
                if on_curve[0] or on_edge[0]:
                    present.add(status)
            axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            axis.grid(True, color="#e5e5e5", linewidth=0.8)
        axes[-1].set_xlabel("step")
        # Marks on the bottom edge do not widen the autoscaled range: span every step explicitly.
        every_step = [m.step for m in traj.marks] + [x for name in names for x in traj.curves[name][0]]
        if every_step:
            low, high = min(every_step), max(every_step)
            pad = max(0.5, 0.03 * (high - low))
            axes[-1].set_xlim(low - pad, high + pad)
        heading = title or f"{traj.run_dir.name}" + (f"  (run {traj.run_id})" if traj.run_id else "")
        figure.suptitle(_text(heading) + "\n" + _text(f"curves from {traj.source}"), fontsize=10)
        handles = []
        for status in STATUSES:
            if status in present:
                label, marker, size, face, edge, _z = _STYLE[status]
                handles.append(
                    matplotlib.lines.Line2D(
                        [],
                        [],
                        linestyle="none",
                        marker=marker,
                        markersize=math.sqrt(size),
                        markerfacecolor=face,
                        markeredgecolor=edge,
                        label=label,
                    )
                )
        if handles:
            figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=9)
        return _png(figure)


def storage_png(rows: Sequence[CatalogRow]) -> bytes:
    """Cumulative bytes of the kept checkpoints by creation time, one line per run (and a total)."""
    _require_matplotlib()
    import matplotlib.dates
    import matplotlib.style
    from matplotlib.figure import Figure

    by_run: dict[str, list[tuple[datetime, int]]] = {}
    for row in rows:
        if not isinstance(row.created_at, str) or type(row.size_bytes) is not int:
            continue  # a catalog row of the wrong types (the file is not trusted): not on the axis
        with contextlib.suppress(ValueError):
            when = datetime.fromisoformat(row.created_at.replace("Z", "+00:00"))
            if when.tzinfo is not None:  # UTC without a zone: comparable, and what numpy takes
                when = when.astimezone(timezone.utc).replace(tzinfo=None)
            by_run.setdefault(row.run_dir, []).append((when, row.size_bytes))
    everything = sorted(p for points in by_run.values() for p in points)
    peak = max(sum(size for _t, size in everything), 1)
    unit, scale = next(
        (u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("bytes", 1)) if peak >= s
    )
    with matplotlib.style.context("default"):
        figure = Figure(figsize=(9.0, 3.6), layout="constrained")
        axis = figure.subplots()
        series = sorted(by_run.items())
        if len(series) > 1:
            series.append(("all runs", everything))
        for label, points in series:
            points = sorted(points)
            if not points:
                continue
            total, ys = 0, []
            for _when, size in points:
                total += size
                ys.append(total / scale)
            xs = np.array([when for when, _size in points], dtype="datetime64[us]")
            if label == "all runs":  # the sum, drawn so the runs under it stay visible
                axis.step(xs, ys, where="post", color="#444444", linestyle="--", linewidth=1, label=label)
            else:
                axis.step(xs, ys, where="post", marker="o", markersize=3, label=_text(label or "."))
        axis.set_ylabel(f"kept checkpoints ({unit})")
        axis.set_xlabel("created (UTC)")
        # The date locator the plotted datetimes installed; concise labels for it (no repeated year).
        locator = axis.xaxis.get_major_locator()
        formatter = matplotlib.dates.ConciseDateFormatter(locator)  # type: ignore[no-untyped-call]
        axis.xaxis.set_major_formatter(formatter)
        axis.grid(True, color="#e5e5e5", linewidth=0.8)
        if series:
            axis.legend(fontsize=8, loc="upper left")
        return _png(figure)


def write_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """Replaces ``path`` in one rename: a reader (a browser reloading) never sees half a file."""
    target = Path(path)
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        temp.write_bytes(data)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
