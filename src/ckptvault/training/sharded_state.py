"""A TrainState across the ranks of a torch.distributed job: what each rank saves, and restores.

The state a rank passes to :func:`ckptvault.distributed.save` is the ordinary captured tree with
two changes:

* model and optimizer state come from torch's ``get_model_state_dict`` /
  ``get_optimizer_state_dict`` (and go back through the ``set_*`` twins): sharded parameters stay
  DTensors, so each rank writes only its shard, and the optimizer's state is keyed by parameter
  name and exists before the first step -- DCP loads *into* the tensors it is given, and an
  optimizer that has not stepped yet has no moment tensors to load into;
* what differs from rank to rank -- RNG states, the data position (a ``DistributedSampler``'s or
  a stateful loader's), the metrics history -- moves under ``ranks.<rank>``. DCP keeps one copy of
  any value several ranks save under the same key, so without the rank in the key every rank
  would come back with one rank's random streams.

Restored at another world size, a rank whose ``ranks.<rank>`` part was not saved (or a part
saved by a rank that no longer exists) cannot get its own streams back; the restore says which
ranks' parts it could not restore, and those ranks keep their current RNG and data position.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..engine.arrays import BlobCollector
from ..errors import UnsupportedStateError
from ..format.tree import TreeEncoder
from .state import FULL, TrainState

RANKS_KEY = "ranks"
RANK_LOCAL = ("rng", "data", "metrics_history")


def _model_for_optimizers(state: TrainState) -> Any:
    models = list(state.parts["model"].values())
    if state.parts["optimizer"] and len(models) != 1:
        raise UnsupportedStateError(
            "optimizer",
            f"a distributed TrainState pairs its optimizers with one model; it has {len(models)}",
        )
    return models[0] if models else None


def sharded_tree(state: TrainState, scope: str, rank: int) -> dict[str, Any]:
    """The tree this rank saves (see the module docstring)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    tree = state.capture(scope)
    model = _model_for_optimizers(state)
    if "model" in tree:
        tree["model"] = {name: get_model_state_dict(m) for name, m in state.parts["model"].items()}
    if "optimizer" in tree:
        tree["optimizer"] = {
            name: get_optimizer_state_dict(model, opt) for name, opt in state.parts["optimizer"].items()
        }
    local = {key: tree.pop(key) for key in RANK_LOCAL if key in tree}
    if local:
        tree[RANKS_KEY] = {str(rank): local}
    return tree


def expect_saved(template: dict[str, Any], saved: Iterable[tuple[Any, ...]], rank: int) -> None:
    """Adds to a load template the keys of this rank's own part that the checkpoint holds and the
    template lacks (a ``None`` to load into).

    DCP loads *into* the template: a key absent from it is silently not read. The template is this
    rank's current state, whose metrics history of a fresh process has no columns yet -- without
    this, a resumed rank would come back with the saved history's columns dropped."""
    for path in saved:
        if len(path) < 3 or path[0] != RANKS_KEY or path[1] != str(rank):
            continue
        node: Any = template
        for key in path[:-1]:
            if not isinstance(node, dict):
                break
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            node = child
        else:
            if isinstance(node, dict):
                node.setdefault(path[-1], None)


def restore_sharded(
    state: TrainState, loaded: Mapping[str, Any], rank: int, *, partial: bool = False
) -> list[str]:
    """Puts a tree loaded into :func:`sharded_tree`'s template back into ``state``: model and
    optimizer through torch's ``set_*`` functions, the rest as :meth:`TrainState.restore` does.
    Returns what was not restored (this rank's own part, when the checkpoint has none for it)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model = _model_for_optimizers(state)
    tree = dict(loaded)
    for name, m in state.parts["model"].items():
        if name in tree.get("model", {}):
            set_model_state_dict(m, tree["model"][name])
    for name, opt in state.parts["optimizer"].items():
        if name in tree.get("optimizer", {}):
            set_optimizer_state_dict(model, opt, tree["optimizer"][name])
    missing: list[str] = []
    own = tree.pop(RANKS_KEY, {}).get(str(rank))
    if own is not None:
        tree.update(own)
    elif tree.get("scope") == FULL:
        missing.append(f"rank {rank}'s RNG states and data position (not in this checkpoint)")
        current = state.capture(FULL)  # this rank keeps its own streams and position
        for key in RANK_LOCAL:
            tree.setdefault(key, current[key])
    missing += state.restore(tree, partial=True if missing else partial, skip=("model", "optimizer"))
    return missing


def unsendable(tree: Any, path: str = "") -> str | None:
    """The first non-tensor value of ``tree`` that cannot be stored (as text), or None.

    DCP sends every rank's non-tensor values to the coordinator by pickling them inside its first
    collective; a rank that fails there raises alone while its peers wait in that collective until
    it times out. Checked before the save (and the verdict shared by the manager) every rank fails
    at once instead."""
    import torch

    if isinstance(tree, torch.Tensor):
        return None
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            found = unsendable(value, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
        return None
    if isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            found = unsendable(value, f"{path}.{i}")
            if found is not None:
                return found
        return None
    try:  # what ckptvault can encode, DCP can carry too (plain values, arrays, torch objects)
        TreeEncoder(BlobCollector()).encode(tree, path or "state")
    except Exception as exc:
        return f"{path or 'the state'} cannot be saved: {type(exc).__name__}: {exc}"
    return None
