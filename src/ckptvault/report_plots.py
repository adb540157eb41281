"""Pictures: a run's trajectory (:mod:`ckptvault.report_trajectory`) and a catalog's storage
over time as PNG bytes.

Why a module of its own: it is the only code that needs matplotlib, which is an optional
dependency (``pip install 'ckptvault[plots]'``): checkpointing must not pull in a plotting stack.
It is imported only when a picture is drawn, and only through its Agg
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
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np

from .catalog.store import CatalogRow
from .report_trajectory import (
    BEST,
    DELETED,
    FAILED,
    KEPT,
    PINNED,
    REGISTERED,
    STATUSES,
    CheckpointMark,
    ReportError,
    Trajectory,
)
from .visible import visible

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOTS_INSTALL_HINT = "pip install 'ckptvault[plots]'"

MAX_SUBPLOTS = 16  # more metrics than this make unreadable strips; --metric picks others


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
