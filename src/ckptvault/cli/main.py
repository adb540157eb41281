"""The ``ckptvault`` command: inspect, verify, diff, export and import checkpoints from a shell.

Every command prints a human table by default and exact JSON with ``--json`` (for scripts), and
exits non-zero when what it checks fails: 1 for a failed check or a damaged checkpoint, 2 for a
usage error. Library errors are shown as one clear line, never as a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .. import api
from ..engine.inspect import diff_checkpoints, iter_leaves
from ..engine.reader import CheckpointReader, verify_checkpoint
from ..errors import CheckpointError
from ..storage.chunkstore import collect_garbage
from ..storage.local import LocalStorage
from ..validation import read_result
from . import catalog_cmds, pictures

app = typer.Typer(
    name="ckptvault",
    help="Inspect, verify, compare, export and import ckptvault checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except CheckpointError as exc:
        # Messages hold paths and names like ckptvault[onnx]: never let rich read them as markup.
        err.print(f"[red]error:[/red] {type(exc).__name__}: {escape(str(exc))}")
        raise typer.Exit(1) from exc
    except FileNotFoundError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc


@contextmanager
def _progress(total: int, label: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    if not enabled or total < 64 * 1024 * 1024:
        yield lambda _n: None
        return
    columns = (TextColumn(label), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


@app.command()
def show(checkpoint: Path, as_json: JsonOpt = False) -> None:
    """Metadata and the tensor table (name, dtype, shape, bytes) of one checkpoint."""
    with _errors(), CheckpointReader(LocalStorage(), str(checkpoint)) as reader:
        manifest = reader.manifest
        metadata = reader.decode_metadata()
        leaves = iter_leaves(manifest.tree, path=str(checkpoint))
        tensors: list[dict[str, Any]] = [
            {
                "name": leaf.path,
                "kind": leaf.kind,
                "dtype": leaf.dtype,
                "shape": list(leaf.shape),
                "bytes": manifest.tensors[leaf.tensor].nbytes if leaf.tensor in manifest.tensors else None,
                "stored_as": leaf.tensor,
            }
            for leaf in leaves
        ]
        summary = {
            "path": str(checkpoint),
            "checkpoint_id": manifest.checkpoint_id,
            "step": manifest.step,
            "created_at": manifest.created_at,
            "schema_version": manifest.schema_version,
            "digest_algorithm": manifest.digest_algorithm,
            "size_bytes": manifest.total_bytes,
            "files": {n: {"size": f.size, "digest": f.digest} for n, f in manifest.files.items()},
            "metadata": metadata,
        }
    if as_json:
        _emit_json({**summary, "tensors": tensors})
        return
    out.print(f"[bold]{checkpoint}[/bold]  step {manifest.step}  id {manifest.checkpoint_id}")
    out.print(
        f"created {manifest.created_at}  size {_human_bytes(manifest.total_bytes)}  "
        f"{len(tensors)} tensors  digest {manifest.digest_algorithm}  schema {manifest.schema_version}"
    )
    for key, value in metadata.items():
        out.print(f"  {key}: {value}")
    table = Table(show_edge=False, header_style="bold")
    for col, justify in (("name", "left"), ("dtype", "left"), ("shape", "left"), ("bytes", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in tensors:
        size = row["bytes"]
        table.add_row(
            row["name"], row["dtype"], str(tuple(row["shape"])), _human_bytes(size) if size else "0 B"
        )
    out.print(table)


@app.command("ls")
def list_(directory: Path, as_json: JsonOpt = False) -> None:
    """Committed checkpoints under a directory: step, size, time, key metrics."""
    rows: list[dict[str, Any]] = []
    with _errors():
        for path in api.list_checkpoints(directory):
            try:
                info = api.info(path)
            except CheckpointError as exc:
                rows.append({"path": path, "error": str(exc)})
                continue
            rows.append(
                {
                    "path": path,
                    "step": info.step,
                    "size_bytes": info.size_bytes,
                    "created_at": info.created_at,
                    "metrics": info.metrics,
                    "validation": _validation_status(path, info.checkpoint_id),
                }
            )
    rows.sort(key=lambda r: (r.get("step", -1), r["path"]))
    reasons = _kept_reasons(directory)
    if reasons is not None:
        for row in rows:
            row["kept_because"] = list(reasons.get(Path(row["path"]).name, ()))
    if as_json:
        _emit_json(rows)
        return
    if not rows:
        out.print(f"no checkpoints under {directory}")
        return
    metric_names = sorted({k for r in rows for k in r.get("metrics", {})})[:6]
    extra = ["kept because"] if reasons is not None else []
    table = Table(show_edge=False, header_style="bold")
    for col in ("checkpoint", "step", "size", "created", "validation", *metric_names, *extra):
        justify = "right" if col not in ("checkpoint", "created", "validation", "kept because") else "left"
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for row in rows:
        cells = [_relative(row["path"], directory)]
        if "error" in row:
            cells += [
                "[red]unreadable[/red]",
                "",
                row["error"][:60],
                "",
                *[""] * (len(metric_names) + len(extra)),
            ]
        else:
            created = datetime.fromisoformat(row["created_at"]).strftime("%Y-%m-%d %H:%M:%S")
            cells += [
                str(row["step"]),
                _human_bytes(row["size_bytes"]),
                created,
                _fmt_validation(row["validation"]),
            ]
            cells += [_fmt_metric(row["metrics"].get(m)) for m in metric_names]
            if extra:
                cells.append(", ".join(row["kept_because"]) or "[red]to be deleted[/red]")
        table.add_row(*cells)
    out.print(table)
    failed = [r for r in rows if (r.get("validation") or {}).get("passed") is False]
    for row in failed:
        err.print(
            f"[red bold]FAILED validation[/red bold] {_relative(row['path'], directory)}: "
            + "; ".join(row["validation"].get("problems", []))[:300]
        )


def _validation_status(path: str, checkpoint_id: str) -> dict[str, Any] | None:
    result = read_result(path)
    if result is None or result.get("checkpoint_id") != checkpoint_id:
        return None  # never validated, or the result of an older checkpoint of that name
    return {k: result.get(k) for k in ("level", "passed", "problems", "seconds", "note")}


def _fmt_validation(status: dict[str, Any] | None) -> str:
    if status is None:
        return "-"
    if status.get("passed"):
        return f"{status.get('level')} ok"
    return f"[red bold]{status.get('level')} FAILED[/red bold]"


@app.command()
def validate(
    checkpoint: Path,
    level: Annotated[
        str, typer.Option("--level", help="checksum, readback or full (rebuild the model, run the probe).")
    ] = "full",
    as_json: JsonOpt = False,
) -> None:
    """Validate a checkpoint now; exits 1 when it fails (the result is recorded beside it)."""
    with _errors():
        result = api.validate(checkpoint, level)
    if as_json:
        _emit_json(result.as_dict())
    else:
        verdict = "[green]OK[/green]" if result.passed else "[red bold]FAILED[/red bold]"
        out.print(f"{verdict}  {checkpoint}  {result.level} validation in {result.seconds:.2f} s")
        for line in (result.note, *result.checks):
            if line:
                out.print(f"   {line}")
        for problem in result.problems:
            out.print(f"   [red]{problem}[/red]")
    if not result.passed:
        raise typer.Exit(1)


def _kept_reasons(directory: Path) -> dict[str, tuple[str, ...]] | None:
    """Retention reasons when ``directory`` is a CheckpointManager run (it has a run.json)."""
    if not (directory / "run.json").is_file():
        return None
    from ..manager import kept_reasons

    try:
        return kept_reasons(directory)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _relative(path: str, root: Path) -> str:
    relative = os.path.relpath(path, root)
    return path if relative.startswith("..") else relative


def _fmt_metric(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


@app.command()
def verify(
    checkpoints: Annotated[list[Path], typer.Argument(help="One or more checkpoint directories.")],
    as_json: JsonOpt = False,
) -> None:
    """Check every byte of each checkpoint; exit 1 if any problem is found."""
    reports = []
    for checkpoint in checkpoints:
        total = 0
        with suppress(CheckpointError):
            total = api.info(checkpoint).size_bytes
        with _progress(total, f"verify {checkpoint.name}", not as_json) as advance:
            reports.append(verify_checkpoint(LocalStorage(), str(checkpoint), progress=advance))
    if as_json:
        _emit_json([r.as_dict() for r in reports])
    else:
        for report in reports:
            if report.ok:
                out.print(
                    f"[green]OK[/green]   {report.path}  {report.files_checked} files, "
                    f"{report.tensors_checked} tensors, {_human_bytes(report.bytes_checked)} "
                    f"in {report.seconds:.2f} s"
                )
            else:
                out.print(f"[red]FAIL[/red] {report.path}")
                for problem in report.problems:
                    where = " / ".join(x for x in (problem.file, problem.tensor) if x)
                    out.print(f"     [{problem.kind}] {where}: {problem.message}")
    if not all(r.ok for r in reports):
        raise typer.Exit(1)


@app.command()
def diff(
    a: Path, b: Path, as_json: JsonOpt = False, all_: Annotated[bool, typer.Option("--all")] = False
) -> None:
    """Per tensor: identical, changed (max abs / relative difference), added, removed."""
    with _errors():
        rows = diff_checkpoints(LocalStorage(), str(a), str(b))
    if as_json:
        _emit_json([r.as_dict() for r in rows])
        return
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    shown = [r for r in rows if all_ or r.status != "identical"]
    if shown:
        table = Table(show_edge=False, header_style="bold")
        for col in ("tensor", "status", "max abs diff", "max rel diff"):
            table.add_column(col, justify="left" if col in ("tensor", "status") else "right")
        colours = {
            "changed": "yellow",
            "added": "green",
            "removed": "red",
            "retyped": "magenta",
            "reshaped": "magenta",
        }
        for row in shown:
            colour = colours.get(row.status, "white")
            table.add_row(
                row.path,
                f"[{colour}]{row.status}[/{colour}] {row.detail}".rstrip(),
                "" if row.max_abs is None else f"{row.max_abs:.4g}",
                "" if row.max_rel is None else f"{row.max_rel:.4g}",
            )
        out.print(table)
    out.print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no tensors")


@app.command()
def export(
    checkpoint: Path,
    output: Path,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="safetensors (every tensor, one file), torch (.pt state dict), "
            "hf (config.json + safetensors shards directory) or onnx (needs the onnx extra).",
        ),
    ] = "safetensors",
    max_shard_size: Annotated[
        str | None,
        typer.Option("--max-shard-size", help="hf: largest shard, e.g. 2GB, 500MB (default 5GB)."),
    ] = None,
    probe: Annotated[
        Path | None,
        typer.Option("--probe", help="onnx: safetensors file of input.0, input.1, ... to trace and check."),
    ] = None,
    opset: Annotated[int | None, typer.Option("--opset", help="onnx: opset version.")] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="hf: replace an earlier export directory.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export for other tools: safetensors, torch (.pt), a Hugging Face directory, or ONNX (checked)."""
    from ..export import DEFAULT_MAX_SHARD_SIZE, FORMATS, export_checkpoint, parse_size

    if fmt not in FORMATS:
        err.print(
            f"[red]error:[/red] unknown export format {escape(repr(fmt))}; supported: {', '.join(FORMATS)}"
        )
        raise typer.Exit(2)
    misplaced = [
        name
        for name, given, owner in (
            ("--max-shard-size", max_shard_size is not None, "hf"),
            ("--overwrite", overwrite, "hf"),
            ("--probe", probe is not None, "onnx"),
            ("--opset", opset is not None, "onnx"),
        )
        if given and fmt != owner
    ]
    if misplaced:
        err.print(f"[red]error:[/red] {', '.join(misplaced)} does not apply to --format {fmt}")
        raise typer.Exit(2)
    try:
        shard_size = parse_size(max_shard_size or DEFAULT_MAX_SHARD_SIZE)
    except ValueError as exc:
        err.print(f"[red]error:[/red] --max-shard-size: {escape(str(exc))}")
        raise typer.Exit(2) from exc
    # Not _errors(): its markup would swallow the "[onnx]" of an install hint, so messages are escaped.
    try:
        total = api.info(checkpoint).tensor_bytes
        with _progress(total, f"export {checkpoint.name}", not as_json) as advance:
            result = export_checkpoint(
                checkpoint,
                output,
                format=fmt,
                max_shard_size=shard_size,
                probe=probe,
                opset=opset,
                overwrite=overwrite,
                progress=advance,
            )
    except (CheckpointError, FileNotFoundError) as exc:
        name = f"{type(exc).__name__}: " if isinstance(exc, CheckpointError) else ""
        err.print(f"[red]error:[/red] {escape(name + str(exc))}")
        raise typer.Exit(1) from exc
    if as_json:
        _emit_json(result.as_dict())
        return
    out.print(f"wrote {escape(str(output))} ({_human_bytes(result.size_bytes)})")
    if fmt != "safetensors":
        extra = f"; max abs diff {result.max_abs_diff:.3g}" if result.max_abs_diff is not None else ""
        out.print(f"   {result.num_tensors} tensors from {escape(result.source)}{extra}")


