"""The probe, made in the training process at save time: the model's output on a probe batch,
and ``validation-probe.safetensors`` that carries the inputs, that output and the metrics.

Split out of ``ckptvault.validation`` (issue 14); ``ckptvault.validation`` re-exports its public
names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..format.strictjson import dumps
from .results import PROBE_FORMAT, number


def _tensors(value: Any, what: str) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return list(value)
    if isinstance(value, Mapping) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
        return [value[k] for k in sorted(value)]
    raise TypeError(
        f"the {what} must be a tensor or a tuple/list/dict of tensors, got {type(value).__qualname__}"
    )


def run_probe(model: Any, inputs: list[Any]) -> list[Any]:
    """The model's output on the probe, in eval mode, without gradients, single-threaded, with the
    RNG states and each module's training flag left as they were."""
    import torch

    flags = [(m, m.training) for m in model.modules()]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()
            output = model(*inputs)
    finally:
        torch.set_num_threads(threads)
        for module, training in flags:
            module.training = training
    return [t.detach() for t in _tensors(output, "model output")]


def make_probe_file(model: Any, probe: Any, metrics: Mapping[str, Any] | None) -> bytes:
    """``validation-probe.safetensors``: the probe inputs, the model's outputs and the metrics."""
    import torch
    from safetensors.torch import save as st_save

    # Fresh, allocator-aligned copies: float kernels may round differently on unaligned memory, and
    # the worker runs the probe from fresh memory too.
    inputs = [t.detach().clone(memory_format=torch.contiguous_format) for t in _tensors(probe, "probe")]
    outputs = run_probe(model, inputs)
    tensors = {f"input.{i}": t.detach().cpu().contiguous() for i, t in enumerate(inputs)}
    tensors.update({f"expected.{i}": t.cpu().contiguous() for i, t in enumerate(outputs)})
    device = str(outputs[0].device) if outputs else "cpu"
    meta = {
        "format": PROBE_FORMAT,
        "device": device,
        "metrics": dumps(_plain_metrics(metrics or {})).decode(),
    }
    return bytes(st_save(tensors, metadata=meta))


def _plain_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        number_ = number(value)
        if number_ is not None:
            out[str(key)] = number_ if math.isfinite(number_) else repr(number_)
    return out
