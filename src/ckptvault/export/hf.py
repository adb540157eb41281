"""``--format hf``: a Hugging Face model directory laid out as ``save_pretrained`` lays it out.

Split out of ``ckptvault.export`` (one module per format): ``config.json``, ``model.safetensors``
or its shards and ``model.safetensors.index.json``, the shard plan transformers uses, and the
directory install that replaces only an earlier export.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..format.dtypes import TORCH_DTYPES
from ..format.tensorfile import build_header
from ..storage.localfiles import Refusal, durable_output, file_size, publish_directory
from .common import (
    DEFAULT_MAX_SHARD_SIZE,
    ExportError,
    ExportResult,
    PathLike,
    Progress,
    parse_size,
)
from .weights import model_weights

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"


def _dtype_name(tensor: Any) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _main_dtype(weights: Mapping[str, Any]) -> str | None:
    """The dtype holding the most floating-point bytes (the model's dtype, for ``torch_dtype``);
    the most bytes of any dtype when no tensor is floating point."""
    floating: Counter[str] = Counter()
    other: Counter[str] = Counter()
    for tensor in weights.values():
        counter = floating if tensor.is_floating_point() else other
        counter[_dtype_name(tensor)] += tensor.numel() * tensor.element_size()
    for counter in (floating, other):
        if counter:
            return counter.most_common(1)[0][0]
    return None


def _safetensors_code(name: str, tensor: Any) -> str:
    form = TORCH_DTYPES.get(_dtype_name(tensor))
    if form is None or form.extra_dim:
        raise ExportError(
            f"tensor {name!r} has dtype {_dtype_name(tensor)}, which a standard safetensors file cannot hold"
        )
    return form.code


def plan_shards(sizes: Mapping[str, int], max_shard_size: int) -> list[list[str]]:
    """Tensor names per shard, by the rule of ``huggingface_hub.split_torch_state_dict_into_shards``
    (which ``save_pretrained`` uses): in state-dict order, a tensor larger than the limit gets a
    shard of its own, and a tensor that would push the current shard past the limit starts a new one.
    """
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, size in sizes.items():
        if size > max_shard_size:
            shards.append([name])
            continue
        if current and current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current or not shards:
        shards.append(current)
    return shards


def _write_safetensors(
    path: Path, tensors: list[tuple[str, Any]], metadata: dict[str, str], progress: Progress | None
) -> int:
    """One safetensors file, streamed a tensor at a time (never the whole shard in memory)."""
    import torch

    header = build_header(
        [
            (name, _safetensors_code(name, t), tuple(t.shape), t.numel() * t.element_size())
            for name, t in tensors
        ],
        metadata,
    )
    size = len(header)
    with durable_output(path) as handle:
        handle.write(header)
        for _name, tensor in tensors:
            flat = tensor.detach().contiguous().reshape(-1)
            if flat.numel():
                data = flat.view(torch.uint8).numpy()
                handle.write(memoryview(data))
                size += data.nbytes
                if progress is not None:
                    progress(data.nbytes)
    return size


def _refusal(target: Path) -> Callable[[Refusal], ExportError]:
    """Why an existing ``target`` is not replaced, in the words of an export."""

    def refuse(why: Refusal) -> ExportError:
        if why == "exists":
            return ExportError(f"{target} exists; pass overwrite (--overwrite) to replace an earlier export")
        return ExportError(f"{target} exists and is not an earlier export (no {HF_CONFIG}); not replacing it")

    return refuse


def export_hf(
    checkpoint: PathLike,
    out: PathLike,
    *,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """A Hugging Face style model directory, as ``save_pretrained`` writes it.

    ``config.json`` holds the recorded architecture kwargs, ``"ckptvault_factory"`` (the factory
    reference, for rebuilding the model with ``factory(**kwargs)``) and ``"torch_dtype"``. Weights
    go to ``model.safetensors`` with metadata ``{"format": "pt"}``, or when they exceed
    ``max_shard_size`` to ``model-00001-of-0000N.safetensors`` shards and
    ``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map": ...}``).

    Tied/shared tensors: safetensors refuses aliased storage, and transformers drops tied copies
    using its own declarations of which weights are tied, which a ckptvault checkpoint does not have.
    So every name gets its own copy of the bytes (a clone), and loading with ``strict=True`` works
    whether or not the rebuilt model ties them again.
    """
    import torch

    from ..api import open as open_checkpoint

    limit = parse_size(max_shard_size)
    target = Path(out)
    with open_checkpoint(checkpoint) as view:
        weights, source, spec = model_weights(view, need_architecture="hf")
        for name, value in weights.items():
            if not isinstance(value, torch.Tensor):
                raise ExportError(
                    f"{view.path}: state dict entry {name!r} is a {type(value).__qualname__}, "
                    "not a tensor; safetensors holds tensors only"
                )
        clash = sorted({"ckptvault_factory", "torch_dtype"} & set(spec.kwargs))
        if clash:
            raise ExportError(f"the model kwargs use the config keys {clash} that the export adds")
        config = {**spec.kwargs, "ckptvault_factory": spec.factory, "torch_dtype": _main_dtype(weights)}
        try:
            json.dumps(config, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ExportError(f"the recorded model kwargs cannot be written as config.json: {exc}") from exc
        sizes = {name: t.numel() * t.element_size() for name, t in weights.items()}
        shards = plan_shards(sizes, limit)
        names = [HF_WEIGHTS] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
        ]  # fmt: skip
        # Staged in a sibling directory and renamed into place whole; an existing target is
        # replaced only with overwrite and only when it is an earlier export (it has a config.json).
        with publish_directory(
            target, overwrite=overwrite, marker=HF_CONFIG, refuse=_refusal(target), action="export to"
        ) as temp:
            total = 0
            for file_name, shard in zip(names, shards, strict=True):
                # A tensor whose bytes are already in a shard (tied) is written again: a clone.
                total += _write_safetensors(
                    temp / file_name, [(n, weights[n]) for n in shard], {"format": "pt"}, progress
                )
            _write_json(temp / HF_CONFIG, config)
            files = [HF_CONFIG, *names]
            if len(shards) > 1:
                weight_map = {n: f for f, shard in zip(names, shards, strict=True) for n in shard}
                _write_json(
                    temp / HF_INDEX,
                    {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map},
                )
                files.append(HF_INDEX)
    size = total + sum(file_size(target / f) for f in files if not f.endswith(".safetensors"))
    return ExportResult(str(target), "hf", tuple(sorted(files)), size, len(weights), source)


def _write_json(path: Path, doc: Any) -> None:
    """JSON as transformers writes its config and index: 2-space indent, sorted keys, newline."""
    text = json.dumps(doc, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False) + "\n"
    with durable_output(path) as handle:
        handle.write(text.encode("utf-8"))
