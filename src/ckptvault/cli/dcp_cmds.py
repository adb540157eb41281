"""``ckptvault import-dcp`` and ``ckptvault export-dcp``: moving checkpoints in and out of
torch.distributed.checkpoint's own directory format (``FileSystemWriter``).

They are commands of their own rather than ``export --format dcp``: ``export`` writes what model
consumers load (the model's weights, checked against its consumer), while these carry the whole
training state -- optimizer, counters, sharding -- both ways. ``cli.main`` registers them.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import CheckpointError
from .inert import console, emit_json, error_text, inert

out = console()
err = console(stderr=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _fail(exc: BaseException) -> typer.Exit:
    err.print(f"[red]error:[/red] {error_text(exc, with_type=isinstance(exc, CheckpointError))}")
    return typer.Exit(1)


def import_dcp_command(
    source: Annotated[
        str, typer.Argument(help="A DCP checkpoint directory (FileSystemWriter's).", metavar="SRC")
    ],
    target: Annotated[
        str, typer.Argument(help="The new checkpoint: a local path or an s3:// URL.", metavar="DST")
    ],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a checkpoint at DST.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Convert a torch.distributed.checkpoint directory (its .metadata read by a restricted
    unpickler, its items by torch.load(weights_only=True)); sharded tensors stay sharded."""
    from ..distributed.interop import import_dcp

    try:
        manifest = import_dcp(source, target, overwrite=overwrite)
    except (CheckpointError, OSError) as exc:
        raise _fail(exc) from exc
    pieces = {name for entry in manifest.sharded.values() for _, name in entry.shards}
    tensors = sum(1 for name in manifest.tensors if name not in pieces) + len(manifest.sharded)
    if as_json:
        emit_json(
            {
                "source": source,
                "target": target,
                "checkpoint_id": manifest.checkpoint_id,
                "tensors": tensors,
                "sharded": len(manifest.sharded),
            }
        )
        return
    out.print(
        f"imported {inert(source)} -> {inert(target)} "
        f"({tensors} tensors, {len(manifest.sharded)} of them sharded)"
    )


def export_dcp_command(
    source: Annotated[str, typer.Argument(help="A checkpoint: a local path or an s3:// URL.", metavar="SRC")],
    target: Annotated[str, typer.Argument(help="The DCP directory to write.", metavar="DST")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty DST.")] = False,
) -> None:
    """Write a checkpoint (verified, consolidated) as a torch.distributed.checkpoint directory
    that dcp.load with FileSystemReader reads."""
    from ..distributed.interop import export_dcp

    try:
        path = export_dcp(source, target, overwrite=overwrite)
    except (CheckpointError, OSError) as exc:
        raise _fail(exc) from exc
    out.print(f"exported {inert(source)} -> {inert(str(path))} (DCP FileSystemWriter format)")
