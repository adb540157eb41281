"""The ``ckptvault`` command: inspect, verify, diff, export and import checkpoints from a shell.

Every command prints a human table by default and exact JSON with ``--json`` (for scripts), and
exits non-zero when what it checks fails: 1 for a failed check or a damaged checkpoint, 2 for a
usage error. Library errors are shown as one clear line, never as a traceback. Everything a
checkpoint, run or catalog says is shown inert (``cli/inert.py``): control characters escaped,
rich markup literal, no hyperlinks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .. import api
from ..engine.gc import collect_garbage
from ..engine.inspect import diff_checkpoints, iter_leaves
from ..engine.reader import CheckpointReader
from ..engine.verify import verify_checkpoint
from ..errors import CheckpointError
from ..storage.resolve import is_url, split_location
from . import catalog_cmds, dcp_cmds, listing, pictures
from .inert import UNREADABLE, console, emit_json, error_text, human_bytes, inert, install_inert_diagnostics

# A checkpoint or run: a local path or an object-store URL (kept a string: Path folds "s3://").
Location = Annotated[str, typer.Argument(help="A local path or an s3:// (gs://, az://) URL.")]

app = typer.Typer(
    name="ckptvault",
    help="Inspect, verify, compare, export and import ckptvault checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = console()
err = console(stderr=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


@app.callback()
def _before_every_command() -> None:
    # Library warnings and log records quote paths and file content: inert on stderr too.
    install_inert_diagnostics()


# trusted_modules= on the command line: the user, never the checkpoint, names what may be imported.
# Absent: None, so CKPTVAULT_TRUSTED_MODULES applies; given: the list replaces it.
TrustOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--trust",
        metavar="MODULE",
        help="Trust MODULE (and its submodules) to build the model: it may be imported. Repeatable; "
        "replaces $CKPTVAULT_TRUSTED_MODULES.",
    ),
]
_human_bytes = human_bytes
_emit_json = emit_json


@contextmanager
def _errors(hostile: bool = False) -> Iterator[None]:
    """Library errors as one inert line and exit 1. ``hostile``: the command reads one checkpoint's
    values, so whatever its damage raises (``inert.UNREADABLE``) is reported the same way."""
    try:
        yield
    except CheckpointError as exc:
        # Messages hold paths, names like ckptvault[onnx] and file content: made inert.
        err.print(f"[red]error:[/red] {error_text(exc)}")
        raise typer.Exit(1) from exc
    except OSError as exc:
        err.print(f"[red]error:[/red] {error_text(exc, with_type=False)}")
        raise typer.Exit(1) from exc
    except UNREADABLE as exc:
        if not hostile:
            raise
        err.print(f"[red]error:[/red] {error_text(exc)}")
        raise typer.Exit(1) from exc


@contextmanager
def _progress(total: int, label: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    if not enabled or total < 64 * 1024 * 1024:
        yield lambda _n: None
        return
    columns = (TextColumn(inert(label)), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


@app.command()
def show(checkpoint: Location, as_json: JsonOpt = False) -> None:
    """Metadata and the tensor table (name, dtype, shape, bytes) of one checkpoint."""
    with _errors(hostile=True), CheckpointReader(*api.storage_for(checkpoint)) as reader:
        manifest = reader.manifest
        metadata = reader.decode_metadata()
        leaves = iter_leaves(manifest.tree, path=str(checkpoint))
        tensors: list[dict[str, Any]] = [
            {
                "name": leaf.path,
                "kind": leaf.kind,
                "dtype": leaf.dtype,
                "shape": list(leaf.shape),
                "bytes": entry.nbytes if (entry := manifest.entry(leaf.tensor)) is not None else None,
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
    out.print(
        f"[bold]{inert(checkpoint)}[/bold]  step {inert(manifest.step)}  id {inert(manifest.checkpoint_id)}"
    )
    out.print(
        f"created {inert(manifest.created_at)}  "
        f"size {_human_bytes(manifest.total_bytes)}  {len(tensors)} tensors  "
        f"digest {inert(manifest.digest_algorithm)}  schema {manifest.schema_version}"
    )
    for key, value in metadata.items():
        out.print(f"  {inert(key)}: {inert(value)}")
    table = Table(show_edge=False, header_style="bold")
    for col, justify in (("name", "left"), ("dtype", "left"), ("shape", "left"), ("bytes", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in tensors:
        size = row["bytes"]
        table.add_row(
            inert(row["name"]),
            inert(row["dtype"]),
            inert(tuple(row["shape"])),
            _human_bytes(size) if size else "0 B",
        )
    out.print(table)


@app.command()
def validate(
    checkpoint: Location,
    level: Annotated[
        str, typer.Option("--level", help="checksum, readback or full (rebuild the model, run the probe).")
    ] = "full",
    trust: TrustOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate a checkpoint now; exits 1 when it fails (the result is recorded beside it).

    ``full`` rebuilds the model from the factory the checkpoint records, whose module is imported
    only when trusted (already imported, or ``--trust MODULE``); the failure says how to trust it."""
    with _errors():
        result = api.validate(checkpoint, level, trusted_modules=trust)
    if as_json:
        _emit_json(result.as_dict())
    else:
        verdict = "[green]OK[/green]" if result.passed else "[red bold]FAILED[/red bold]"
        out.print(
            f"{verdict}  {inert(checkpoint)}  {inert(result.level)} validation in {result.seconds:.2f} s"
        )
        for line in (result.note, *result.checks):
            if line:
                out.print(f"   {inert(line)}")
        for problem in result.problems:
            out.print(f"   [red]{inert(problem)}[/red]")
    if not result.passed:
        raise typer.Exit(1)


