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
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError, StorageError
from .format.dtypes import TORCH_DTYPES
from .format.tensorfile import build_header

PathLike = str | os.PathLike[str]
Progress = Callable[[int], None]

FORMATS = ("safetensors", "torch", "hf", "onnx")
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
ONNX_RTOL, ONNX_ATOL = 1e-4, 1e-5
ONNX_INSTALL_HINT = "pip install 'ckptvault[onnx]'"


class ExportError(CheckpointError):
    """The export cannot be made: unknown format, no recorded architecture or probe, a state the
    target format cannot hold, a missing optional dependency, or the exporter failed."""


class ExportMismatchError(ExportError):
    """The exported ONNX graph does not compute what the model computes on the probe.

    ``max_abs_diff`` is the largest difference seen; the output file was not written.
    """

    def __init__(self, message: str, max_abs_diff: float) -> None:
        super().__init__(message)
        self.max_abs_diff = max_abs_diff


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: ``files`` are relative to ``path`` when it is a directory (``hf``)."""

    path: str
    format: str
    files: tuple[str, ...]
    size_bytes: int
    num_tensors: int
    source: str  # where the exported tensors came from, in words
    max_abs_diff: float | None = None  # onnx: largest |onnxruntime - torch| on the probe

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["files"] = list(self.files)
        return doc


# -- sizes ----------------------------------------------------------------------------------------
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str | int) -> int:
    """Bytes in ``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"1000"``: decimal units as transformers reads
    them (``"5GB"`` is 5·10⁹), binary ones with ``i``. Raises ValueError for anything else."""
    if isinstance(text, int) and not isinstance(text, bool):
        value: float = text
    else:
        match = _SIZE.match(str(text))
        if match is None:
            raise ValueError(f"cannot read {text!r} as a size; use e.g. 5GB, 500MB, 2GiB or a byte count")
        unit = (match.group(2) or "").lower()
        scale = _UNITS[unit[:1]]
        if "i" in unit:
            scale = 1024 ** ("kmgt".index(unit[0]) + 1)
        value = float(match.group(1)) * scale
    if value < 1 or not math.isfinite(value):
        raise ValueError(f"a size must be at least one byte, got {text!r}")
    return int(value)


# -- the entry point ------------------------------------------------------------------------------
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
    from .api import storage_for
    from .engine.inspect import export_safetensors
    from .engine.reader import CheckpointReader

    storage, target = storage_for(checkpoint)
    size = export_safetensors(storage, target, os.fspath(out), progress=progress)
    with CheckpointReader(storage, target) as reader:
        count = len(reader.manifest.tensors)
    return ExportResult(os.fspath(out), "safetensors", (Path(out).name,), size, count, "every stored tensor")


# -- finding the model's tensors ------------------------------------------------------------------
def _is_tensor_dict(value: Any) -> bool:
    import torch

    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _architecture(view: Any) -> Any:
    """The recorded :class:`ModelSpec`, or None when the checkpoint records none."""
    from .training.architecture import ModelSpec

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


def _all_leaves(view: Any) -> tuple[dict[str, Any], list[str]]:
    """Every tensor leaf under its dotted tree path (numpy arrays as tensors where torch has the
    dtype); the paths of arrays torch cannot hold are returned apart."""
    import numpy as np
    import torch

    from .engine.inspect import iter_leaves
    from .engine.lazy import decode_node

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


def _model_weights(view: Any, *, need_architecture: str | None) -> tuple[Mapping[str, Any], str, Any]:
    """(state dict, where it came from, spec or None); ``need_architecture`` names the format that
    cannot do without a recorded architecture."""
    from .training.architecture import ArchitectureError

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


# -- atomic outputs -------------------------------------------------------------------------------
def _temp_beside(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some filesystems cannot open directories; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _atomic_file(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target``; renamed over it (after an fsync) only if the block
    succeeds, removed otherwise."""
    temp = _temp_beside(target)
    try:
        yield temp
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, CheckpointError):
            raise
        raise StorageError(exc.errno or 0, f"cannot export to {target}: {exc}") from exc
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


