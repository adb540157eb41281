"""Validation on creation: a checkpoint proven loadable before anyone needs it.

Levels, each including the one before:

* ``"checksum"``: the digests computed while writing (every save has them);
* ``"readback"``: the committed files are read back from storage and re-hashed (``verify``);
* ``"full"``: in a *separate process* (never the training process: a crash, a leak or a CUDA
  context there must not touch the run), the checkpoint is loaded, the model rebuilt from its
  recorded factory, and run on a probe batch. The output must have the recorded shape, be finite and
  equal the output the in-memory model gave on the same probe when the checkpoint was made (bit
  for bit on CPU; within ``rtol=1e-3, atol=1e-5`` when the model ran on an accelerator). The metrics
  in the sidecar must equal the in-memory values passed to the save.

The probe and the expected output travel inside the checkpoint as ``validation-probe.safetensors``
(digest-listed like every file), so ``ckptvault validate CKPT`` can repeat the check any time. The
expected output is computed single-threaded (and the worker runs single-threaded) because float
reductions may round differently with another number of threads.

Results go to ``<parent>/.ckptvault-validation/<checkpoint name>.json``: the manager reads them
(a failed checkpoint is never chosen by ``restore`` or ``best``) and ``ckptvault ls`` shows them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .format.strictjson import dumps

LEVELS = ("checksum", "readback", "full")
PROBE_FILE = "validation-probe.safetensors"
RESULTS_DIR = ".ckptvault-validation"
PROBE_FORMAT = "ckptvault-probe/1"
GPU_TOLERANCE = {"rtol": 1e-3, "atol": 1e-5}


class ValidationFailedError(CheckpointError):
    """The checkpoint was committed but failed validation; ``result`` says what and how long."""

    def __init__(self, result: ValidationResult) -> None:
        super().__init__(
            f"{result.checkpoint}: {result.level} validation failed: " + "; ".join(result.problems)
        )
        self.result = result


@dataclass(frozen=True)
class ValidationResult:
    checkpoint: str
    level: str  # the level that ran
    requested: str  # the level asked for ("full" may fall back to "readback", saying why in note)
    passed: bool
    problems: tuple[str, ...] = ()
    seconds: float = 0.0
    note: str = ""
    checks: tuple[str, ...] = field(default=())
    finished_at: float = 0.0
    checkpoint_id: str = ""  # which checkpoint of that name was validated

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["problems"], doc["checks"] = list(self.problems), list(self.checks)
        return doc


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise ValueError(f"validate must be one of {LEVELS}, got {level!r}")
    return level


# -- the probe (made in the training process at save time) ---------------------------------------
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
        number = _number(value)
        if number is not None:
            out[str(key)] = number if math.isfinite(number) else repr(number)
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# -- results ------------------------------------------------------------------------------------
def results_path(checkpoint: str | os.PathLike[str]) -> Path:
    path = Path(checkpoint)
    return path.parent / RESULTS_DIR / f"{path.name}.json"


def record_result(result: ValidationResult) -> None:
    """Writes the result beside the run (atomically: a reader sees the old or the new one)."""
    target = results_path(result.checkpoint)
    target.parent.mkdir(exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(result.as_dict(), indent=1))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_result(checkpoint: str | os.PathLike[str]) -> dict[str, Any] | None:
    try:
        doc = json.loads(results_path(checkpoint).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


# -- running a level ------------------------------------------------------------------------------
def readback(path: str, requested: str = "readback", note: str = "") -> ValidationResult:
    from .engine.reader import verify_checkpoint
    from .storage.local import LocalStorage

    started = time.perf_counter()
    report = verify_checkpoint(LocalStorage(), path)
    problems = tuple(f"{p.kind}: {p.message}" for p in report.problems)
    return ValidationResult(
        path,
        "readback",
        requested,
        not problems,
        problems,
        time.perf_counter() - started,
        note,
        (f"read back and re-hashed {report.files_checked} files, {report.tensors_checked} tensors",),
        time.time(),
    )


def has_probe(path: str) -> bool:
    from .engine.reader import CheckpointReader
    from .storage.local import LocalStorage

    with CheckpointReader(LocalStorage(), path) as reader:
        return PROBE_FILE in reader.manifest.files and "architecture" in reader.decode_metadata()


def full(path: str, *, timeout: float = 900.0) -> ValidationResult:
    """Full validation in a fresh Python process; falls back to readback (saying why) when the
    checkpoint has no probe or no recorded architecture."""
    if not has_probe(path):
        note = "full validation needs a recorded architecture and a probe; ran readback"
        return readback(path, "full", note)
    started = time.perf_counter()
    env = dict(os.environ)
    # The worker must import what this process can: the model's package, the project's modules.
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ckptvault.validation", "--worker", os.fspath(path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return ValidationResult(
            path, "full", "full", False, (f"validation process ran over {timeout:.0f} s",), timeout
        )
    seconds = time.perf_counter() - started
    try:
        doc = json.loads(done.stdout.strip().splitlines()[-1])
        problems, checks = tuple(doc["problems"]), tuple(doc["checks"])
    except (ValueError, IndexError, KeyError, TypeError):
        tail = (done.stderr or done.stdout)[-1500:]
        problems, checks = (f"validation process failed (exit {done.returncode}): {tail}",), ()
    return ValidationResult(path, "full", "full", not problems, problems, seconds, "", checks, time.time())


def validate(path: str, level: str) -> ValidationResult:
    """Runs ``level`` on a committed checkpoint now (in this thread; full in a subprocess)."""
    import dataclasses

    from .engine.reader import CheckpointReader
    from .storage.local import LocalStorage

    check_level(level)
    with CheckpointReader(LocalStorage(), path) as reader:
        checkpoint_id = reader.manifest.checkpoint_id
    if level == "checksum":
        result = ValidationResult(
            path, "checksum", "checksum", True, (), 0.0, "digests computed while writing"
        )
    elif level == "readback":
        result = readback(path)
    else:
        result = full(path)
    return dataclasses.replace(result, checkpoint_id=checkpoint_id)


# -- the worker (the separate process of "full") -----------------------------------------------
def _worker(path: str) -> dict[str, Any]:
    with_nice = hasattr(os, "nice")
    if with_nice:
        os.nice(10)  # the training process keeps priority for the CPU
    import torch

    torch.set_num_threads(1)
    from safetensors.torch import load as st_load

    from .api import load_model
    from .engine.reader import CheckpointReader
    from .engine.sidecar import sidecar_name
    from .storage.local import LocalStorage

    problems: list[str] = []
    checks: list[str] = []
    report = readback(path)
    problems += report.problems
    checks += report.checks
    with CheckpointReader(LocalStorage(), path) as reader:
        raw = reader.read_file(PROBE_FILE)
        sidecar = json.loads(reader.read_file(sidecar_name(reader.manifest.step)))
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    meta = header.get("__metadata__", {})
    tensors = st_load(raw)
    count = sum(k.startswith("input.") for k in tensors)
    inputs = [tensors[f"input.{i}"].clone() for i in range(count)]  # aligned, as at save time
    expected = [tensors[f"expected.{i}"] for i in range(sum(k.startswith("expected.") for k in tensors))]
    model = load_model(path, map_location="cpu")
    checks.append(f"rebuilt {type(model).__qualname__} and loaded its weights")
    outputs = run_probe(model, inputs)
    exact = not str(meta.get("device", "cpu")).startswith(("cuda", "mps", "xpu"))
    if len(outputs) != len(expected):
        problems.append(f"model gave {len(outputs)} outputs, {len(expected)} expected")
    for i, (got, want) in enumerate(zip(outputs, expected, strict=False)):
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            problems.append(
                f"output {i}: {got.dtype}{tuple(got.shape)}, expected {want.dtype}{tuple(want.shape)}"
            )
            continue
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            problems.append(f"output {i} has non-finite values")
        same = torch.equal(got, want) if exact else torch.allclose(got, want, equal_nan=True, **GPU_TOLERANCE)
        if not same:
            diff = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
            rule = "bit for bit" if exact else f"within {GPU_TOLERANCE}"
            problems.append(
                f"output {i} differs from the in-memory model's ({rule}; max abs diff {diff:.3g})"
            )
    checks.append(f"ran the probe ({len(inputs)} inputs) and compared {len(expected)} outputs")
    expected_metrics = json.loads(meta.get("metrics", "{}"))
    written = sidecar.get("metrics", {}) if isinstance(sidecar.get("metrics"), dict) else {}
    for key, value in expected_metrics.items():
        got_value = written.get(key)
        if isinstance(value, str):  # a non-finite value, as repr
            ok = str(got_value) == value or (
                _number(got_value) is not None and repr(_number(got_value)) == value
            )
        else:
            ok = _number(got_value) == value
        if not ok:
            problems.append(f"metric {key!r}: sidecar has {got_value!r}, the save was given {value!r}")
    checks.append(f"compared {len(expected_metrics)} metrics with the sidecar")
    return {"problems": problems, "checks": checks}


def _main() -> None:
    parser = argparse.ArgumentParser(description="ckptvault full-validation worker")
    parser.add_argument("--worker", required=True)
    args = parser.parse_args()
    try:
        doc = _worker(args.worker)
    except Exception as exc:  # every failure is a finding, reported as one line of JSON
        doc = {"problems": [f"{type(exc).__name__}: {exc}"], "checks": []}
    print(json.dumps(doc))


if __name__ == "__main__":
    _main()