@app.command()
def verify(
    checkpoints: Annotated[
        list[str], typer.Argument(help="One or more checkpoints (directories or s3:// URLs).")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Check every byte of each checkpoint; exit 1 if any problem is found."""
    reports = []
    for checkpoint in checkpoints:
        total = 0
        with suppress(CheckpointError):
            total = api.info(checkpoint).size_bytes
        with _progress(total, f"verify {split_location(checkpoint)[1]}", not as_json) as advance:
            reports.append(verify_checkpoint(*api.storage_for(checkpoint), progress=advance))
    if as_json:
        _emit_json([r.as_dict() for r in reports])
    else:
        for report in reports:
            if report.ok:
                out.print(
                    f"[green]OK[/green]   {inert(report.path)}  {report.files_checked} files, "
                    f"{report.tensors_checked} tensors, {_human_bytes(report.bytes_checked)} "
                    f"in {report.seconds:.2f} s"
                )
            else:
                out.print(f"[red]FAIL[/red] {inert(report.path)}")
                for problem in report.problems:
                    where = " / ".join(x for x in (problem.file, problem.tensor) if x)
                    out.print(f"     {inert(f'[{problem.kind}] {where}: {problem.message}')}")
    if not all(r.ok for r in reports):
        raise typer.Exit(1)


@app.command()
def diff(
    a: Location, b: Location, as_json: JsonOpt = False, all_: Annotated[bool, typer.Option("--all")] = False
) -> None:
    """Per tensor: identical, changed (max abs / relative difference), added, removed."""
    with _errors():
        storage, first = api.storage_for(a)
        rows = diff_checkpoints(storage, first, api.storage_for(b)[1])
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
                inert(row.path),
                f"[{colour}]{inert(row.status)}[/{colour}] {inert(row.detail)}".rstrip(),
                "" if row.max_abs is None else f"{row.max_abs:.4g}",
                "" if row.max_rel is None else f"{row.max_rel:.4g}",
            )
        out.print(table)
    out.print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no tensors")


@app.command()
def export(
    checkpoint: Location,
    output: Location,
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
    trust: TrustOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export for other tools: safetensors, torch (.pt), a Hugging Face directory, or ONNX (checked)."""
    from ..export import DEFAULT_MAX_SHARD_SIZE, FORMATS, export_checkpoint, parse_size

    if fmt not in FORMATS:
        err.print(
            f"[red]error:[/red] unknown export format {inert(repr(fmt))}; supported: {', '.join(FORMATS)}"
        )
        raise typer.Exit(2)
    misplaced = [
        name
        for name, given, owner in (
            ("--max-shard-size", max_shard_size is not None, "hf"),
            ("--overwrite", overwrite, "hf"),
            ("--probe", probe is not None, "onnx"),
            ("--opset", opset is not None, "onnx"),
            ("--trust", trust is not None, "onnx"),  # only onnx rebuilds the model
        )
        if given and fmt != owner
    ]
    if misplaced:
        err.print(f"[red]error:[/red] {', '.join(misplaced)} does not apply to --format {inert(fmt)}")
        raise typer.Exit(2)
    try:
        shard_size = parse_size(max_shard_size or DEFAULT_MAX_SHARD_SIZE)
    except ValueError as exc:
        err.print(f"[red]error:[/red] --max-shard-size: {inert(str(exc))}")
        raise typer.Exit(2) from exc
    # Not _errors(): a FileNotFoundError here names the checkpoint or probe, so it gets no type name.
    try:
        total = api.info(checkpoint).tensor_bytes
        with _progress(total, f"export {split_location(checkpoint)[1]}", not as_json) as advance:
            result = export_checkpoint(
                checkpoint,
                output,
                format=fmt,
                max_shard_size=shard_size,
                probe=probe,
                opset=opset,
                overwrite=overwrite,
                progress=advance,
                trusted_modules=trust,
            )
    except (CheckpointError, FileNotFoundError) as exc:
        name = f"{type(exc).__name__}: " if isinstance(exc, CheckpointError) else ""
        err.print(f"[red]error:[/red] {inert(name + str(exc))}")
        raise typer.Exit(1) from exc
    if as_json:
        _emit_json(result.as_dict())
        return
    out.print(f"wrote {inert(output)} ({_human_bytes(result.size_bytes)})")
    if fmt != "safetensors":
        extra = f"; max abs diff {result.max_abs_diff:.3g}" if result.max_abs_diff is not None else ""
        out.print(f"   {result.num_tensors} tensors from {inert(result.source)}{extra}")


@app.command()
def gc(
    directory: Annotated[str, typer.Argument(help="A run directory or URL (the parent of its checkpoints).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report, delete nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Free the chunks of the run's chunk store that no committed checkpoint references.

    Waits for saves in progress (store lock); safe to kill at any point: it never deletes a chunk
    a committed checkpoint references.
    """
    with _errors():
        if not is_url(directory) and not Path(directory).is_dir():
            err.print(f"[red]error:[/red] {inert(directory)} is not a directory")
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
        f"imported {inert(source)} -> {inert(info.path)} "
        f"({info.num_tensors} tensors, {_human_bytes(info.size_bytes)})"
    )


@app.command("check-resume", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def check_resume_command(
    command: Annotated[list[str], typer.Argument(help="The training command, after --.")],
    kills: Annotated[int, typer.Option(help="How many times to SIGKILL the resumed run.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed for the kill times.")] = 0,
    workdir: Annotated[Path | None, typer.Option(help="Where the run directories go.")] = None,
    nproc: Annotated[int | None, typer.Option(help="Run the command as N torch.distributed ranks.")] = None,
    determinism: Annotated[
        bool, typer.Option(help="First run the script twice uninterrupted to check it is deterministic.")
    ] = True,
    as_json: JsonOpt = False,
) -> None:
    """Run a training script twice uninterrupted, then killed-and-resumed; report 'exact' or what differs.

    Exit status: 0 exact, 1 the resumed run differs, 3 the script is not deterministic (two
    uninterrupted runs differ), 2 an error."""
    from .check_resume import check_resume

    try:
        where = str(workdir) if workdir else None
        result = check_resume(
            command, kills=kills, seed=seed, workdir=where, nproc=nproc, determinism=determinism
        )
    except (RuntimeError, CheckpointError) as exc:
        err.print(f"[red]error:[/red] {error_text(exc, with_type=False)}")
        raise typer.Exit(2) from exc
    if as_json:
        _emit_json(result.__dict__)
    elif result.deterministic is False:
        out.print(
            "[red]not deterministic[/red]: two uninterrupted runs of the script already differ, so "
            f"resume cannot be judged. First: {inert(result.first_difference)}. "
            f"Likely cause: {inert(result.cause)}"
        )
    elif result.exact:
        out.print(f"[green]exact[/green]: killed {result.kills} times and resumed; final state bit-identical")
    else:
        out.print(f"[red]differs[/red] after {result.kills} kills: {inert(result.first_difference)}")
    if result.deterministic is False:
        raise typer.Exit(3)
    if not result.exact:
        raise typer.Exit(1)


app.command("ls")(listing.list_)
app.command()(catalog_cmds.find)
app.add_typer(catalog_cmds.catalog_app, name="catalog")
app.add_typer(catalog_cmds.registry_app, name="registry")
app.command()(pictures.plot)
app.command()(pictures.report)
app.command("import-dcp")(dcp_cmds.import_dcp_command)
app.command("export-dcp")(dcp_cmds.export_dcp_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