@app.command()
def gc(
    directory: Annotated[Path, typer.Argument(help="A run directory (the parent of its checkpoints).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report, delete nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Free the chunks of the run's chunk store that no committed checkpoint references.

    Waits for saves in progress (store lock); safe to kill at any point: it never deletes a chunk
    a committed checkpoint references.
    """
    with _errors():
        if not directory.is_dir():
            err.print(f"[red]error:[/red] {directory} is not a directory")
            raise typer.Exit(2)
        report = collect_garbage(directory, dry_run=dry_run)
    if as_json:
        _emit_json({**dataclasses.asdict(report), "dry_run": dry_run})
        return
    verb = "would free" if dry_run else "freed"
    out.print(
        f"{report.checkpoints} checkpoints reference {report.live_chunks} chunks; {verb} "
        f"{report.deleted_chunks} chunks ({_human_bytes(report.freed_bytes)})"
        + (f" and {report.deleted_temporary} leftover temporary files" if report.deleted_temporary else "")
    )


@app.command("import")
def import_(
    source: Path,
    target: Path,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
) -> None:
    """Convert a legacy torch file (via torch.load(weights_only=True)) or a safetensors file."""
    from ..legacy import import_legacy

    with _errors():
        info = import_legacy(source, target, overwrite=overwrite)
    out.print(
        f"imported {source} -> {info.path} ({info.num_tensors} tensors, {_human_bytes(info.size_bytes)})"
    )


@app.command("check-resume", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def check_resume_command(
    command: Annotated[list[str], typer.Argument(help="The training command, after --.")],
    kills: Annotated[int, typer.Option(help="How many times to SIGKILL the second run.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed for the kill times.")] = 0,
    workdir: Annotated[Path | None, typer.Option(help="Where the two run directories go.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a training script uninterrupted and killed-and-resumed; report 'exact' or the first difference."""
    from .check_resume import check_resume

    try:
        result = check_resume(command, kills=kills, seed=seed, workdir=str(workdir) if workdir else None)
    except (RuntimeError, CheckpointError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    if as_json:
        _emit_json(result.__dict__)
    elif result.exact:
        out.print(f"[green]exact[/green]: killed {result.kills} times and resumed; final state bit-identical")
    else:
        out.print(f"[red]differs[/red] after {result.kills} kills: {result.first_difference}")
    if not result.exact:
        raise typer.Exit(1)


app.command()(catalog_cmds.find)
app.add_typer(catalog_cmds.catalog_app, name="catalog")
app.add_typer(catalog_cmds.registry_app, name="registry")
app.command()(pictures.plot)
app.command()(pictures.report)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
