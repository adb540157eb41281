"""Which tensors are "the model" in a checkpoint, for the formats that export a state dict.

Split out of ``ckptvault.export``: the torch, hf and onnx exports all answer this one question the
same way (the recorded architecture's ``weights`` path, else a ``"model"`` dict of tensors, else --
torch only -- every tensor leaf), so the rule lives once, here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .common import ExportError


def _is_tensor_dict(value: Any) -> bool:
    import torch

    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _architecture(view: Any) -> Any:
    """The recorded :class:`ModelSpec`, or None when the checkpoint records none."""
    from ..training.architecture import ModelSpec

    doc = view.metadata.get("architecture")
    return None if doc is None else ModelSpec.from_metadata(doc)


def _weights_at(view: Any, keys: tuple[str, ...]) -> Mapping[str, Any]:
    node: Any = view
    try:
        for key in keys:
            node = node[key]
    except (KeyError, TypeError) as exc:
        raise ExportError(
            f"{view.path}: the recorded architecture puts the weights at {list(keys)}, "
            "but the checkpoint has nothing there"
        ) from exc
    weights = node.load() if hasattr(node, "load") else node
    if not isinstance(weights, Mapping) or not all(isinstance(k, str) for k in weights):
        raise ExportError(f"{view.path}: the value at {list(keys)} is not a state dict")
    return weights


def _conventional_weights(view: Any) -> tuple[Mapping[str, Any], str] | None:
    """``tree["model"]`` or ``tree["model"]["model"]`` when it is a dict of tensors."""
    top_level = view.keys()  # a CheckpointView is not iterable: ``in view`` would not work
    if "model" not in top_level:
        return None
    node = view["model"]
    value = node.load() if hasattr(node, "load") else node
    if _is_tensor_dict(value):
        return value, "tree['model']"
    if isinstance(value, Mapping) and _is_tensor_dict(value.get("model")):
        return value["model"], "tree['model']['model']"
    return None


def all_leaves(view: Any) -> tuple[dict[str, Any], list[str]]:
    """Every tensor leaf under its dotted tree path (numpy arrays as tensors where torch has the
    dtype); the paths of arrays torch cannot hold are returned apart."""
    import numpy as np
    import torch

    from ..engine.inspect import iter_leaves
    from ..engine.lazy import decode_node

    tensors: dict[str, Any] = {}
    skipped: list[str] = []
    for leaf in iter_leaves(view.manifest.tree, path=view.path):
        value = decode_node(view, leaf.node, leaf.path)
        if isinstance(value, np.ndarray):
            try:
                value = torch.from_numpy(np.ascontiguousarray(value))
            except TypeError:
                skipped.append(leaf.path)
                continue
        if leaf.path in tensors:
            raise ExportError(f"{view.path}: two tensors share the dotted path {leaf.path!r}")
        tensors[leaf.path] = value
    return tensors, skipped


def model_weights(view: Any, *, need_architecture: str | None) -> tuple[Mapping[str, Any], str, Any]:
    """(state dict, where it came from, spec or None); ``need_architecture`` names the format that
    cannot do without a recorded architecture."""
    from ..training.architecture import ArchitectureError

    try:
        spec = _architecture(view)
    except ArchitectureError as exc:
        raise ExportError(f"{view.path}: bad recorded architecture: {exc}") from exc
    if spec is not None:
        return _weights_at(view, spec.weights), f"architecture weights {list(spec.weights)}", spec
    if need_architecture is not None:
        raise ExportError(
            f"{view.path}: --format {need_architecture} needs the model's recorded architecture "
            "(metadata 'architecture': save with ckptvault.save_model(..., kwargs=...) or "
            "TrainState(model_kwargs=...)), and this checkpoint records none; "
            "--format torch or safetensors export its tensors without it"
        )
    found = _conventional_weights(view)
    if found is not None:
        return found[0], found[1], None
    return {}, "", None
