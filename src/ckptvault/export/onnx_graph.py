"""``--format onnx``: the rebuilt model as an ONNX graph, proven against the model on its probe.

Split out of ``ckptvault.export`` (one module per format): this is the only export that rebuilds
the model (through :func:`ckptvault.load_model`'s trust rules) and needs the optional ``onnx`` and
``onnxruntime`` packages, so its code and its lazy imports stay apart from the pure-data formats.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, StorageError
from ..storage.atomic_file import publish_file
from ..storage.localfiles import file_size, scratch_directory
from .common import ExportError, ExportMismatchError, ExportResult, PathLike
from .weights import model_weights

ONNX_RTOL, ONNX_ATOL = 1e-4, 1e-5
ONNX_INSTALL_HINT = "pip install 'ckptvault[onnx]'"


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

    from ..api import storage_for
    from ..engine.reader import CheckpointReader
    from ..validation import PROBE_FILE

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

    from ..api import load_model
    from ..api import open as open_checkpoint
    from ..validation import GPU_TOLERANCE, run_probe

    onnx, ort = _onnx_modules()
    source_path = os.fspath(checkpoint)
    with open_checkpoint(checkpoint) as view:
        _, source, _ = model_weights(view, need_architecture="onnx")
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
    try:
        with scratch_directory(target) as work:
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
            publish_file(graph, target)  # fsynced, renamed into place, directory fsynced
    except OSError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise StorageError(exc.errno or 0, f"cannot export to {target}: {exc}") from exc
    n_params = len(model.state_dict())
    source = f"{source}; {exporter}, checked with onnxruntime on the probe"
    return ExportResult(str(target), "onnx", (target.name,), file_size(target), n_params, source, worst)
