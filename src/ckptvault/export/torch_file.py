"""``--format torch``: the model's state dict as a ``.pt`` file for ``torch.load(weights_only=True)``.

Split out of ``ckptvault.export`` (one module per format). The file is loaded back that way before
it is renamed into place, so a state that needs pickle fails the export instead of the consumer.
"""

from __future__ import annotations

from pathlib import Path

from ..storage.atomic_file import atomic_path
from ..storage.localfiles import file_size
from .common import ExportError, ExportResult, PathLike
from .weights import all_leaves, model_weights


def export_torch(checkpoint: PathLike, out: PathLike) -> ExportResult:
    """The model's state dict as a ``.pt`` file for ``torch.load(path, weights_only=True)``.

    Tensors that share storage in the checkpoint (tied weights) share it in the file, as with
    ``torch.save(model.state_dict())``. Without a recorded architecture or a ``"model"`` dict, the
    file holds every tensor leaf under its dotted tree path (``optimizer.state.0.exp_avg``).
    """
    import torch

    from ..api import open as open_checkpoint

    target = Path(out)
    with open_checkpoint(checkpoint) as view:
        weights, source, _ = model_weights(view, need_architecture=None)
        skipped: list[str] = []
        if not source:
            weights, skipped = all_leaves(view)
            source = "every tensor leaf by its dotted tree path"
            if skipped:
                source += f" (skipped {len(skipped)} arrays torch cannot hold: {skipped[:5]})"
    with atomic_path(target, "export to") as temp:
        with open(temp, "wb") as handle:
            torch.save(weights, handle)
        try:
            back = torch.load(temp, weights_only=True, mmap=True)
        except Exception as exc:  # the UnpicklingError of weights_only, or anything torch refuses
            raise ExportError(
                f"the state at {source} is not loadable with torch.load(weights_only=True): {exc}"
            ) from exc
        if list(back) != list(weights):
            raise ExportError(f"{target}: torch.load gave back other keys than were saved")
        del back
    tensors = sum(isinstance(v, torch.Tensor) for v in weights.values())
    return ExportResult(str(target), "torch", (target.name,), file_size(target), tensors, source)
