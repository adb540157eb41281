"""L3: a run's checkpoint records -- the derived index, reconciled with the run's listing.

The policies (:mod:`ckptvault.policy`) decide over :class:`~ckptvault.policy.CheckpointRecord`
values; this module makes them from what the run holds: the index (``.ckptvault-index.json``, derived
data that may be stale, damaged or hostile), the listing of the run's checkpoints, their manifests and
their validation results -- all through :class:`~ckptvault.engine.rundir.RunDirectory`, so a run on any
backend reads the same. Also the read-only views other layers use without opening a manager
(:func:`kept_reasons` for ``ckptvault ls``, :func:`read_events` for reports).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Mapping
from typing import Any

from ..config import Settings
from ..engine.checkpoint_info import info_from_manifest
from ..engine.loading import read_checkpoint
from ..engine.reader import CheckpointReader
from ..engine.rundir import RunDirectory, parse_name
from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    StorageError,
)
from ..policy import CheckpointRecord, retention_reasons
from ..policy.metrics import numeric_metrics
from ..training.state import FULL
from ..types import CheckpointInfo
from .scope import Scope


def record_to_json(record: CheckpointRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "step": record.step,
        "epoch": record.epoch,
        "created": record.created,
        "scope": record.scope,
        "metrics": {k: (v if math.isfinite(v) else str(v)) for k, v in record.metrics.items()},
        "pinned": record.pinned,
        "valid": record.valid,
        "checkpoint_id": record.checkpoint_id,
    }


RunLike = str | os.PathLike[str] | RunDirectory


def as_run(run_dir: RunLike) -> RunDirectory:
    """A :class:`RunDirectory` for a run given by path (or itself)."""
    return run_dir if isinstance(run_dir, RunDirectory) else RunDirectory(run_dir)


def read_events(run_dir: RunLike) -> list[dict[str, Any]]:
    """The run's event log (commits and deletions, oldest first); damaged lines are skipped
    (:meth:`RunDirectory.read_events <ckptvault.engine.rundir.RunDirectory.read_events>`)."""
    return as_run(run_dir).read_events()


def read_index(run_dir: RunLike) -> dict[str, Any]:
    """The run's derived index document, or an empty one when it is missing or damaged."""
    return as_run(run_dir).read_index()


def checkpoint_info(run: RunDirectory, name: str) -> CheckpointInfo:
    """Facts about checkpoint ``name`` of ``run`` from its manifest, through the run's storage
    (what ``api.info`` does for a path, without asking the resolver where the run lives)."""
    target = run.checkpoint(name)
    with CheckpointReader(run.storage, target) as reader:
        return info_from_manifest(target, reader.manifest, reader.decode_metadata())


def load_checkpoint(run: RunDirectory, name: str) -> Any:
    """Checkpoint ``name`` of ``run``, every byte verified (``api.load``'s defaults)."""
    threads = Settings.from_env().io_threads
    return read_checkpoint(
        run.storage, run.checkpoint(name), map_location="cpu", verify=True, threads=threads, mapped=False
    )


def record_from_json(doc: Mapping[str, Any]) -> CheckpointRecord:
    metrics = {str(k): float(v) for k, v in doc.get("metrics", {}).items()}
    return CheckpointRecord(
        name=str(doc["name"]),
        step=int(doc["step"]),
        epoch=int(doc["epoch"]),
        created=float(doc["created"]),
        scope=str(doc["scope"]),
        metrics=metrics,
        pinned=bool(doc.get("pinned", False)),
        valid=bool(doc.get("valid", True)),
        checkpoint_id=str(doc.get("checkpoint_id", "")),
    )


def record_from_info(name: str, info: CheckpointInfo, modified: float = 0.0) -> CheckpointRecord:
    """A policy record from a committed checkpoint's manifest facts; ``modified`` (the listing's
    commit time) stands in for a manifest without ``committed_at``."""
    parsed = parse_name(name)
    scope = str(info.metadata.get("scope", parsed[0] if parsed else FULL))
    epoch = info.metadata.get("epoch", 0)
    created = info.metadata.get("committed_at")
    if not isinstance(created, (int, float)):
        created = modified
    return CheckpointRecord(
        name=name,
        step=info.step,
        epoch=int(epoch) if isinstance(epoch, int) else 0,
        created=float(created),
        scope=scope,
        metrics=numeric_metrics(info.metrics),
        checkpoint_id=info.checkpoint_id,
    )


def load_records(run_dir: RunLike, index: Mapping[str, Any] | None = None) -> dict[str, CheckpointRecord]:
    """Records of every committed checkpoint in a run: the index, reconciled with the listing.

    The index is derived data: entries whose checkpoint is gone are dropped and checkpoints it does
    not know (a crash between commit and index update) are read from their manifests.
    """
    run = as_run(run_dir)
    if index is None:
        index = run.read_index()
    listed = {entry.name: entry.modified for entry in run.checkpoint_dirs()}
    records: dict[str, CheckpointRecord] = {}
    try:
        for doc in index.get("records", []):
            record = record_from_json(doc)
            if record.name in listed:
                records[record.name] = record
    except (ValueError, KeyError, TypeError, AttributeError):
        records = {}  # damaged index: rebuilt below from the manifests
    for name in sorted(listed.keys() - records.keys()):
        try:
            records[name] = record_from_info(name, checkpoint_info(run, name), listed[name])
        except CheckpointNotFoundError:
            continue  # a directory without a manifest is not a checkpoint
        except (IncompatibleCheckpointError, StorageError):
            continue  # unreadable here and now, not proven bad: never a candidate for deletion
        except CorruptCheckpointError:
            parsed = parse_name(name)
            if parsed is not None:
                scope, step = parsed
                records[name] = CheckpointRecord(name, step, 0, 0.0, scope, {}, valid=False)
    for name, record in records.items():
        result = run.read_validation(name)
        if result is not None and result.get("passed") is False and record.valid:
            with contextlib.suppress(CheckpointError):  # a result of an older checkpoint of that name
                if checkpoint_info(run, name).checkpoint_id == result.get("checkpoint_id"):
                    records[name] = dataclasses.replace(record, valid=False)
    return records


def load_pins(run_dir: RunLike) -> set[int]:
    """The pinned steps. Only a missing file means none: an unreadable or damaged one raises
    (StorageError / DamagedRunFileError) -- taking it for "no pins" would let retention delete them."""
    return as_run(run_dir).read_pins()


def kept_reasons(run_dir: RunLike) -> dict[str, tuple[str, ...]]:
    """Why each checkpoint of a run is kept, under the retention settings recorded in run.json."""
    run = as_run(run_dir)
    doc = run.read_run()
    if doc is None:
        raise CheckpointNotFoundError(f"{run.path}: no run.json (not a CheckpointManager run)")
    pins = run.read_pins()
    records = [with_pin(r, pins) for r in load_records(run).values()]
    reasons: dict[str, tuple[str, ...]] = {}
    for scope, settings in doc.get("scopes", {}).items():
        policy = Scope(**settings).retention()
        reasons.update(retention_reasons([r for r in records if r.scope == scope], policy, now=time.time()))
    return reasons


def with_pin(record: CheckpointRecord, pins: set[int]) -> CheckpointRecord:
    pinned = record.step in pins
    if pinned == record.pinned:
        return record
    return dataclasses.replace(record, pinned=pinned)
