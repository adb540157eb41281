"""Exports for other tools: one safetensors file, a torch ``.pt``, a Hugging Face directory, ONNX.

A ckptvault checkpoint is a directory only ckptvault reads in full (trees, views, chunk stores).
The people who consume a trained model use other libraries, so ``ckptvault export`` writes what
those libraries load, each output checked against its real consumer where that is cheap:

* ``safetensors``: every stored tensor in one standalone file (``engine.inspect.export_safetensors``).
* ``torch``: the model's state dict as a ``.pt`` file that ``torch.load(path, weights_only=True)``
  accepts; the file is loaded that way before it is renamed into place, so a state that needs
  pickle (an ``_extra_state`` object, say) fails the export instead of the consumer.
* ``hf``: ``config.json`` + ``model.safetensors`` (or shards and ``model.safetensors.index.json``)
  laid out exactly as ``transformers``' ``save_pretrained`` lays them out.
* ``onnx``: the rebuilt model traced on the checkpoint's probe and run back through onnxruntime;
  an export whose graph computes something else than the model is refused.

Which tensors are "the model": the state dict at the recorded architecture's ``weights`` path
(:func:`ckptvault.save_model`, ``TrainState(model_kwargs=...)``); failing that a ``"model"`` dict of
tensors at the top of the tree (or ``tree["model"]["model"]``, the TrainState layout); failing that
(torch only) every tensor leaf under its dotted tree path. The ``hf`` and ``onnx`` formats need the
recorded architecture, since a config or a graph cannot be made from weights alone.

Every export is atomic: files go to a temporary name beside the output, are fsynced and renamed
into place, so a failure or a crash never leaves a partial output where the caller looks. Reading
goes through the checkpoint's digests; nothing from the checkpoint is unpickled or executed (the
ONNX export does rebuild the model from the recorded factory, as :func:`ckptvault.load_model` does:
its module is imported only when trusted -- imported already, or named by ``trusted_modules`` /
``--trust`` -- and never from the current directory or the checkpoint's directories).

This package is the entry point and the safetensors export; each other format has a module of its
own (``torch_file``, ``hf``, ``onnx_graph``) over two shared ones (``common``: result, errors,
sizes, atomic outputs; ``weights``: which tensors are the model). Every public name is importable
from ``ckptvault.export`` itself.
"""

from __future__ import annotations

import os

from ..storage.resolve import is_url, split_location
from .common import (
    DEFAULT_MAX_SHARD_SIZE,
    ExportError,
    ExportMismatchError,
    ExportResult,
    PathLike,
    Progress,
    parse_size,
)
from .hf import HF_CONFIG, HF_INDEX, HF_WEIGHTS, export_hf, plan_shards
from .onnx_graph import ONNX_ATOL, ONNX_INSTALL_HINT, ONNX_RTOL, export_onnx
from .torch_file import export_torch

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "FORMATS",
    "HF_CONFIG",
    "HF_INDEX",
    "HF_WEIGHTS",
    "ONNX_ATOL",
    "ONNX_INSTALL_HINT",
    "ONNX_RTOL",
    "ExportError",
    "ExportMismatchError",
    "ExportResult",
    "PathLike",
    "Progress",
    "export_checkpoint",
    "export_hf",
    "export_onnx",
    "export_safetensors_file",
    "export_torch",
    "parse_size",
    "plan_shards",
]

FORMATS = ("safetensors", "torch", "hf", "onnx")


def export_checkpoint(
    checkpoint: PathLike,
    out: PathLike,
    *,
    format: str = "safetensors",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    probe: PathLike | None = None,
    opset: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    trusted_modules: list[str] | None = None,
) -> ExportResult:
    """Exports ``checkpoint`` to ``out`` in ``format`` (one of :data:`FORMATS`); see the module doc.
    ``trusted_modules`` (onnx, which rebuilds the model) is :func:`ckptvault.load_model`'s."""
    if format == "safetensors":
        return export_safetensors_file(checkpoint, out, progress=progress)
    if is_url(out):
        raise ExportError(f"--format {format} writes to a local path; export there, then upload it")
    if format == "torch":
        return export_torch(checkpoint, out)
    if format == "hf":
        return export_hf(
            checkpoint, out, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress
        )
    if format == "onnx":
        return export_onnx(checkpoint, out, probe=probe, opset=opset, trusted_modules=trusted_modules)
    raise ExportError(f"unknown export format {format!r}; supported: {', '.join(FORMATS)}")


def export_safetensors_file(
    checkpoint: PathLike, out: PathLike, *, progress: Progress | None = None
) -> ExportResult:
    """Every stored tensor, under its stored name, in one standalone safetensors file."""
    from ..api import storage_for
    from ..engine.inspect import export_safetensors
    from ..engine.reader import CheckpointReader

    storage, target = storage_for(checkpoint)
    size = export_safetensors(storage, target, os.fspath(out), progress=progress)
    with CheckpointReader(storage, target) as reader:
        count = len(reader.manifest.tensors)
    return ExportResult(
        os.fspath(out), "safetensors", (split_location(out)[1],), size, count, "every stored tensor"
    )
