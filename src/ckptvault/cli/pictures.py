"""``ckptvault plot RUN`` and ``ckptvault report ROOT``: a run's trajectory as a PNG, a tree as HTML.

Thin commands over :mod:`ckptvault.reporting` and :mod:`ckptvault.report_html`, imported only when
one of them runs: the other commands must not pay for (or need) matplotlib. Every path or message
printed is made inert (``cli/inert.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import CheckpointError
from .inert import console, error_text, inert

out = console()
err = console(stderr=True)


def _fail(exc: CheckpointError, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {error_text(exc, with_type=False)}", soft_wrap=True)
    return typer.Exit(code)


def plot(
    run: Annotated[Path, typer.Argument(help="A run directory (or any directory of checkpoints).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The PNG to write.")],
    metric: Annotated[
        list[str] | None,
        typer.Option("--metric", help="Only this metric (repeat for more); default: every one recorded."),
    ] = None,
) -> None:
    """Draw a run's metrics against step with every checkpoint marked: kept, deleted, best, pinned,
    registered, failed validation."""
    from .. import reporting

    try:
        traj = reporting.trajectory(run)
        png = reporting.plot_png(traj, metric or None)
    except reporting.ReportError as exc:
        # An unknown --metric is a usage error (2); no run or no matplotlib is a failure (1).
        raise _fail(exc, 2 if metric and "no metric" in str(exc) else 1) from exc
    except CheckpointError as exc:
        raise _fail(exc) from exc
    reporting.write_atomically(output, png)
    drawn = len(metric or traj.metric_names()[: reporting.MAX_SUBPLOTS])
    out.print(f"wrote {inert(output)}: {drawn} metrics, {len(traj.marks)} checkpoints", soft_wrap=True)


def report(
    root: Annotated[Path, typer.Argument(help="A directory: every checkpoint below it is reported.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The HTML file to write.")],
    curves: Annotated[
        bool,
        typer.Option("--curves/--no-curves", help="Draw each run's metric curves (slower on many runs)."),
    ] = True,
) -> None:
    """Write ONE self-contained HTML page: runs, a sortable and filterable checkpoint table,
    metric curves, storage over time, validation status and registry aliases."""
    from .. import report_html, reporting

    if not root.is_dir():
        raise _fail(CheckpointError(f"{root} is not a directory"))
    try:
        page = report_html.build_report(root, curves=curves)
    except CheckpointError as exc:
        raise _fail(exc) from exc
    reporting.write_atomically(output, page.encode("utf-8"))
    out.print(f"wrote {inert(output)} ({len(page) // 1024} KiB)", soft_wrap=True)
