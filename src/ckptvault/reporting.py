"""Pictures of runs: a run's training trajectory as a PNG and a tree of runs as one HTML page.

Both read only what runs already leave behind, so they work on a live run, on a finished one and
on a copy of one without the process that wrote it:

* the curves come from the newest full checkpoint's ``metrics_history`` (every recorded step, read
  lazily: only those few tensors), else from the commit events' metrics, else from the checkpoints'
  metadata;
* every checkpoint ever committed is marked by what happened to it: kept, deleted (from the event
  log ``.ckptvault-events.jsonl``), best (by the monitor recorded in ``run.json``), pinned
  (``pins.json`` or a registry), registered (``.ckptvault-registered.json``) and failed validation
  (``.ckptvault-validation/<name>.json``);
* the report joins the catalog (every checkpoint under a root), the runs' ``run.json`` and the
  registry.

matplotlib is an optional dependency (``pip install 'ckptvault[plots]'``): checkpointing must not
pull in a plotting stack. It is imported only when a picture is drawn, and only through its Agg
canvas and ``Figure`` (never pyplot): no display is needed, no global figure state is touched, and
with matplotlib's default style and no timestamps the same run gives the same PNG bytes.

The HTML report itself is :mod:`ckptvault.report_html`. Text from the data drawn into a picture
(metric names, run names) has its control, bidi and surrogate characters spelled out
(:func:`ckptvault.visible.visible_str`). A checkpoint whose values no picture can hold (a step or
metric beyond any float) is left out of the curves like a damaged one.

The code is split by job: :mod:`ckptvault.report_trajectory` (the data: curves and marks),
:mod:`ckptvault.report_plots` (the pictures, the only matplotlib user) and this module (every
name, as before, and :func:`write_atomically`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .report_plots import MAX_SUBPLOTS, PLOTS_INSTALL_HINT, plot_png, storage_png
from .report_trajectory import (
    BEST,
    DELETED,
    FAILED,
    KEPT,
    PINNED,
    REGISTERED,
    STATUSES,
    CheckpointMark,
    ReportError,
    Trajectory,
    trajectory,
)
from .storage import atomic_file

__all__ = [
    "BEST",
    "DELETED",
    "FAILED",
    "KEPT",
    "MAX_SUBPLOTS",
    "PINNED",
    "PLOTS_INSTALL_HINT",
    "REGISTERED",
    "STATUSES",
    "CheckpointMark",
    "ReportError",
    "Trajectory",
    "plot_png",
    "storage_png",
    "trajectory",
    "write_atomically",
]


def write_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """Replaces ``path`` in one rename: a reader (a browser reloading) never sees half a file.

    The one atomic writer of the package (:mod:`ckptvault.storage.atomic_file`); a failure is a
    :class:`~ckptvault.errors.StorageError` (an ``OSError``) and leaves no temporary file behind.
    """
    atomic_file.write_atomically(Path(path), data)