# -- torch ----------------------------------------------------------------------------------------
def export_torch(checkpoint: PathLike, out: PathLike) -> ExportResult:
    """The model's state dict as a ``.pt`` file for ``torch.load(path, weights_only=True)``.

    Tensors that share storage in the checkpoint (tied weights) share it in the file, as with
    ``torch.save(model.state_dict())``. Without a recorded architecture or a ``"model"`` dict, the
    file holds every tensor leaf under its dotted tree path (``optimizer.state.0.exp_avg``).
    """
    import torch

    from .api import open as open_checkpoint

    target = Path(out)
    with open_checkpoint(checkpoint) as view:
        weights, source, _ = _model_weights(view, need_architecture=None)
        skipped: list[str] = []
        if not source:
            weights, skipped = _all_leaves(view)
            source = "every tensor leaf by its dotted tree path"
            if skipped:
                source += f" (skipped {len(skipped)} arrays torch cannot hold: {skipped[:5]})"
    with _atomic_file(target) as temp:
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
    return ExportResult(str(target), "torch", (target.name,), target.stat().st_size, tensors, source)


# -- Hugging Face -------------------------------------------------------------------------------
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
    with open(path, "wb") as handle:
        handle.write(header)
        for _name, tensor in tensors:
            flat = tensor.detach().contiguous().reshape(-1)
            if flat.numel():
                data = flat.view(torch.uint8).numpy()
                handle.write(memoryview(data))
                size += data.nbytes
                if progress is not None:
                    progress(data.nbytes)
        handle.flush()
        os.fsync(handle.fileno())
    return size


def _install_directory(temp: Path, target: Path, overwrite: bool) -> None:
    """Renames the finished ``temp`` directory to ``target``; an existing ``target`` is replaced
    only with ``overwrite`` and only when it is an earlier export (it has a config.json)."""
    if target.exists() or target.is_symlink():
        if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
            target.rmdir()
        elif not overwrite:
            raise ExportError(f"{target} exists; pass overwrite (--overwrite) to replace an earlier export")
        elif not (target.is_dir() and not target.is_symlink() and (target / HF_CONFIG).is_file()):
            raise ExportError(
                f"{target} exists and is not an earlier export (no {HF_CONFIG}); not replacing it"
            )
        else:
            old = _temp_beside(target)
            os.rename(target, old)
            try:
                os.rename(temp, target)
            except BaseException:
                os.rename(old, target)  # the earlier export stays where it was
                raise
            _fsync_dir(target.parent)
            shutil.rmtree(old, ignore_errors=True)
            return
    os.rename(temp, target)
    _fsync_dir(target.parent)


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

    from .api import open as open_checkpoint

    limit = parse_size(max_shard_size)
    target = Path(out)
    with open_checkpoint(checkpoint) as view:
        weights, source, spec = _model_weights(view, need_architecture="hf")
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
        temp = _temp_beside(target)
        try:
            temp.mkdir()
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
            _fsync_dir(temp)
            _install_directory(temp, target, overwrite)
        except OSError as exc:
            shutil.rmtree(temp, ignore_errors=True)
            if isinstance(exc, CheckpointError):
                raise
            raise StorageError(exc.errno or 0, f"cannot export to {target}: {exc}") from exc
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
    size = total + sum((target / f).stat().st_size for f in files if not f.endswith(".safetensors"))
    return ExportResult(str(target), "hf", tuple(sorted(files)), size, len(weights), source)


def _write_json(path: Path, doc: Any) -> None:
    """JSON as transformers writes its config and index: 2-space indent, sorted keys, newline."""
    text = json.dumps(doc, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False) + "\n"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


# -- ONNX -----------------------------------------------------------------------------------------
def _onnx_modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ExportError(
            f"ONNX export needs the onnx and onnxruntime packages ({exc.name} is missing): "
            f"{ONNX_INSTALL_HINT}"
        ) from exc
    return onnx, onnxruntime


def _probe_tensors(tensors: Mapping[str, Any], where: str) -> tuple[list[Any], list[Any]]:
    """``input.N`` and ``expected.N`` of a probe file, each numbered from 0 without gaps."""
    found: dict[str, list[Any]] = {}
    for prefix in ("input", "expected"):
        count = sum(1 for k in tensors if k.startswith(prefix + "."))
        try:
            found[prefix] = [tensors[f"{prefix}.{i}"] for i in range(count)]
        except KeyError as exc:
            raise ExportError(f"{where}: probe tensors {prefix}.N are not numbered 0..{count - 1}") from exc
    if not found["input"]:
        raise ExportError(f"{where} holds no probe inputs (tensors named input.0, input.1, ...)")
    return found["input"], found["expected"]


