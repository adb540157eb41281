"""Experiment trackers that follow a run: what the manager and the registry tell them, and when.

A tracker is any object with the four methods of :class:`Tracker`. ``ckptvault`` calls them from
the training loop's thread, in this order: :meth:`~Tracker.on_run_start` once when a manager opens
its run directory, :meth:`~Tracker.on_checkpoint` after each durable commit (before retention may
delete the checkpoint), :meth:`~Tracker.on_register` when a checkpoint is registered or its aliases
change, and :meth:`~Tracker.close` once at the end. The trackers shipped here import their
tracking library only when constructed, so importing this package costs nothing:

* :class:`ckptvault.integrations.mlflow.MLflowTracker` (``pip install 'ckptvault[mlflow]'``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from ..types import CheckpointInfo

__all__ = ["Tracker"]


@runtime_checkable
class Tracker(Protocol):
    """What ckptvault tells an experiment tracker. Every method may raise; the caller decides
    whether a tracker's failure stops anything (the manager logs it and trains on)."""

    def on_run_start(self, run_dir: str, run: Mapping[str, Any]) -> None:
        """The run directory was opened; ``run`` is its ``run.json`` document (``run_id``,
        ``config``, ``git``, ``data_version``, ``system``, ...), the same on every resume."""

    def on_checkpoint(
        self, path: str, info: CheckpointInfo, scope: str, step: int, metrics: Mapping[str, float]
    ) -> None:
        """The checkpoint at ``path`` is committed and durable; ``metrics`` are the numeric metrics
        recorded with it. Called before retention runs, so the directory is still there."""

    def on_register(self, name: str, version: int, path: str, aliases: Sequence[str]) -> None:
        """``path`` is version ``version`` of the registered model ``name``; ``aliases`` is the full
        set of aliases that point at that version now (an alias given here moves to it)."""

    def close(self) -> None:
        """The run is over (or this process is done with it)."""
