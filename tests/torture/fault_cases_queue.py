"""The fault-loop case of the queued async writer (the Lightning plugin's): a top-k save, ``last.ckpt``
overwritten, and the pruning of the old top-k checkpoint, all queued behind one another.

Beyond the promises every case checks (nothing half-visible, typed errors, the next operation
succeeds), the queue adds one of its own: the old checkpoint is pruned only after the new one is
committed, so whatever fault stops the sequence, ``c1`` is still there unless ``c2`` is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptvault.testing.invariants import check_checkpoints, visible_checkpoints

from .fault_cases import Case, state_of

NAMES = ["c1", "c2", "last"]


def _plugin(*, async_save: bool) -> Any:
    from ckptvault.integrations.lightning import VaultCheckpointIO

    return VaultCheckpointIO(async_save=async_save)


def lightning_queue_case() -> Case:
    def build(root: Path) -> dict[str, Any]:
        a, b = {"state_dict": state_of(1), "global_step": 1}, {"state_dict": state_of(2), "global_step": 2}
        plugin = _plugin(async_save=False)
        plugin.save_checkpoint(a, root / "c1")
        plugin.save_checkpoint(a, root / "last")
        return {"a": a, "b": b}

    def sequence(root: Path, ctx: dict[str, Any], *, async_save: bool) -> None:
        plugin = _plugin(async_save=async_save)
        plugin.save_checkpoint(ctx["b"], root / "c2")
        plugin.save_checkpoint(ctx["b"], root / "last")
        plugin.remove_checkpoint(root / "c1")
        plugin.teardown()

    def check(root: Path, ctx: dict[str, Any], completed: bool) -> list[str]:
        visible = set(visible_checkpoints(root))
        problems = check_checkpoints(
            root,
            expected={"c1": [ctx["a"]], "c2": [ctx["b"]], "last": [ctx["a"], ctx["b"]]},
            must_exist=["c2", "last"] if completed else ["last"],
            may_exist=NAMES,
        )
        if "c1" not in visible and "c2" not in visible:
            problems.append("c1 was pruned although c2 was never committed")
        if completed and "c1" in visible:
            problems.append("the sequence completed but c1 was not pruned")
        return problems

    def after(root: Path, ctx: dict[str, Any]) -> list[str]:
        problems = check_checkpoints(
            root,
            expected={"c2": [ctx["b"]], "last": [ctx["b"]]},
            must_exist=["c2", "last"],
            may_exist=["c2", "last"],
        )
        return problems

    return Case(
        "lightning_queue",
        build,
        lambda root, ctx: sequence(root, ctx, async_save=True),
        check,
        lambda root, ctx: sequence(root, ctx, async_save=False),
        after,
    )
