"""``ckptvault find``, ``ckptvault catalog ...`` and ``ckptvault registry ...``: the tree-wide commands.

Registry commands act on the tree given by ``--root``, else ``CKPTVAULT_ROOT``, else the current
directory.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..catalog.registry import Registry, default_root
from ..catalog.store import Catalog
from ..errors import CheckpointError

out = Console()
err = Console(stderr=True)
catalog_app = typer.Typer(help="The SQLite catalog of every checkpoint under a root.", no_args_is_help=True)
registry_app = typer.Typer(help="Named models, their versions and aliases.", no_args_is_help=True)
RootOpt = Annotated[
    Path | None,
    typer.Option("--root", help="The tree (default: $CKPTVAULT_ROOT, else the current directory)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _fail(exc: CheckpointError) -> typer.Exit:
    err.print(f"[red]error:[/red] {type(exc).__name__}: {escape(str(exc))}")
    return typer.Exit(1)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def find(
    root: Annotated[Path, typer.Argument(help="A directory: every checkpoint below it is searched.")],
    where: Annotated[str, typer.Argument(help="Filter, e.g. 'val_acc > 0.9 and step >= 1000'.")] = "",
    sort: Annotated[str, typer.Option("--sort", help="Keys, '-' for descending: '-val_acc,step'.")] = "",
    limit: Annotated[int | None, typer.Option("--limit", help="At most this many rows.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Search every checkpoint under ROOT by metrics, step/epoch, run, tags, config, git commit, time."""
    try:
        with Catalog(root) as catalog:
            rows = catalog.find(where, sort=sort, limit=limit)
    except CheckpointError as exc:
        raise _fail(exc) from exc
    if as_json:
        out.print_json(json.dumps([r.as_dict() for r in rows], default=str))
        return
    if not rows:
        out.print("no checkpoint matches")
        return
    metric_names = sorted({k for r in rows for k in r.metrics})[:6]
    table = Table(show_edge=False, header_style="bold")
    for col in ("checkpoint", "step", "size", "created", "validation", *metric_names):
        table.add_column(col, overflow="fold")
    for r in rows:
        created = datetime.fromisoformat(r.created_at).strftime("%Y-%m-%d %H:%M")
        status = (
            "-" if r.validation_passed is None else ("ok" if r.validation_passed else "[red]FAILED[/red]")
        )
        values = [_fmt(r.metrics.get(m)) for m in metric_names]
        table.add_row(escape(r.path), str(r.step), _human(r.size_bytes), created, status, *values)
    out.print(table)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


@catalog_app.command("rebuild")
def catalog_rebuild(root: Path) -> None:
    """Delete the catalog of ROOT and index every manifest again."""
    try:
        with Catalog(root, sync=False) as catalog:
            count = catalog.rebuild()
    except CheckpointError as exc:
        raise _fail(exc) from exc
    out.print(f"indexed {count} checkpoints under {escape(str(root))}")


@catalog_app.command("sync")
def catalog_sync(root: Path) -> None:
    """Bring the catalog of ROOT up to date (every command does this on its own)."""
    try:
        with Catalog(root) as catalog:
            count = catalog.count()
    except CheckpointError as exc:
        raise _fail(exc) from exc
    out.print(f"{count} checkpoints under {escape(str(root))}")


@registry_app.command("register")
def registry_register(
    name: str,
    checkpoint: Path,
    alias: Annotated[str | None, typer.Option("--alias", help="Point this alias at the new version.")] = None,
    note: Annotated[str | None, typer.Option("--note")] = None,
    root: RootOpt = None,
) -> None:
    """Register CHECKPOINT as the next version of NAME (it is pinned: retention keeps it)."""
    try:
        version = Registry(root or default_root()).register(name, checkpoint, alias=alias, note=note)
    except CheckpointError as exc:
        raise _fail(exc) from exc
    out.print(f"{escape(name)} version {version['version']} -> {escape(version['checkpoint'])}")


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
        Registry(root or default_root()).alias(name, version, alias, why=why)
    except CheckpointError as exc:
        raise _fail(exc) from exc
    out.print(f"{escape(name)}@{escape(alias)} -> version {version}")


@registry_app.command("ls")
def registry_ls(root: RootOpt = None, as_json: JsonOpt = False) -> None:
    """Registered models, their newest version and their aliases."""
    registry = Registry(root or default_root())
    try:
        docs = [registry.show(n) for n in registry.names()]
    except CheckpointError as exc:
        raise _fail(exc) from exc
    if as_json:
        out.print_json(
            json.dumps(
                [{k: d[k] for k in ("name", "aliases")} | {"versions": len(d["versions"])} for d in docs]
            )
        )
        return
    table = Table(show_edge=False, header_style="bold")
    for col in ("model", "versions", "aliases"):
        table.add_column(col)
    for d in docs:
        aliases = ", ".join(f"{a}->v{v}" for a, v in sorted(d["aliases"].items()))
        table.add_row(escape(d["name"]), str(len(d["versions"])), escape(aliases))
    out.print(table)


@registry_app.command("show")
def registry_show(name: str, root: RootOpt = None, as_json: JsonOpt = False) -> None:
    """Every version of NAME with its checkpoint and aliases."""
    try:
        doc = Registry(root or default_root()).show(name)
    except CheckpointError as exc:
        raise _fail(exc) from exc
    if as_json:
        out.print_json(json.dumps(doc))
        return
    table = Table(show_edge=False, header_style="bold")
    for col in ("version", "checkpoint", "step", "registered", "by", "aliases"):
        table.add_column(col, overflow="fold")
    for v in doc["versions"]:
        aliases = ", ".join(sorted(a for a, n in doc["aliases"].items() if n == v["version"]))
        by = f"{v.get('user')}@{v.get('host')}"
        table.add_row(
            str(v["version"]),
            escape(v["checkpoint"]),
            str(v.get("step")),
            v["registered_at"],
            escape(by),
            aliases,
        )
    out.print(table)


@registry_app.command("history")
def registry_history(name: str, root: RootOpt = None, as_json: JsonOpt = False) -> None:
    """Every alias move of NAME: when, from, to, why, by whom."""
    try:
        history = Registry(root or default_root()).history(name)
    except CheckpointError as exc:
        raise _fail(exc) from exc
    if as_json:
        out.print_json(json.dumps(history))
        return
    for h in history:
        came = f"v{h['from']}" if h.get("from") is not None else "(new)"
        why = f"  ({escape(str(h['why']))})" if h.get("why") else ""
        by = f"{h.get('user')}@{h.get('host')}"
        out.print(f"{h['when']}  {escape(h['alias'])}: {came} -> v{h['to']}  by {by}{why}")