def _load_probe(checkpoint: str, probe: PathLike | None) -> tuple[list[Any], list[Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load
    from safetensors.torch import load_file

    from .api import storage_for
    from .engine.reader import CheckpointReader
    from .validation import PROBE_FILE

    if probe is not None:
        try:
            return _probe_tensors(load_file(os.fspath(probe)), os.fspath(probe))
        except (OSError, SafetensorError) as exc:
            raise ExportError(f"cannot read the probe file {os.fspath(probe)}: {exc}") from exc
    storage, target = storage_for(checkpoint)
    with CheckpointReader(storage, target) as reader:
        try:
            raw = reader.read_file(PROBE_FILE)
        except KeyError:
            raise ExportError(
                f"{checkpoint}: ONNX export traces the model on a probe input, and this checkpoint stores "
                "none (save with ckptvault.save_model(..., probe=...)); give one with --probe "
                "FILE.safetensors holding tensors input.0, input.1, ..."
            ) from None
    return _probe_tensors(st_load(raw), f"{checkpoint}/{PROBE_FILE}")


def _flat_outputs(value: Any) -> list[Any]:
    """Output tensors in the order the ONNX exporter flattens them (dicts in insertion order)."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _flat_outputs(item)]
    if isinstance(value, Mapping):
        return [t for item in value.values() for t in _flat_outputs(item)]
    raise ExportError(f"the model returned a {type(value).__qualname__}; ONNX export needs tensors")


def _numpy(tensor: Any, what: str) -> Any:
    try:
        return tensor.detach().cpu().numpy()
    except TypeError as exc:
        raise ExportError(f"{what} has dtype {tensor.dtype}, which numpy/onnxruntime cannot take") from exc


def _run_exporter(
    model: Any, inputs: tuple[Any, ...], outputs: list[Any], path: Path, opset: int | None
) -> str:
    """Exports with the TorchScript-based exporter (needs only onnx); falls back to the
    torch.export-based one when that fails and onnxscript is installed. Returns which one worked."""
    import importlib.util

    import torch

    input_names = [f"input_{i}" for i in range(len(inputs))]
    output_names = [f"output_{i}" for i in range(len(outputs))]
    # Dimension 0 of every input and output may vary (the batch); the probe's is only an example.
    named = zip([*input_names, *output_names], [*inputs, *outputs], strict=True)
    dynamic = {name: {0: "batch"} for name, t in named if t.dim() > 0}
    # The torch.export-based exporter would write weights beside the graph and print progress.
    dynamo_only: dict[str, Any] = {"external_data": False, "verbose": False}
    failures: list[str] = []
    for dynamo in (False, True):
        if dynamo and importlib.util.find_spec("onnxscript") is None:
            failures.append("the torch.export-based exporter needs onnxscript, which is not installed")
            break
        try:
            with warnings.catch_warnings():
                # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
                # onnxscript; we use it on purpose, so its deprecation notice is noise here.
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(
                    model,
                    inputs,
                    os.fspath(path),
                    dynamo=dynamo,
                    input_names=input_names,
                    output_names=output_names,
                    opset_version=opset,
                    dynamic_axes=dynamic,
                    do_constant_folding=True,
                    **(dynamo_only if dynamo else {}),
                )
            return "torch.onnx (torch.export-based)" if dynamo else "torch.onnx (TorchScript-based)"
        except Exception as exc:  # the exporters raise many kinds; each is reported
            kind = "torch.export-based" if dynamo else "TorchScript-based"
            failures.append(f"{kind} exporter: {type(exc).__name__}: {str(exc)[:500]}")
            for leftover in path.parent.iterdir():
                leftover.unlink()
    raise ExportError("torch.onnx.export failed: " + "; ".join(failures))


def export_onnx(
    checkpoint: PathLike,
    out: PathLike,
    *,
    probe: PathLike | None = None,
    opset: int | None = None,
    trusted_modules: list[str] | None = None,
) -> ExportResult:
    """The rebuilt model as an ONNX graph, proven against the model on the probe.

    Needs a recorded architecture (:func:`ckptvault.load_model` rebuilds the model) and a probe: the
    checkpoint's ``validation-probe.safetensors`` or ``probe``, a safetensors file of ``input.0``,
    ``input.1``, ... The model is traced on the probe (batch dimension left dynamic) and the graph
    run through onnxruntime on it; each output must match the model's within rtol 1e-4, atol 1e-5
    (:class:`ExportMismatchError` otherwise). When the probe also records ``expected.N`` outputs,
    the rebuilt model must reproduce them first, so what is exported is the model that was saved.
    Needs the ``onnx`` extra (``pip install 'ckptvault[onnx]'``). The model is rebuilt by
    :func:`ckptvault.load_model` (``trusted_modules`` as there: an untrusted factory module is an
    :class:`~ckptvault.training.architecture.ArchitectureError`, nothing imported).
    """
    import numpy as np
    import torch

    from .api import load_model
    from .api import open as open_checkpoint
    from .validation import GPU_TOLERANCE, run_probe

    onnx, ort = _onnx_modules()
    source_path = os.fspath(checkpoint)
    with open_checkpoint(checkpoint) as view:
        _, source, _ = _model_weights(view, need_architecture="onnx")
    inputs, expected = _load_probe(source_path, probe)
    model = load_model(checkpoint, trusted_modules=trusted_modules)
    if expected:
        # The recorded outputs are in the probe's own order (dict outputs by sorted key).
        recorded = run_probe(model, inputs)
        for i, (got, want) in enumerate(zip(recorded, expected, strict=False)):
            if got.shape != want.shape or not torch.allclose(
                got, want.to(got.dtype), equal_nan=True, **GPU_TOLERANCE
            ):
                raise ExportError(
                    f"{source_path}: the rebuilt model's output {i} differs from the one recorded with the "
                    "probe; the checkpoint does not reproduce its model (see ckptvault validate)"
                )
    with torch.no_grad():
        reference = [t.detach() for t in _flat_outputs(model(*inputs))]
    target = Path(out)
    work = _temp_beside(target)
    try:
        work.mkdir()
        graph = work / (target.name or "model.onnx")
        exporter = _run_exporter(model, tuple(inputs), reference, graph, opset)
        if sorted(p.name for p in work.iterdir()) != [graph.name]:
            raise ExportError(
                "the model exceeds protobuf's 2 GB limit (the exporter wrote external data files); "
                "this export writes single-file ONNX graphs only"
            )
        try:
            onnx.checker.check_model(os.fspath(graph))
        except Exception as exc:  # onnx.checker.ValidationError and friends
            raise ExportError(f"the exported graph is not valid ONNX: {exc}") from exc
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(os.fspath(graph), options, providers=["CPUExecutionProvider"])
        feed_names = {i.name for i in session.get_inputs()}
        feed = {
            f"input_{i}": _numpy(t, f"probe input {i}")
            for i, t in enumerate(inputs)
            if f"input_{i}" in feed_names
        }
        outputs = session.run(None, feed)
        if len(outputs) != len(reference):
            raise ExportMismatchError(
                f"the ONNX graph gives {len(outputs)} outputs, the model {len(reference)}", math.inf
            )
        worst = 0.0
        for i, (got, want) in enumerate(zip(outputs, reference, strict=True)):
            want_np = _numpy(want, f"model output {i}")
            if got.shape != want_np.shape:
                raise ExportMismatchError(
                    f"ONNX output {i} has shape {got.shape}, the model's {want_np.shape}", math.inf
                )
            if want_np.size:
                diff = np.abs(got.astype(np.float64) - want_np.astype(np.float64))
                worst = max(worst, float(np.nanmax(diff)) if not np.isnan(diff).all() else 0.0)
            try:
                np.testing.assert_allclose(got, want_np, rtol=ONNX_RTOL, atol=ONNX_ATOL)
            except AssertionError as exc:
                raise ExportMismatchError(
                    f"ONNX output {i} differs from the torch model's on the probe "
                    f"(rtol {ONNX_RTOL}, atol {ONNX_ATOL}): {exc}",
                    worst,
                ) from None
        del session
        with open(graph, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(graph, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise StorageError(exc.errno or 0, f"cannot export to {target}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n_params = len(model.state_dict())
    source = f"{source}; {exporter}, checked with onnxruntime on the probe"
    return ExportResult(str(target), "onnx", (target.name,), target.stat().st_size, n_params, source, worst)
