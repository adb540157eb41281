"""``ckptvault ls DIRECTORY``: one row per committed checkpoint, whatever state each one is in.

A listing is how a user finds the damaged checkpoint, so one damaged checkpoint must never hide the
others: each row is read and formatted on its own, and a checkpoint that cannot be read (or shown)
becomes a row marked ``unreadable`` with its error. ``ls`` exits 0 whenever it could list the
directory; ``verify`` is the command whose exit code judges checkpoints. Every text in a row is
made inert (``cli/inert.py``) before rich sees it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .. import api
from ..engine.rundir import RunDirectory, parse_name
from ..manager.tiers import mirror_reasons, read_tiers, tier_of
from ..validation import read_result
from .inert import (
    UNREADABLE,
    console,
    emit_json,
    error_text,
    human_bytes,
    inert,
    message_of,
    metric_text,
    timestamp,
)

out = console()
err = console(stderr=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
# A run or directory: a local path or an object-store URL (kept a string: Path folds "s3://").
Location = Annotated[
    str, typer.Argument(help="A directory or run: a local path or an s3:// (gs://, az://) URL.")
]
_MAX_METRIC_COLUMNS = 6


def list_(directory: Location, as_json: JsonOpt = False) -> None:
    """Committed checkpoints under a directory: step, size, time, key metrics.

    A checkpoint that cannot be read is listed as unreadable, with its error; exits 0 when the
    directory could be listed (``verify`` judges checkpoints)."""
    try:
        paths = api.list_checkpoints(directory)
    except UNREADABLE as exc:
        err.print(f"[red]error:[/red] {error_text(exc)}")
        raise typer.Exit(1) from exc
    rows = [_row(path) for path in paths]
    tiers = _add_tiers(rows, directory)
    rows.sort(key=lambda r: (r.get("step", -1), r["path"]))
    reasons = _kept_reasons(directory)
    if reasons is not None:
        kept = mirror_reasons(tiers) if tiers else {}  # what a mirrored run's retention keeps too
        for row in rows:
            name = Path(row["path"]).name
            row["kept_because"] = [*reasons.get(name, ()), *([kept[name]] if name in kept else [])]
    if as_json:
        emit_json(rows)
        return
    if not rows:
        out.print(f"no checkpoints under {inert(directory)}")
        return
    metric_names = sorted({str(k) for r in rows for k in r.get("metrics", {})})[:_MAX_METRIC_COLUMNS]
    extra = ["kept because"] if reasons is not None else []
    tier_column = ["tier"] if tiers else []
    table = Table(show_edge=False, header_style="bold")
    for col in ("checkpoint", "step", "size", "created", "validation", *metric_names, *extra, *tier_column):
        justify = (
            "right" if col not in ("checkpoint", "created", "validation", "kept because", "tier") else "left"
        )
        table.add_column(inert(col, 40), justify=justify, overflow="fold")  # type: ignore[arg-type]
    for row in rows:
        table.add_row(
            *_cells(row, directory, metric_names, bool(extra)), *[row.get("tier", "")][: len(tier_column)]
        )
    out.print(table)
    for row in rows:
        validation = row.get("validation") or {}
        if validation.get("passed") is False:
            problems = validation.get("problems")
            text = "; ".join(map(str, problems)) if isinstance(problems, list) else str(problems or "")
            err.print(
                f"[red bold]FAILED validation[/red bold] {inert(_relative(row['path'], directory))}: "
                + inert(text, 300)
            )


def _row(path: str) -> dict[str, Any]:
    """One checkpoint's row; what cannot be read (or would fail to print) becomes its ``error``."""
    try:
        info = api.info(path)
        row = {
            "path": path,
            "step": info.step,
            "size_bytes": info.size_bytes,
            "created_at": info.created_at,
            "metrics": _metrics_of(info.metadata),
            "validation": _validation_status(path, info.checkpoint_id),
            "checkpoint_id": info.checkpoint_id,
        }
        return row
    except UNREADABLE as exc:
        return {"path": path, "error": message_of(exc)}


def _metrics_of(metadata: dict[str, Any]) -> dict[str, Any]:
    metrics = metadata.get("metrics")
    return metrics if isinstance(metrics, dict) else {}


def _cells(row: dict[str, Any], directory: str, metric_names: list[str], kept_column: bool) -> list[str]:
    cells = [inert(_relative(row["path"], directory))]
    if row.get("tier") == "remote":  # only on the mirror: nothing local to describe
        return [
            *cells,
            metric_text(row.get("step")),
            "-",
            "-",
            "-",
            *[""] * (len(metric_names) + int(kept_column)),
        ]
    if "error" in row:
        return [
            *cells,
            "[red]unreadable[/red]",
            "",
            inert(row["error"], 120),
            "",
            *[""] * (len(metric_names) + int(kept_column)),
        ]
    metrics = {str(k): v for k, v in row["metrics"].items()}
    cells += [
        metric_text(row["step"]),
        human_bytes(row["size_bytes"]),
        timestamp(row["created_at"]),
        _fmt_validation(row["validation"]),
    ]
    cells += [metric_text(metrics.get(m)) for m in metric_names]
    if kept_column:
        cells.append(inert(", ".join(row["kept_because"])) or "[red]to be deleted[/red]")
    return cells


def _validation_status(path: str, checkpoint_id: str) -> dict[str, Any] | None:
    result = read_result(path)
    if result is None or result.get("checkpoint_id") != checkpoint_id:
        return None  # never validated, or the result of an older checkpoint of that name
    return {k: result.get(k) for k in ("level", "passed", "problems", "seconds", "note")}


def _fmt_validation(status: dict[str, Any] | None) -> str:
    if status is None:
        return "-"
    if status.get("passed"):
        return f"{inert(status.get('level'), 20)} ok"
    return f"[red bold]{inert(status.get('level'), 20)} FAILED[/red bold]"


def _add_tiers(rows: list[dict[str, Any]], directory: str) -> dict[str, Any] | None:
    """A mirrored run's tier of each row (local, uploading, both) and a row for each checkpoint only
    the mirror holds (remote), from the run's tier record (manager/tiers.py); None for other runs.
    The record is untrusted: only names this library writes, only integer steps."""
    tiers = read_tiers(RunDirectory(directory))
    if tiers is None:
        return None
    for row in rows:
        row["tier"] = tier_of(tiers, Path(row["path"]).name, row.get("checkpoint_id"), local=True)
    listed = {Path(row["path"]).name for row in rows}
    for name in tiers["checkpoints"]:
        parsed = parse_name(name) if isinstance(name, str) else None
        if parsed and name not in listed and tier_of(tiers, name, None, local=False) == "remote":
            rows.append({"path": os.path.join(directory, name), "step": parsed[1], "tier": "remote"})
    return tiers


def _kept_reasons(directory: str) -> dict[str, tuple[str, ...]] | None:
    """Retention reasons when ``directory`` is a CheckpointManager run (it has a run.json)."""
    from ..manager import kept_reasons

    try:
        if RunDirectory(directory).read_run() is None:
            return None
        return kept_reasons(directory)
    except UNREADABLE:
        return None


def _relative(path: str, root: str) -> str:
    relative = os.path.relpath(path, root)
    return path if relative.startswith("..") else relative
