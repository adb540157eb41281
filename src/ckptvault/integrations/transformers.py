"""Hugging Face ``transformers`` Trainer runs mirrored into ckptvault (issue 17).

* :class:`VaultCallback` -- a ``TrainerCallback`` whose ``on_save`` commits the complete state of
  every Trainer save (model, optimizer, LR scheduler, RNG states and the ``TrainerState`` as JSON)
  into a ckptvault run through a :class:`~ckptvault.CheckpointManager`: atomic, digested, and
  pruned by the manager's retention only after the new commit. Trainer's own ``checkpoint-N``
  directory is written file by file and can be left half written by a crash; the mirror cannot.
* :func:`latest_complete_checkpoint` -- the newest ``checkpoint-N`` that is COMPLETE, where
  ``transformers.trainer_utils.get_last_checkpoint`` returns the highest number whatever state it
  is in (see the function for the definition).
* :func:`materialize_checkpoint` -- writes a ``checkpoint-N`` directory from the mirror, which
  ``trainer.train(resume_from_checkpoint=...)`` accepts. Chosen over restoring objects in memory
  because Trainer computes the epoch and the batches to skip from ``trainer_state.json`` *before*
  any callback runs: only its own resume path resumes the data order exactly.

``transformers`` is imported with this module, never by ``ckptvault.integrations``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import transformers
from transformers import TrainerCallback

from ..manager.core import CheckpointManager
from ..storage.foreign import remove_tree, replace_directory
from ..training.architecture import model_factory
from ..training.state import TrainState

__all__ = [
    "VaultCallback",
    "from_hf_config",
    "is_complete_checkpoint",
    "latest_complete_checkpoint",
    "materialize_checkpoint",
]

TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@model_factory
def from_hf_config(**config: Any) -> Any:
    """Rebuilds a transformers model from its ``config.to_dict()`` (recorded as the checkpoint's
    architecture kwargs), so ckptvault's validation and ``export --format hf`` can rebuild it;
    the class is ``config["architectures"][0]``, looked up on the ``transformers`` package only."""
    architectures = config.get("architectures") or []
    if not architectures or not isinstance(architectures[0], str):
        raise ValueError("the recorded config names no architecture ('architectures')")
    cls = getattr(transformers, architectures[0], None)
    if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise ValueError(f"{architectures[0]!r} is not a transformers model class")
    model_type = config.pop("model_type")
    return cls(transformers.AutoConfig.for_model(model_type, **config))


def _config_kwargs(model: Any) -> dict[str, Any] | None:
    """The model's config as plain JSON (``architectures`` set), or None when it has none."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return None
    doc = json.loads(config.to_json_string(use_diff=False))
    doc["architectures"] = [type(model).__name__]
    return dict(doc)


class _TrainerStateExtra:
    """The ``TrainerState`` as a ``state_dict`` extra: its JSON text (as ``save_to_json`` writes it), so the
    mirror holds exactly what ``trainer_state.json`` would, with no pickled object."""

    def __init__(self, state: Any = None) -> None:
        self.state = state
        self.json: str | None = None

    def state_dict(self) -> dict[str, Any]:
        # Exactly what ``TrainerState.save_to_json`` writes.
        return {"json": json.dumps(dataclasses.asdict(self.state), indent=2, sort_keys=True) + "\n"}

    def load_state_dict(self, tree: Mapping[str, Any]) -> None:
        self.json = str(tree["json"])


