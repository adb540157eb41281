"""``ckptvault find``, ``ckptvault catalog ...`` and ``ckptvault registry ...``: the tree-wide commands.

Registry commands act on the tree given by ``--root``, else ``CKPTVAULT_ROOT``, else the current
directory. Roots and checkpoints may be object-store URLs (``s3://bucket/runs``): they are taken as
strings, never as typer ``Path`` arguments (a ``Path`` folds ``s3://`` into ``s3:/``), and become a
``Path`` only when they are local paths. Catalog rows and registry files are not trusted: every
value is shown inert (``cli/inert.py``), and one damaged registry file or entry is a row with its
error, never the end of a listing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..catalog.registry import Registry
from ..catalog.store import Catalog, CatalogRow
from ..errors import CheckpointError
from ..storage.resolve import is_url
from ..visible import visible
from .inert import console, emit_json, error_text, human_bytes, inert, message_of, metric_text, timestamp

out = console()
err = console(stderr=True)
catalog_app = typer.Typer(help="The SQLite catalog of every checkpoint under a root.", no_args_is_help=True)
registry_app = typer.Typer(help="Named models, their versions and aliases.", no_args_is_help=True)
RootOpt = Annotated[
    str | None,
    typer.Option(
        "--root",
        help="The tree, a directory or an s3:// (gs://, az://) URL (default: $CKPTVAULT_ROOT, else the "
        "current directory).",
    ),
]
# A tree of runs: a local directory or an object-store prefix (kept a string: Path folds "s3://").
TreeArg = Annotated[str, typer.Argument(help="A directory or an s3:// (gs://, az://) URL.", metavar="ROOT")]
CheckpointArg = Annotated[
    str,
    typer.Argument(help="A checkpoint: a local path or an s3:// (gs://, az://) URL.", metavar="CHECKPOINT"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _location(text: str) -> Path | str:
    """A command-line location as the library takes it: a URL as given, anything else a ``Path``."""
    return text if is_url(text) else Path(text)


def _registry(root: str | None) -> Registry:
    """The registry of ``--root`` (else ``$CKPTVAULT_ROOT``, else the current directory)."""
    return Registry(_location(root) if root else None)


def _fail(exc: CheckpointError) -> typer.Exit:
    err.print(f"[red]error:[/red] {error_text(exc)}")
    return typer.Exit(1)


def find(
    root: Annotated[
        str,
        typer.Argument(
            help="A directory or an s3:// (gs://, az://) URL: every checkpoint below it is searched."
        ),
    ],
    where: Annotated[str, typer.Argument(help="Filter, e.g. 'val_acc > 0.9 and step >= 1000'.")] = "",
    sort: Annotated[str, typer.Option("--sort", help="Keys, '-' for descending: '-val_acc,step'.")] = "",
    limit: Annotated[int | None, typer.Option("--limit", help="At most this many rows.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Search every checkpoint under ROOT by metrics, step/epoch, run, tags, config, git commit, time."""
    try:
        with Catalog(_location(root)) as catalog:
            rows = catalog.find(where, sort=sort, limit=limit)
    except CheckpointError as exc:
        raise _fail(exc) from exc
    if as_json:
        emit_json([r.as_dict() for r in rows])
        return
    if not rows:
        out.print("no checkpoint matches")
        return
    metric_names = sorted({str(k) for r in rows for k in r.metrics})[:6]
    table = Table(show_edge=False, header_style="bold")
    for col in ("checkpoint", "step", "size", "created", "validation", *metric_names):
        table.add_column(inert(col, 40), overflow="fold")
    for r in rows:
        table.add_row(*_find_cells(r, metric_names))
    out.print(table)


def _find_cells(r: CatalogRow, metric_names: list[str]) -> list[str]:
    """A row of ``find``. The catalog is a file anyone could have edited: any value of any type is
    shown inert rather than trusted to be what the schema says."""
    status = "-" if r.validation_passed is None else ("ok" if r.validation_passed else "[red]FAILED[/red]")
    metrics = {str(k): v for k, v in r.metrics.items()}
    values = [metric_text(metrics.get(m)) or "-" for m in metric_names]
    created = timestamp(r.created_at, "%Y-%m-%d %H:%M")
    return [inert(r.path), metric_text(r.step), human_bytes(r.size_bytes), created, status, *values]


@catalog_app.command("rebuild")
def catalog_rebuild(root: TreeArg) -> None:
    """Delete the catalog of ROOT and index every manifest again."""
    try:
        with Catalog(_location(root), sync=False) as catalog:
            count = catalog.rebuild()
    except CheckpointError as exc:
        raise _fail(exc) from exc
    out.print(f"indexed {count} checkpoints under {inert(root)}")


@catalog_app.command("sync")
def catalog_sync(root: TreeArg) -> None:
    """Bring the catalog of ROOT up to date (every command does this on its own)."""
    try:
        with Catalog(_location(root)) as catalog:
            count = catalog.count()
    except CheckpointError as exc:
        raise _fail(exc) from exc
    out.print(f"{count} checkpoints under {inert(root)}")


