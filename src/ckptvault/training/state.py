"""TrainState: every piece of a training run's state, captured and restored as one tree.

A run is more than its weights. Resuming exactly needs the optimizer's moments, the scheduler's
position, the AMP scaler, every random number generator (Python, numpy's global one and any
registered ``Generator``, torch CPU and each CUDA device, the loader's generator), the step and
epoch counters, the position inside the current epoch and the metrics history. TrainState gathers
them behind two calls, :meth:`capture` and :meth:`restore`, and drives the loop with
:meth:`epochs` and :meth:`batches`, which resume at the saved epoch and the next unseen batch.

Each part may be one object or a dict of named objects (``model={"gen": g, "disc": d}``); the
same shape must be given when restoring. Any object with ``state_dict()``/``load_state_dict()``
can ride along in ``extras`` (an EMA, a custom sampler, a curriculum).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from ..errors import CheckpointError
from .architecture import ModelSpec, spec_for
from .data import DataPosition, EpochLoaders, is_stateful_loader
from .history import MetricsHistory
from .iterable import IterableLoaders, has_own_state, is_iterable_loader, logger

STATE_FORMAT = "ckptvault.TrainState/1"
FULL, WEIGHTS = "full", "weights"
_PART_KINDS = ("model", "optimizer", "scheduler", "scaler", "extras")


class IncompleteStateError(CheckpointError):
    """Restoring would leave parts of the state unrestored (e.g. a weights-only checkpoint into a
    full state); the message lists them. Pass ``partial=True`` to accept that."""


def _named(value: Any, kind: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    return {kind: value}


class TrainState:
    """The complete, resumable state of a training run; see the module docstring."""

    def __init__(
        self,
        model: Any = None,
        optimizer: Any = None,
        scheduler: Any = None,
        *,
        scaler: Any = None,
        loader: Any = None,
        extras: Mapping[str, Any] | None = None,
        generators: Mapping[str, Any] | None = None,
        model_factory: Any = None,
        model_kwargs: Mapping[str, Any] | None = None,
        probe: Any = None,
        loader_rng: str = "batch",
    ) -> None:
        """``loader_rng``: how randomness drawn while loading data (augmentation in ``__getitem__``,
        in loader workers or not) is made to resume exactly (:mod:`.sample_rng`). ``"batch"``, the
        default, seeds the global RNGs once per batch from the batch's place in the epoch: exact with
        any ``num_workers`` on either side of a restart, and free (one reseed per batch). ``"sample"``
        seeds before every ``__getitem__``, so a sample's draws depend on its place alone, not on its
        batch-mates' (~20 us per sample for three cold generators: 7 % of a 250-340 us augmentation).
        ``"off"`` keeps a plain ``DataLoader``'s per-worker streams (exact only without worker-side
        randomness, or with ``num_workers=0``). A checkpoint records the granularity its epoch
        started with, and a resumed epoch finishes with that one."""
        self.parts: dict[str, dict[str, Any]] = {
            "model": _named(model, "model"),
            "optimizer": _named(optimizer, "optimizer"),
            "scheduler": _named(scheduler, "scheduler"),
            "scaler": _named(scaler, "scaler"),
            "extras": dict(extras or {}),
        }
        for kind, objects in self.parts.items():
            for name, obj in objects.items():
                if not (
                    callable(getattr(obj, "state_dict", None))
                    and callable(getattr(obj, "load_state_dict", None))
                ):
                    raise TypeError(
                        f"{kind} {name!r} ({type(obj).__qualname__}) has no state_dict/load_state_dict"
                    )
        self.loader = loader
        self._map_loaders = EpochLoaders(loader_rng)
        self._iterable_loaders = IterableLoaders()
        self.generators = dict(generators or {})
        self.step = 0
        self.epoch = 0  # completed epochs
        self.position = DataPosition()
        self.metrics_history = MetricsHistory()
        self._on_epoch_end: Callable[[TrainState], None] | None = None
        self.stop_requested = False  # set by the manager on preemption; ends epochs() and batches()
        # How to rebuild the model (validation, load_model): checked now, so a bad reference fails
        # at the start of a run, not when the checkpoint is needed.
        self.architecture: ModelSpec | None = None
        if model_factory is not None or model_kwargs is not None or hasattr(model, "ckptvault_kwargs"):
            if len(self.parts["model"]) != 1:
                raise ValueError("model_factory/model_kwargs describe one model; this state has several")
            ((name, single),) = self.parts["model"].items()
            self.architecture = spec_for(
                single,
                model_factory,
                dict(model_kwargs) if model_kwargs is not None else None,
                ("model", name),
            )
        # The probe batch of full validation: given, or the inputs of the first batch seen.
        self.probe: Any = probe

    # -- the loop ---------------------------------------------------------------------------
    def epochs(self, num_epochs: int) -> Iterator[int]:
        """Yields epoch numbers from the saved one up to ``num_epochs - 1``.

        When the loop body of an epoch finishes, the epoch counts as completed (the counter moves on
        and the data position resets) and the manager, if attached, checks its epoch triggers.

        A checkpoint taken after the epoch's batches ran out (the usual save after evaluation)
        resumes at the next epoch: the epoch's tail up to that save is not run twice. After a
        preemption (``stop_requested``) the loop ends without counting the epoch as completed.
        """
        if self.position.exhausted and not self.stop_requested:
            self._complete_epoch()  # restored from a save in the previous epoch's tail
        while self.epoch < num_epochs and not self.stop_requested:
            yield self.epoch
            if self._stopping():  # the loop body may have been preempted
                return
            self._complete_epoch()

    def _stopping(self) -> bool:
        """Read through a call: the loop body changes the flag while a generator is suspended."""
        return self.stop_requested

    def _complete_epoch(self) -> None:
        self.epoch += 1
        self.position = DataPosition()
        if self._on_epoch_end is not None:
            self._on_epoch_end(self)

    def batches(self) -> Iterator[Any]:
        """The current epoch's remaining batches: after a restore, the next unseen one first.
        Ends early, without consuming another batch, once a stop was requested (preemption)."""
        if self.loader is None:
            raise ValueError("TrainState has no loader; pass loader=... to iterate batches")
        if self.position.exhausted or self.stop_requested:
            return
        source: Any
        if is_stateful_loader(self.loader):
            source = self.loader
        elif is_iterable_loader(self.loader):
            source = self._iterable_loaders.for_epoch(self.loader, self.position)
        else:
            source = self._map_loaders.for_epoch(self.loader, self.position)
        for batch in source:
            if self._stopping():
                return
            self.position.batches_done += 1
            if self.probe is None:
                self.probe = probe_from_batch(batch)
            yield batch
        if not self.stop_requested:
            self.position.exhausted = True

    @property
    def last_replay(self) -> Any:
        """What resuming an iterable dataset by replay cost last (:class:`.iterable.Replay`), or None."""
        return self._iterable_loaders.last_replay

    def record_metrics(self, metrics: Mapping[str, Any]) -> None:
        if metrics:
            self.metrics_history.append(self.step, self.epoch, metrics)

    # -- capture / restore ----------------------------------------------------------------
    def capture(self, scope: str = FULL) -> dict[str, Any]:
        """The state as a plain tree for ``ckptvault.save`` (tensors are not copied)."""
        if scope not in (FULL, WEIGHTS):
            raise ValueError(f"scope must be {FULL!r} or {WEIGHTS!r}, got {scope!r}")
        tree: dict[str, Any] = {
            "format": STATE_FORMAT,
            "scope": scope,
            "step": self.step,
            "epoch": self.epoch,
        }
        kinds = _PART_KINDS if scope == FULL else ("model",)
        for kind in kinds:
            if self.parts[kind]:
                tree[kind] = {name: obj.state_dict() for name, obj in self.parts[kind].items()}
        if scope == FULL:
            tree["rng"] = self._capture_rng()
            tree["data"] = self._capture_data()
            tree["metrics_history"] = self.metrics_history.to_tree()
        return tree

    def restore(
        self, tree: Mapping[str, Any], *, partial: bool = False, skip: tuple[str, ...] = ()
    ) -> list[str]:
        """Loads a captured tree into this state's objects; returns what was not restored. ``skip``
        names part kinds the caller loads itself (a distributed restore: torch's ``set_*`` functions).

        Raises :class:`IncompleteStateError` naming every part of this state the tree lacks, unless
        ``partial``; parts the tree has that this state lacks are always an error (silently dropping
        saved optimizer state is how runs diverge).
        """
        if tree.get("format") != STATE_FORMAT:
            raise CheckpointError(f"not a TrainState checkpoint (format {tree.get('format')!r})")
        missing: list[str] = []
        for kind in _PART_KINDS:
            saved = tree.get(kind, {})
            for name in self.parts[kind]:
                if name not in saved:
                    missing.append(f"{kind} {name!r}")
            unknown = sorted(set(saved) - set(self.parts[kind]))
            if unknown:
                raise CheckpointError(f"checkpoint has {kind} {unknown} that this TrainState was not given")
        if tree.get("scope") == FULL:
            if self.loader is not None and "data" not in tree:
                missing.append("data position")
        else:
            missing += ["RNG states", "data position", "metrics history"]
        if missing and not partial:
            raise IncompleteStateError(
                f"the checkpoint ({tree.get('scope')} scope) lacks: {', '.join(missing)}; "
                "pass partial=True to restore only what it has"
            )
        for kind in _PART_KINDS:
            for name, obj in self.parts[kind].items():
                if name in tree.get(kind, {}) and kind not in skip:
                    obj.load_state_dict(tree[kind][name])
        self.step = int(tree["step"])
        self.epoch = int(tree["epoch"])
        if tree.get("scope") == FULL:
            self._restore_rng(tree["rng"])
            self._restore_data(tree.get("data", {}))
            saved = tree.get("metrics_history")
            self.metrics_history = MetricsHistory.from_tree(saved) if saved else MetricsHistory()
        return missing

    # -- RNG --------------------------------------------------------------------------------
    def _capture_rng(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state()}
        torch = sys.modules.get("torch")
        if torch is not None:
            rng["torch"] = torch.get_rng_state()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                rng["cuda"] = torch.cuda.get_rng_state_all()
        generators: dict[str, Any] = {}
        for name, generator in self.generators.items():
            generators[name] = _generator_state(generator)
        if generators:
            rng["generators"] = generators
        loader_generator = getattr(self.loader, "generator", None)
        if loader_generator is not None:
            rng["loader"] = loader_generator.get_state()
        return rng

    def _restore_rng(self, rng: Mapping[str, Any]) -> None:
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if "torch" in rng:
            import torch

            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        for name, generator in self.generators.items():
            if name not in rng.get("generators", {}):
                raise IncompleteStateError(f"checkpoint has no state for generator {name!r}")
            _set_generator_state(generator, rng["generators"][name])
        loader_generator = getattr(self.loader, "generator", None)
        if loader_generator is not None and "loader" in rng:
            loader_generator.set_state(rng["loader"])

    # -- data position ------------------------------------------------------------------------
    def _capture_data(self) -> dict[str, Any]:
        data: dict[str, Any] = self.position.to_dict()
        if self.loader is not None and is_stateful_loader(self.loader):
            data["loader"] = self.loader.state_dict()
        elif self.loader is not None and is_iterable_loader(self.loader) and has_own_state(self.loader):
            data["dataset"] = self.loader.dataset.state_dict()
        return data

    def _restore_data(self, data: Mapping[str, Any]) -> None:
        self.position = DataPosition.from_dict(dict(data)) if data else DataPosition()
        if self.loader is not None and is_stateful_loader(self.loader) and "loader" in data:
            self.loader.load_state_dict(data["loader"])
        elif self.loader is not None and is_iterable_loader(self.loader):
            if has_own_state(self.loader) and "dataset" in data:
                self.loader.dataset.load_state_dict(data["dataset"])
            elif self.position.batches_done and not self.position.exhausted:
                logger.info(
                    "restored mid-epoch in an IterableDataset without its own state (or loaded by workers): "
                    "its first %d batches will be loaded again and discarded when batches() starts",
                    self.position.batches_done,
                )


def _generator_state(generator: Any) -> Any:
    if isinstance(generator, np.random.Generator):
        return generator.bit_generator.state
    if isinstance(generator, random.Random):
        return generator.getstate()
    if callable(getattr(generator, "get_state", None)):  # torch.Generator
        return generator.get_state()
    raise TypeError(f"cannot capture the state of generator {type(generator).__qualname__}")


def _set_generator_state(generator: Any, state: Any) -> None:
    if isinstance(generator, np.random.Generator):
        generator.bit_generator.state = state
    elif isinstance(generator, random.Random):
        generator.setstate(state)
    else:
        generator.set_state(state)


PROBE_SAMPLES = 4


def probe_from_batch(batch: Any) -> Any:
    """The model input of a batch, cut to a few samples and copied: a tensor, or the first element
    of a tuple/list batch. None (no automatic probe) for other batch shapes; pass ``probe=``."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    value = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value[:PROBE_SAMPLES].detach().clone()
    return None