def _numeric(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The newest logged numeric metrics (what ``keep_best``/``monitor`` can rank)."""
    metrics: dict[str, float] = {}
    for entry in log_history:
        for key, value in entry.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                metrics[key] = float(value)
    return metrics


class VaultCallback(TrainerCallback):
    """Mirrors each Trainer save into the ckptvault run ``run_dir``.

    ``manager_options`` go to :class:`~ckptvault.CheckpointManager` (``keep_last=``,
    ``keep_best=``, ``monitor=``, ``incremental=``, ...). Two defaults differ from the manager's,
    on purpose: ``validate="readback"`` (``"full"`` rebuilds the model in another process after
    every save) and ``preemption_signals=()`` -- the manager's SIGTERM flag is acted on only by
    ``manager.step``, which Trainer never calls, so installing it would swallow the signal.
    """

    def __init__(self, run_dir: str | os.PathLike[str], **manager_options: Any) -> None:
        self.run_dir = Path(run_dir)
        manager_options.setdefault("validate", "readback")
        manager_options.setdefault("preemption_signals", ())
        self.manager_options = manager_options
        self.manager: CheckpointManager | None = None
        self.saved: list[int] = []

    def _manager(self) -> CheckpointManager:
        if self.manager is None:
            self.manager = CheckpointManager(self.run_dir, **self.manager_options)
        return self.manager

    def on_save(
        self, args: Any, state: Any, control: Any, *, model: Any = None, optimizer: Any = None,
        lr_scheduler: Any = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        """Called by Trainer after its own ``checkpoint-N`` is written; commits the same state."""
        if not state.is_world_process_zero:
            return
        config = _config_kwargs(model)
        # Trainer's fp16 grad scaler lives on Accelerate's optimizer wrapper (it is not a callback
        # argument); without it a resumed fp16 run restarts at the initial loss scale.
        scaler = getattr(optimizer, "scaler", None)
        train_state = TrainState(
            model=model,
            optimizer=optimizer,
            scheduler=lr_scheduler,
            scaler=scaler,
            extras={"trainer_state": _TrainerStateExtra(state)},
            model_factory=from_hf_config if config is not None else None,
            model_kwargs=config,
        )
        train_state.step = int(state.global_step)
        train_state.epoch = int(state.epoch or 0)
        self._manager().save(train_state, metrics=_numeric(state.log_history))
        self.saved.append(int(state.global_step))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Waits for background validation and releases the run (its lease)."""
        if self.manager is not None:
            self.manager.wait_validation()
            self.manager.close()
            self.manager = None


# -- completeness -------------------------------------------------------------------------------
def _safetensors_ok(path: Path) -> bool:
    """The header parses and the file is as long as the header says (a truncated write is not)."""
    try:
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if size <= 0 or size > 100 * 1024 * 1024:
                return False
            header = json.loads(handle.read(size))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size >= 8 + size + end
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def is_complete_checkpoint(
    path: str | os.PathLike[str], run_dir: str | os.PathLike[str] | None = None
) -> bool:
    """Whether Trainer finished writing the ``checkpoint-N`` directory ``path``.

    Complete means: ``trainer_state.json`` -- the file Trainer writes LAST, after weights,
    optimizer, scheduler and RNG -- parses and records ``global_step == N``; the weights exist and
    every safetensors file is whole (header parses, length matches); and every ``.pt``/``.pth``
    file present is non-empty. With ``run_dir``, the ckptvault mirror of step N must also exist and
    verify (every digest), which also catches damage after the save.
    """
    directory = Path(path)
    match = _CHECKPOINT.match(directory.name)
    if match is None or not directory.is_dir():
        return False
    try:
        doc = json.loads((directory / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(doc, dict) or doc.get("global_step") != int(match.group(1)):
        return False
    if not any((directory / name).is_file() for name in _WEIGHTS):
        return False
    for file in directory.iterdir():
        if file.suffix == ".safetensors" and not _safetensors_ok(file):
            return False
        if file.suffix in (".pt", ".pth", ".bin") and file.stat().st_size == 0:
            return False
    if run_dir is not None:
        mirror = _mirror_path(Path(run_dir), int(match.group(1)))
        from ..api import verify

        return mirror is not None and verify(mirror).ok
    return True


def latest_complete_checkpoint(
    output_dir: str | os.PathLike[str], run_dir: str | os.PathLike[str] | None = None
) -> str | None:
    """The newest complete ``checkpoint-N`` under ``output_dir`` (see
    :func:`is_complete_checkpoint`), None when there is none. Incomplete ones are skipped, never
    deleted: they are evidence of the crash."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name))]
    for _step, candidate in sorted(found, key=lambda item: item[0], reverse=True):
        if is_complete_checkpoint(candidate, run_dir):
            return str(candidate)
    return None


# -- resuming from the mirror -----------------------------------------------------------------
def _mirror_path(run_dir: Path, step: int | None) -> Path | None:
    """The mirror's checkpoint of ``step`` (the newest full one when None)."""
    from ..api import list_checkpoints
    from ..engine.rundir import parse_name

    steps: dict[int, Path] = {}
    for name in list_checkpoints(run_dir):
        parsed = parse_name(Path(name).name)
        if parsed is not None and parsed[0] == "full":
            steps[parsed[1]] = run_dir / Path(name).name
    if step is None:
        return steps[max(steps)] if steps else None
    return steps.get(step)


def _python_rng(saved: Any) -> tuple[Any, ...]:
    """``random.getstate()``'s nested tuple shape, whatever sequence type the tree gave back."""
    version, internal, gauss = saved
    return (int(version), tuple(int(x) for x in internal), gauss)


def materialize_checkpoint(
    run_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str], step: int | None = None
) -> str:
    """Writes ``output_dir/checkpoint-N`` from the verified mirror checkpoint of ``step`` (the
    newest when None) and returns its path, for ``trainer.train(resume_from_checkpoint=...)``.

    The directory is written beside its target and renamed into place, so it is never seen half
    written; an existing ``checkpoint-N`` is replaced only when it is not complete. The files are
    the ones Trainer reads: ``model.safetensors`` (+ ``config.json`` when the architecture was
    recorded), ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth`` and ``trainer_state.json``.
    (``torch.save`` writes the ``.pt`` files because that is the format Trainer loads.)
    """
    import torch
    from safetensors.torch import save_file

    from ..api import load

    source = _mirror_path(Path(run_dir), step)
    if source is None:
        raise FileNotFoundError(
            f"{run_dir} has no full checkpoint{'' if step is None else f' of step {step}'}"
        )
    tree = load(source)  # verifies every digest
    trainer_state = tree["extras"]["trainer_state"]["json"]
    global_step = int(json.loads(trainer_state)["global_step"])
    target = Path(output_dir) / f"checkpoint-{global_step}"
    if target.exists() and is_complete_checkpoint(target):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        weights = {k: v.detach().clone().contiguous() for k, v in tree["model"]["model"].items()}
        save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
        arch = load_metadata_architecture(source)
        if arch is not None:
            config = {k: v for k, v in arch.items() if k != "ckptvault_factory"}
            (staging / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        if "optimizer" in tree:
            torch.save(tree["optimizer"]["optimizer"], staging / "optimizer.pt")
        if "scheduler" in tree:
            torch.save(tree["scheduler"]["scheduler"], staging / "scheduler.pt")
        rng = tree["rng"]
        numpy_state = rng["numpy"]
        torch.save(
            {
                "python": _python_rng(rng["python"]),
                "numpy": (str(numpy_state[0]), np.asarray(numpy_state[1]), *numpy_state[2:]),
                "cpu": rng["torch"],
            },
            staging / "rng_state.pth",
        )
        (staging / TRAINER_STATE).write_text(trainer_state, encoding="utf-8")  # last, as Trainer does
        replace_directory(staging, target)  # an existing one is incomplete (checked above)
    except BaseException:
        remove_tree(staging)
        raise
    return str(target)


def load_metadata_architecture(checkpoint: Path) -> dict[str, Any] | None:
    """The recorded model config (architecture kwargs) of a mirror checkpoint, if any."""
    from ..api import info

    doc = info(checkpoint).metadata.get("architecture")
    if not isinstance(doc, dict) or not isinstance(doc.get("kwargs"), dict):
        return None
    return dict(doc["kwargs"])