@registry_app.command("register")
def registry_register(
    name: str,
    checkpoint: CheckpointArg,
    alias: Annotated[str | None, typer.Option("--alias", help="Point this alias at the new version.")] = None,
    note: Annotated[str | None, typer.Option("--note")] = None,
    root: RootOpt = None,
) -> None:
    """Register CHECKPOINT as the next version of NAME (it is pinned: retention keeps it)."""
    try:
        version = _registry(root).register(name, _location(checkpoint), alias=alias, note=note)
    except CheckpointError as exc:
        raise _fail(exc) from exc
    out.print(f"{inert(name)} version {inert(version['version'])} -> {inert(version['checkpoint'])}")


@registry_app.command("alias")
def registry_alias(
    name: str,
    version: int,
    alias: str,
    why: Annotated[str | None, typer.Option("--why", help="Recorded in the alias history.")] = None,
    root: RootOpt = None,
) -> None:
    """Move ALIAS of NAME to VERSION."""
    try:
        _registry(root).alias(name, version, alias, why=why)
    except CheckpointError as exc:
        raise _fail(exc) from exc
    out.print(f"{inert(name)}@{inert(alias)} -> version {version}")


@registry_app.command("ls")
def registry_ls(root: RootOpt = None, as_json: JsonOpt = False) -> None:
    """Registered models, their number of versions and their aliases (a damaged one: its error)."""
    try:
        registry = _registry(root)
        names = registry.names()
    except CheckpointError as exc:
        raise _fail(exc) from exc
    rows = [_model_row(registry, name) for name in names]
    if as_json:
        emit_json(rows)
        return
    table = Table(show_edge=False, header_style="bold")
    for col in ("model", "versions", "aliases"):
        table.add_column(col)
    for row in rows:
        if "error" in row:
            table.add_row(inert(row["name"]), "[red]damaged[/red]", inert(row["error"], 200))
            continue
        aliases = ", ".join(f"{visible(a)}->v{visible(v)}" for a, v in sorted(row["aliases"].items()))
        table.add_row(inert(row["name"]), str(row["versions"]), inert(aliases))
    out.print(table)


def _model_row(registry: Registry, name: str) -> dict[str, Any]:
    """One model of ``registry ls``: named by its file (the only name the registry resolves), with
    the number of versions and the aliases; a file that cannot be read: its error."""
    try:
        doc = registry.show(name)
    except CheckpointError as exc:
        return {"name": name, "error": message_of(exc)}
    aliases = doc.get("aliases")
    if not isinstance(aliases, dict):
        return {"name": name, "error": "damaged registry file: aliases are not a mapping"}
    return {"name": name, "aliases": aliases, "versions": len(doc["versions"])}


@registry_app.command("show")
def registry_show(name: str, root: RootOpt = None, as_json: JsonOpt = False) -> None:
    """Every version of NAME with its checkpoint and aliases."""
    try:
        doc = _registry(root).show(name)
    except CheckpointError as exc:
        raise _fail(exc) from exc
    if as_json:
        emit_json(doc)
        return
    found = doc.get("aliases")
    aliases: dict[Any, Any] = found if isinstance(found, dict) else {}
    table = Table(show_edge=False, header_style="bold")
    for col in ("version", "checkpoint", "step", "registered", "by", "aliases"):
        table.add_column(col, overflow="fold")
    for v in doc["versions"]:
        if not isinstance(v, dict):
            table.add_row("?", f"[red]damaged entry[/red] {inert(v, 80)}", "", "", "", "")
            continue
        number = v.get("version")
        names = ", ".join(sorted(str(a) for a, n in aliases.items() if n == number))
        table.add_row(
            inert(number),
            inert(v.get("checkpoint")),
            inert(v.get("step")),
            inert(v.get("registered_at")),
            inert(f"{visible(v.get('user'))}@{visible(v.get('host'))}"),
            inert(names),
        )
    out.print(table)


@registry_app.command("history")
def registry_history(name: str, root: RootOpt = None, as_json: JsonOpt = False) -> None:
    """Every alias move of NAME: when, from, to, why, by whom."""
    try:
        history: list[Any] = _registry(root).history(name)
    except CheckpointError as exc:
        raise _fail(exc) from exc
    except (KeyError, TypeError) as exc:  # a registry file without a history list
        raise _fail(CheckpointError(f"registry file of {name!r} is damaged: no history")) from exc
    if as_json:
        emit_json(history)
        return
    for h in history:
        if not isinstance(h, dict):
            out.print(f"[red]damaged entry[/red] {inert(h, 80)}")
            continue
        came = f"v{visible(h['from'])}" if h.get("from") is not None else "(new)"
        why = f"  ({visible(h['why'])})" if h.get("why") else ""
        by = f"{visible(h.get('user'))}@{visible(h.get('host'))}"
        move = f"{visible(h.get('alias'))}: {came} -> v{visible(h.get('to'))}"
        out.print(inert(f"{visible(h.get('when'))}  {move}  by {by}{why}"))
