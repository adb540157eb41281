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

The report is ONE file with no network access (inline CSS, inline JS, PNGs as ``data:`` URIs). Every
value from the data (checkpoint names, metric names, tags, config, aliases) passes ``html.escape``;
a Content-Security-Policy that allows only the report's own script (by hash) is a second line of
defence should anything ever slip through.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import io
import json
import math
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import api
from .catalog.registry import Registry, RegistryError, registered_in
from .catalog.store import Catalog, CatalogRow, read_manifest
from .config import MANIFEST_NAME
from .errors import CheckpointError
from .manager import load_pins, read_events
from .training.history import MetricsHistory, as_number
from .training.state import FULL, WEIGHTS
from .validation import read_result

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
_MAX_METRIC_COLUMNS = 12  # beyond this, the report's table puts the rest in one column


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
        number = as_number(value)
        if number is not None and math.isfinite(number):
            out[str(key)] = number
    return out


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
    events = read_events(root)
    existing = _committed_names(root)
    if not existing and not any(e.get("event") == "commit" for e in events):
        raise ReportError(f"{root}: no checkpoints and no commit events: not a run directory")

    # The last commit of each name (a name is committed again after a resume). Whether it still
    # exists is the directory's word, not the log's: a delete event is written before the rename
    # that could fail, and a checkpoint deleted by hand leaves no event at all.
    commits: dict[str, dict[str, Any]] = {}
    for event in events:
        name = event.get("name")
        if isinstance(name, str) and isinstance(event.get("step"), int) and event.get("event") == "commit":
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


def _text(value: str) -> str:
    """Text from the data, shown as is: a ``$`` would otherwise start matplotlib's math mode (and an
    unbalanced one fails the whole picture)."""
    return value.replace("$", r"\$")


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
                axis.set_ylabel(_text(label))
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
        figure.suptitle(_text(f"{heading}\ncurves from {traj.source}"), fontsize=10)
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


# -- the HTML report -----------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.6g}"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _tags(catalog: Catalog) -> dict[str, dict[str, str]]:
    """Tags per checkpoint path. The catalog's rows do not carry them, so its database is read
    directly (read-only); a catalog without them (another schema) just shows none."""
    tags: dict[str, dict[str, str]] = {}
    try:
        db = sqlite3.connect(f"{catalog.path.as_uri()}?mode=ro", uri=True)
        try:
            for path, key, value in db.execute(
                "SELECT c.path, t.key, t.value FROM tags t JOIN checkpoints c ON c.id = t.checkpoint"
            ):
                tags.setdefault(str(path), {})[str(key)] = "" if value is None else str(value)
        finally:
            db.close()
    except sqlite3.Error:
        return {}
    return tags


@dataclass(frozen=True)
class _Registered:
    model: str
    version: int
    checkpoint: str
    step: Any
    aliases: tuple[str, ...]


