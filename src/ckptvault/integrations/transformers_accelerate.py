"""Accelerate's ``save_state``/``load_state`` through ckptvault: atomic commit, retention after it.

``Accelerator.save_state`` writes its files one by one into ``checkpoint_<i>``, and with
``ProjectConfiguration(total_limit=N)`` it deletes the oldest states BEFORE writing the new one: a
crash mid-save can leave no loadable state at all. :class:`VaultAccelerate` saves the same objects
(every prepared model, optimizer, scheduler, the grad scaler, objects given to
``register_for_checkpointing``, and the RNG states) as one ckptvault checkpoint through a
:class:`~ckptvault.CheckpointManager`: it appears whole or not at all, and retention (``keep_last=``
...) deletes old states only after the new commit. Single process; ``accelerate`` is imported by the
caller, never by this module.
"""

from __future__ import annotations

import os
from typing import Any

from ..manager.core import CheckpointManager
from ..training.state import TrainState
from ..types import CheckpointInfo

__all__ = ["VaultAccelerate"]


class VaultAccelerate:
    """``save_state()``/``load_state()`` for an ``accelerate.Accelerator``, committed by ckptvault.

    ``manager_options`` go to :class:`~ckptvault.CheckpointManager`; ``validate`` defaults to
    ``"readback"`` and ``preemption_signals`` to ``()`` (nothing here calls ``manager.step``).
    """

    def __init__(self, accelerator: Any, run_dir: str | os.PathLike[str], **manager_options: Any) -> None:
        manager_options.setdefault("validate", "readback")
        manager_options.setdefault("preemption_signals", ())
        self.accelerator = accelerator
        self.manager = CheckpointManager(run_dir, **manager_options)
        self.step = 0

    def _state(self) -> TrainState:
        acc = self.accelerator
        scaler = getattr(acc, "scaler", None)
        return TrainState(
            model={f"model_{i}": acc.unwrap_model(m) for i, m in enumerate(acc._models)},
            optimizer={f"optimizer_{i}": o for i, o in enumerate(acc._optimizers)},
            scheduler={f"scheduler_{i}": s for i, s in enumerate(acc._schedulers)},
            scaler={"scaler": scaler} if scaler is not None else None,
            extras={f"custom_{i}": obj for i, obj in enumerate(acc._custom_objects)},
        )

    def save_state(self, step: int | None = None) -> CheckpointInfo:
        """Commits the accelerator's state as step ``step`` (default: one more than the last)."""
        self.accelerator.wait_for_everyone()
        state = self._state()
        state.step = self.step + 1 if step is None else int(step)
        info = self.manager.save(state)
        self.step = state.step  # only once committed: a failed save does not use up a step
        return info

    def load_state(self) -> CheckpointInfo | None:
        """Restores the newest checkpoint that verifies into the prepared objects; None if none."""
        state = self._state()
        info = self.manager.restore(state)
        if info is not None:
            self.step = state.step
        return info

    def close(self) -> None:
        self.manager.close()
