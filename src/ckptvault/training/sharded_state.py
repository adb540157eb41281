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

from collections.abc import Mapping
from typing import Any

from ..errors import UnsupportedStateError
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