def _registry(root: Path) -> tuple[list[_Registered], list[str]]:
    """Every registered version with its aliases, and the problems met reading the registry."""
    registry = Registry(root)
    entries: list[_Registered] = []
    problems: list[str] = []
    for name in registry.names():
        try:
            doc = registry.show(name)
        except RegistryError as exc:
            problems.append(str(exc))
            continue
        aliases = doc.get("aliases") if isinstance(doc.get("aliases"), dict) else {}
        for version in doc["versions"]:
            if not isinstance(version, dict) or not isinstance(version.get("version"), int):
                continue
            number = version["version"]
            entries.append(
                _Registered(
                    model=name,
                    version=number,
                    checkpoint=str(version.get("checkpoint", "")),
                    step=version.get("step"),
                    aliases=tuple(sorted(a for a, v in (aliases or {}).items() if v == number)),
                )
            )
    return entries, problems


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1400px;
padding:0 1em;color:#222}
h1{font-size:1.5em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #eee;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f6f6f6;position:sticky;top:0}
table.sortable th{cursor:pointer;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right}tr[hidden]{display:none}
.failed{color:#b00020;font-weight:bold}.ok{color:#1a7f37}.muted{color:#888}
.alias{background:#efe7fb;border-radius:3px;padding:0 .3em;white-space:nowrap}
input#filter{font:inherit;padding:.3em .5em;width:28em}
img{max-width:100%;height:auto;border:1px solid #eee}
pre{margin:0;white-space:pre-wrap;max-width:50em}
#checkpoints td{white-space:nowrap}.scroll{overflow-x:auto}
code{font-size:.92em}
"""

# The report's only script. No data is ever placed in it (the data is in the escaped HTML), so its
# hash is fixed and the Content-Security-Policy can allow exactly it.
_JS = """
(function () {
  "use strict";
  var table = document.getElementById("checkpoints");
  if (!table) { return; }
  var body = table.tBodies[0];
  var input = document.getElementById("filter");
  var shown = document.getElementById("shown");
  var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
  function key(row, index, numeric) {
    var cell = row.cells[index];
    var raw = cell.getAttribute("data-v");
    if (numeric) { return raw === null || raw === "" ? NaN : parseFloat(raw); }
    return (raw === null ? cell.textContent : raw).toLowerCase();
  }
  function sortBy(index, descending) {
    var numeric = headers[index].getAttribute("data-type") === "num";
    var sign = descending ? -1 : 1;
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a, index, numeric), y = key(b, index, numeric);
      if (numeric) {
        if (isNaN(x) || isNaN(y)) { return isNaN(x) === isNaN(y) ? 0 : (isNaN(x) ? 1 : -1); }
        return (x - y) * sign;
      }
      return x < y ? -sign : (x > y ? sign : 0);
    });
    rows.forEach(function (row) { body.appendChild(row); });
    headers.forEach(function (th, i) {
      if (i === index) { th.setAttribute("aria-sort", descending ? "descending" : "ascending"); }
      else { th.removeAttribute("aria-sort"); }
    });
  }
  function filter(text) {
    var needle = text.trim().toLowerCase();
    var visible = 0;
    Array.prototype.forEach.call(body.rows, function (row) {
      var match = needle === "" || row.textContent.toLowerCase().indexOf(needle) !== -1;
      row.hidden = !match;
      if (match) { visible += 1; }
    });
    shown.textContent = visible + " of " + body.rows.length + " checkpoints shown";
  }
  function fromFragment() {
    var params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    var sort = params.get("sort");
    if (sort) {
      var descending = sort.charAt(0) === "-";
      var name = descending ? sort.slice(1) : sort;
      headers.forEach(function (th, i) {
        if (th.getAttribute("data-key") === name) { sortBy(i, descending); }
      });
    }
    var text = params.get("filter");
    if (text !== null) { input.value = text; }
    filter(input.value);
  }
  headers.forEach(function (th, i) {
    th.addEventListener("click", function () { sortBy(i, th.getAttribute("aria-sort") === "ascending"); });
  });
  input.addEventListener("input", function () {
    filter(input.value);
    try {
      var params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
      if (input.value) { params.set("filter", input.value); } else { params.delete("filter"); }
      history.replaceState(null, "", "#" + params.toString());
    } catch (e) { /* a file: URL may refuse; the filter works without it */ }
  });
  window.addEventListener("hashchange", fromFragment);
  fromFragment();
})();
"""


def _csp() -> str:
    digest = base64.b64encode(hashlib.sha256(_JS.encode()).digest()).decode()
    style = base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()
    return f"default-src 'none'; img-src data:; style-src 'sha256-{style}'; script-src 'sha256-{digest}'"


def _validation_cell(row: CatalogRow) -> str:
    if row.validation_passed is None:
        return '<td data-v="-" class="muted">-</td>'
    level = _e(row.validation_level or "")
    if row.validation_passed:
        return f'<td data-v="ok" class="ok" title="{level}">ok</td>'
    return f'<td data-v="FAILED" class="failed" title="{level}">FAILED</td>'


def build_report(root: str | os.PathLike[str], *, curves: bool = True) -> str:
    """The HTML report of every checkpoint under ``root`` (see the module docstring)."""
    with Catalog(root) as catalog:
        rows = catalog.find(sort="run_dir,step")
        runs = catalog.runs()
        tags = _tags(catalog)
        base = catalog.root
    rows.sort(key=lambda r: (r.run_dir, r.step, r.name))
    registered, registry_problems = _registry(base)
    aliases_of: dict[str, list[str]] = {}
    for entry in registered:
        labels = [f"{entry.model}@{a}" for a in entry.aliases] or [f"{entry.model} v{entry.version}"]
        aliases_of.setdefault(entry.checkpoint, []).extend(labels)

    trajectories: dict[str, Trajectory] = {}
    for run in runs:
        with contextlib.suppress(ReportError):
            trajectories[run["run_dir"]] = trajectory(base / run["run_dir"])
    status_of: dict[str, frozenset[str]] = {}
    for run_dir, traj in trajectories.items():
        for mark in traj.marks:
            status_of[f"{run_dir}/{mark.name}" if run_dir else mark.name] = mark.statuses

    metric_names = sorted({k for r in rows for k in r.metrics})
    columns, extra_metrics = metric_names[:_MAX_METRIC_COLUMNS], metric_names[_MAX_METRIC_COLUMNS:]
    failed = sum(1 for r in rows if r.validation_passed is False)
    total = sum(r.size_bytes for r in rows)
    parts: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_e(_csp())}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>ckptvault report: {_e(base)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Checkpoints under <code>{_e(base)}</code></h1>",
        f'<p id="summary">{len(rows)} checkpoints in {len(runs)} runs, {_e(_human(total))} kept; '
        + (f'<span class="failed">{failed} FAILED validation</span>' if failed else "none failed validation")
        + "</p>",
        '<p><a href="#runs">runs</a> · <a href="#registry">registry</a> · '
        '<a href="#checkpoints-section">checkpoints</a> · <a href="#storage">storage</a> · '
        '<a href="#curves">metric curves</a></p>',
    ]

    # Runs.
    parts.append('<h2 id="runs">Runs</h2><table id="runs-table"><thead><tr>')
    parts.append("<th>run directory</th><th>run id</th><th>git commit</th><th>checkpoints</th>")
    parts.append("<th>size</th><th>config</th></tr></thead><tbody>")
    for run in runs:
        mine = [r for r in rows if r.run_dir == run["run_dir"]]
        config = run.get("config")
        config_html = (
            "<details><summary>config</summary><pre>"
            + _e(json.dumps(config, indent=1, sort_keys=True, default=str))
            + "</pre></details>"
            if config
            else '<span class="muted">-</span>'
        )
        parts.append(
            f"<tr><td><code>{_e(run['run_dir'] or '.')}</code></td><td>{_e(run.get('run_id') or '-')}</td>"
            f"<td><code>{_e(run.get('git_commit') or '-')}</code></td><td class=num>{len(mine)}</td>"
            f"<td class=num>{_e(_human(sum(r.size_bytes for r in mine)))}</td><td>{config_html}</td></tr>"
        )
    parts.append("</tbody></table>")

    # Registry.
    parts.append('<h2 id="registry">Registry</h2>')
    if registered:
        parts.append('<table id="registry-table"><thead><tr><th>model</th><th>version</th><th>aliases</th>')
        parts.append("<th>checkpoint</th><th>step</th></tr></thead><tbody>")
        for entry in registered:
            alias_html = " ".join(
                f'<span class="alias">{_e(entry.model)}@{_e(alias)}</span> &rarr; '
                f"<code>{_e(entry.checkpoint)}</code>"
                for alias in entry.aliases
            )
            parts.append(
                f"<tr><td>{_e(entry.model)}</td><td class=num>{entry.version}</td><td>{alias_html}</td>"
                f"<td><code>{_e(entry.checkpoint)}</code></td><td class=num>{_e(entry.step)}</td></tr>"
            )
        parts.append("</tbody></table>")
    else:
        parts.append('<p class="muted">no registered models</p>')
    for problem in registry_problems:
        parts.append(f'<p class="failed">{_e(problem)}</p>')

    # Checkpoints.
    parts.append('<h2 id="checkpoints-section">Checkpoints</h2>')
    parts.append(
        '<p><input id="filter" type="search" placeholder="filter: any text in a row" '
        'aria-label="filter checkpoints"> <span id="shown"></span> '
        '<span class="muted">(click a header to sort; <code>#filter=TEXT&amp;sort=-step</code> in the '
        "address presets both)</span></p>"
    )
    header = [
        ("checkpoint", "text"),
        ("run", "text"),
        ("step", "num"),
        ("epoch", "num"),
        ("scope", "text"),
        ("created", "text"),
        ("size", "num"),
        ("validation", "text"),
        ("status", "text"),
        ("registry", "text"),
    ]
    parts.append('<div class="scroll"><table id="checkpoints" class="sortable"><thead><tr>')
    for name, kind in header:
        parts.append(f'<th data-key="{name}" data-type="{kind}">{name}</th>')
    for name in columns:
        parts.append(f'<th data-key="{_e(name)}" data-type="num">{_e(name)}</th>')
    if extra_metrics:
        parts.append('<th data-key="other metrics" data-type="text">other metrics</th>')
    parts.append('<th data-key="tags" data-type="text">tags</th></tr></thead><tbody>')
    for row in rows:
        statuses = status_of.get(row.path, frozenset())
        status_text = ", ".join(s for s in STATUSES if s in statuses and s not in (KEPT, FAILED))
        labels = aliases_of.get(row.path, [])
        created = row.created_at.replace("T", " ")[:19]
        cells = [
            f'<td data-v="{_e(row.path)}"><code>{_e(row.path)}</code></td>',
            f"<td>{_e(row.run_id or '-')}</td>",
            f'<td class=num data-v="{row.step}">{row.step}</td>',
            f'<td class=num data-v="{"" if row.epoch is None else row.epoch}">{_e(row.epoch)}</td>',
            f"<td>{_e(row.scope or '')}</td>",
            f'<td data-v="{_e(row.created_at)}">{_e(created)}</td>',
            f'<td class=num data-v="{row.size_bytes}">{_e(_human(row.size_bytes))}</td>',
            _validation_cell(row),
            f"<td>{_e(status_text)}</td>",
            "<td>" + " ".join(f'<span class="alias">{_e(label)}</span>' for label in labels) + "</td>",
        ]
        for name in columns:
            value = row.metrics.get(name)
            exact = "" if value is None else repr(value)  # sorts by the exact value, shows 6 digits
            cells.append(f'<td class=num data-v="{_e(exact)}">{_e(_number(value))}</td>')
        if extra_metrics:
            rest = ", ".join(f"{k}={_number(row.metrics[k])}" for k in extra_metrics if k in row.metrics)
            cells.append(f"<td>{_e(rest)}</td>")
        row_tags = tags.get(row.path, {})
        cells.append("<td>" + _e(", ".join(f"{k}={v}" for k, v in sorted(row_tags.items()))) + "</td>")
        parts.append(f'<tr data-path="{_e(row.path)}">' + "".join(cells) + "</tr>")
    parts.append("</tbody></table></div>")

    # Storage and curves.
    parts.append('<h2 id="storage">Storage used over time</h2>')
    parts.append(
        '<p class="muted">Cumulative size of the checkpoints kept now, by creation time (deleted ones '
        "are gone from the catalog; chunks shared between checkpoints are counted in each).</p>"
    )
    if rows:
        parts.append(_img(storage_png(rows), "cumulative bytes of kept checkpoints per run"))
    parts.append('<h2 id="curves">Metric curves</h2>')
    if not curves:
        parts.append('<p class="muted">left out (--no-curves)</p>')
    for run in runs:
        run_dir = run["run_dir"]
        parts.append(
            f"<h3><code>{_e(run_dir or '.')}</code> <span class=muted>{_e(run.get('run_id'))}</span></h3>"
        )
        found = trajectories.get(run_dir)
        if found is None:
            parts.append('<p class="muted">no trajectory</p>')
        elif curves:
            parts.append(_img(plot_png(found, title=run_dir or "."), f"metric curves of {run_dir or '.'}"))
    parts.append(f"<script>{_JS}</script></body></html>\n")
    return "\n".join(parts)
