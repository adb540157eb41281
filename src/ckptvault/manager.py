"""L3: CheckpointManager — a run directory of checkpoints with triggers, retention and restore.

Built on the functional API (``save``/``load``/``info``), never beside it: every checkpoint it
writes is an ordinary ckptvault checkpoint directory.

Layout of a run directory::

    run.json                 run id, config, provenance, trigger and retention settings
    pins.json                steps pinned by the user (never deleted)
    .ckptvault-index.json    derived list of checkpoint records (rebuilt from manifests if lost)
    .ckptvault-run.lock      the single-writer lock
    .ckptvault-events.jsonl  append-only log of commits and deletions (for plots and reports)
    step_00001200/           full-scope checkpoint after 1200 optimizer steps
    weights_00001200/        weights-only checkpoint (its own triggers and retention)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from . import api, validation
from .catalog.registry import registered_in
from .config import Settings
from .engine.background import BackgroundWriter, PendingSave
from .engine.checkpoint_info import info_from_manifest
from .engine.chunks import HintCache
from .engine.loading import read_checkpoint
from .engine.reader import CheckpointReader
from .engine.rundir import EVENTS_NAME as EVENTS_NAME  # importable from here, as always
from .engine.rundir import INDEX_NAME as INDEX_NAME
from .engine.rundir import LEASE_NAME, RunDirectory, parse_name
from .engine.rundir import checkpoint_name as checkpoint_name
from .engine.staging import StagingBuffer
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConcurrentWriteError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    StorageError,
    typed_os_errors,
)
from .index_check import confirm_scope
from .policy import (
    CheckpointRecord,
    RetentionPolicy,
    TriggerPolicy,
    TriggerState,
    epoch_trigger,
    retention_reasons,
    step_trigger,
)
from .restore_skips import Skip, refuse_fresh_start, warn_skipped, why_invalid
from .storage.base import Lease, Storage
from .storage.chunkstore import collect_garbage
from .training.history import as_number
from .training.state import FULL, WEIGHTS, TrainState
from .types import CheckpointInfo
from .validation_ids import BackgroundValidator, result_for

RUN_DIR_ENV = "CKPTVAULT_RUN_DIR"
LOCK_NAME = LEASE_NAME  # the run lease's file on local disk; its old name here
logger = logging.getLogger("ckptvault")
Mode = Literal["min", "max"]
_NO_METRICS: Mapping[str, Any] = {}


@dataclass(frozen=True)
class Scope:
    """When to save one kind of checkpoint and which of them to keep.

    The manager's own keyword arguments configure the ``full`` scope; ``weights=Scope(...)`` adds a
    weights-only stream with its own triggers and retention (the seed's recipe: a full checkpoint
    every 10 epochs, a weights-only one every epoch, only the top 3 by validation accuracy kept).
    """

    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    every_seconds: float | None = None
    every: Literal["auto"] | None = None
    mtbf_seconds: float | None = None
    save_on_improvement: bool = False
    keep_last: int | None = None
    keep_best: int | None = None
    monitor: str | None = None
    mode: Mode = "min"
    keep_every_n_steps: int | None = None
    keep_every_n_epochs: int | None = None
    keep_newer_than: float | None = None

    def triggers(self) -> TriggerPolicy:
        if self.every == "auto" and not self.mtbf_seconds:
            raise ValueError('every="auto" needs mtbf_seconds (the mean time between failures)')
        return TriggerPolicy(
            every_n_steps=self.every_n_steps,
            every_n_epochs=self.every_n_epochs,
            every_seconds=self.every_seconds,
            on_improvement=self.save_on_improvement,
            monitor=self.monitor,
            mode=self.mode,
            auto_mtbf_seconds=self.mtbf_seconds if self.every == "auto" else None,
        )

    def retention(self) -> RetentionPolicy:
        return RetentionPolicy(
            keep_last=self.keep_last,
            keep_best=self.keep_best,
            monitor=self.monitor,
            mode=self.mode,
            keep_every_n_steps=self.keep_every_n_steps,
            keep_every_n_epochs=self.keep_every_n_epochs,
            keep_newer_than=self.keep_newer_than,
        )


@dataclass
class _Stream:
    scope: str
    config: Scope
    triggers: TriggerPolicy
    retention: RetentionPolicy
    state: TriggerState = field(default_factory=TriggerState)


def read_events(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The run's event log (commits and deletions, oldest first); damaged lines are skipped
    (:meth:`RunDirectory.read_events <ckptvault.engine.rundir.RunDirectory.read_events>`)."""
    return RunDirectory(run_dir).read_events()


def _plain_metric(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    number = as_number(value)
    return value if number is None else number


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics (Python or numpy/torch scalars) as floats; others are left out."""
    numbers = {str(key): as_number(value) for key, value in metrics.items()}
    return {key: value for key, value in numbers.items() if value is not None}


def _record_to_json(record: CheckpointRecord) -> dict[str, Any]:
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


def _record_from_json(doc: Mapping[str, Any]) -> CheckpointRecord:
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
        metrics=_numeric(info.metrics),
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
            record = _record_from_json(doc)
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
    records = [_with_pin(r, pins) for r in load_records(run).values()]
    reasons: dict[str, tuple[str, ...]] = {}
    for scope, settings in doc.get("scopes", {}).items():
        policy = Scope(**settings).retention()
        reasons.update(retention_reasons([r for r in records if r.scope == scope], policy, now=time.time()))
    return reasons


def _with_pin(record: CheckpointRecord, pins: set[int]) -> CheckpointRecord:
    pinned = record.step in pins
    if pinned == record.pinned:
        return record
    return dataclasses.replace(record, pinned=pinned)


class CheckpointManager:
    """Saves a training run's checkpoints when triggers fire, keeps what the retention policy
    keeps, and restores the newest valid one.

    Concurrency contract: ONE writer per run directory, enforced by an exclusive lock on
    ``.ckptvault-run.lock``; a second manager on the same directory (another process, or another
    manager in this one) gets :class:`ConcurrentWriteError` naming the holder. Any number of
    readers (``ckptvault.load``, ``ls``, ``verify``) may read the run meanwhile: checkpoints appear
    atomically and are deleted by first renaming them out of sight. Not thread-safe: call it from
    the training loop's thread. The lock is released by :meth:`close` (or process exit, including
    SIGKILL).

    Asynchronous saves (``async_save=True``): a save fired by :meth:`step` or an epoch trigger
    blocks only while the state is copied into a reused host staging buffer (at most
    ``max_staging_bytes``); hashing, writing and the commit run in a background thread, one save in
    flight (the next waits for it). "latest", the index and retention move on only once the commit
    is seen complete (at the next ``step``/``save``/``wait``), which is also where a background
    failure is raised. Explicit :meth:`save` and preemption saves are synchronous.

    Incremental saves (``incremental=True``) and compression (``compression="auto"|"zstd"|"lz4"``):
    tensors of at least a quarter ``chunk_bytes`` are stored as chunks in the run's chunk store
    (``.ckptvault-store``); a chunk already there is referenced, not rewritten, and a tensor whose
    torch version counter and storage show it unchanged since the last save is not even hashed
    (``trust_version_counter=False`` always hashes: writes through ``.data`` or raw pointers do
    not bump the counter). Retention deletes a checkpoint, then frees the chunks nothing else uses.

    Validation (``validate=``, default ``"full"``): after each commit a background thread checks the
    checkpoint: ``"readback"`` re-reads and re-hashes it; ``"full"`` also rebuilds the model in a
    separate process and compares its output on a probe batch with the in-memory model's (needs
    ``TrainState(model_factory=..., model_kwargs=...)`` and a probe: ``probe=`` or the first batch of
    ``state.batches()``; without them full validation runs readback and says so). The loop never
    waits for it. A failure is logged loudly, recorded in ``.ckptvault-validation/`` (``ckptvault
    ls`` shows it) and the checkpoint is never chosen by ``restore`` or ``best``.

    Preemption: SIGTERM and SIGUSR1 (``preemption_signals``) only set a flag; the next
    :meth:`step` commits a full checkpoint and :attr:`should_stop` becomes true, so the loop can
    exit cleanly.
    """

    @typed_os_errors
    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        every_seconds: float | None = None,
        every: Literal["auto"] | None = None,
        mtbf_seconds: float | None = None,
        save_on_improvement: bool = False,
        keep_last: int | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: Mode = "min",
        keep_every_n_steps: int | None = None,
        keep_every_n_epochs: int | None = None,
        keep_newer_than: float | None = None,
        weights: Scope | None = None,
        config: Any = None,
        data_version: str | None = None,
        preemption_signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1),
        async_save: bool = False,
        max_staging_bytes: int | None = None,
        incremental: bool = False,
        compression: str | None = None,
        chunk_bytes: int | None = None,
        trust_version_counter: bool = True,
        validate: str = "full",
        trackers: Sequence[Any] = (),
        storage: Storage | None = None,
    ) -> None:
        if directory is None:
            directory = os.environ.get(RUN_DIR_ENV)
            if not directory:
                raise ValueError(f"give the run directory, or set {RUN_DIR_ENV}")
        self.directory = Path(directory)  # a name only: the run is reached through self._run
        self._run = RunDirectory(self.directory, storage)
        full = Scope(
            every_n_steps=every_n_steps,
            every_n_epochs=every_n_epochs,
            every_seconds=every_seconds,
            every=every,
            mtbf_seconds=mtbf_seconds,
            save_on_improvement=save_on_improvement,
            keep_last=keep_last,
            keep_best=keep_best,
            monitor=monitor,
            mode=mode,
            keep_every_n_steps=keep_every_n_steps,
            keep_every_n_epochs=keep_every_n_epochs,
            keep_newer_than=keep_newer_than,
        )
        scopes = {FULL: full} if weights is None else {FULL: full, WEIGHTS: weights}
        self._streams = {s: _Stream(s, c, c.triggers(), c.retention()) for s, c in scopes.items()}
        now = time.time()
        for stream in self._streams.values():
            stream.state.last_save_time = now
        self._lease: Lease | None = self._acquire_lease()  # also removes dead writers' leftovers
        try:
            self.run = self._open_run(config, data_version, scopes)
            try:
                self._pins = self._run.read_pins()
                self._pins_known = True
            except StorageError:
                raise
            except CheckpointError as exc:  # damaged: keep everything rather than guess
                warnings.warn(str(exc), stacklevel=2)
                self._pins, self._pins_known = set(), False
            index = self._run.read_index()
            self._records = load_records(self._run, index)
            self._load_trigger_states(index)
            if len(index.get("records", ())) != len(self._records):
                self._write_index()  # rebuilt or reconciled: later opens need not read the manifests
        except BaseException:
            self.close()
            raise
        self._inflight: tuple[PendingSave, CheckpointRecord] | None = None
        self._writer = BackgroundWriter() if async_save else None
        self._validate = validation.check_level(validate)
        self._validator = BackgroundValidator()
        self._validation_passed: dict[str, bool] = {}  # by name, for the record's current id only
        self._confirmed: set[str] = set()  # records whose facts come from their manifest (index_check)
        self._chunking = api.chunk_options(incremental, compression, chunk_bytes)
        self._hints = HintCache() if self._chunking is not None and trust_version_counter else None
        self._staging = StagingBuffer(max_staging_bytes)
        self.should_stop = False
        self._preemption: CheckpointInfo | None = None
        self._preemption_step = -1
        self._preempted = threading.Event()
        self._step_metrics: dict[str, Any] = {}
        self._metrics_step = -1
        self._previous_handlers: dict[int, Any] = {}
        self._install_signal_handlers(preemption_signals)
        self._trackers = list(trackers)
        self._track("on_run_start", str(self.directory), dict(self.run))

    # -- lifecycle ------------------------------------------------------------------------------
    def _acquire_lease(self) -> Lease:
        """The run's single-writer lease (on local disk a POSIX record lock, which dies with the
        process -- SIGKILL included -- and is not shared with forked DataLoader workers)."""
        try:
            return self._run.acquire()
        except ConcurrentWriteError as exc:
            raise ConcurrentWriteError(
                exc.errno or 0,
                f"{self.directory} already has a writer ({exc.strerror}); one manager per run directory",
            ) from None

    def _open_run(self, config: Any, data_version: str | None, scopes: Mapping[str, Scope]) -> dict[str, Any]:
        from .training.provenance import capture_provenance

        settings = {name: asdict(scope) for name, scope in scopes.items()}
        run = self._run.read_run()
        if run is not None:
            resumes = [*run.get("resumes", []), {"at": time.time(), "pid": os.getpid()}]
            run["resumes"] = resumes[-100:]  # the most recent restarts; bounded
        else:
            run = capture_provenance(config=config, data_version=data_version)
        run["scopes"] = settings  # the retention in force, for `ckptvault ls`
        self._run.write_run(run)
        return run

    @typed_os_errors
    def close(self) -> None:
        """Finishes a pending save (a failure is reported as a warning: use ``wait()`` to get it
        raised), releases the run lock and restores the previous signal handlers."""
        if getattr(self, "_inflight", None) is not None:
            try:
                self._finish_pending(block=True)
            except Exception as exc:
                warnings.warn(f"the last asynchronous save failed: {exc}", stacklevel=2)
        for tracker in getattr(self, "_trackers", []):
            with contextlib.suppress(Exception):
                tracker.close()
        self._trackers = []
        validator = getattr(self, "_validator", None)
        if validator is not None:
            validator.join()
            if getattr(self, "_lease", None) is not None:
                self._apply_validation_results()
            validator.shutdown()
        writer = getattr(self, "_writer", None)
        if writer is not None:
            writer.shutdown()
        for signum, handler in getattr(self, "_previous_handlers", {}).items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signum, handler)
        self._previous_handlers = {}
        lease = getattr(self, "_lease", None)
        if lease is not None:
            self._lease = None
            lease.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.wait()
        finally:
            self.close()  # a failed pending save must not keep the run locked

    @typed_os_errors
    def wait(self) -> None:
        """Blocks until the save in flight (async mode) has committed; re-raises its failure."""
        self._finish_pending(block=True)

    @typed_os_errors
    def wait_validation(self) -> None:
        """Blocks until every background validation so far has finished and been applied."""
        self._finish_pending(block=True)
        self._validator.join()
        self._apply_validation_results()

    def validation_result(self, name: str) -> dict[str, Any] | None:
        """The recorded validation result of a checkpoint of this run (by directory name): of the
        checkpoint now under that name only (a stale result of a replaced one is not returned);
        for a name no longer in the run, whatever was recorded last."""
        record = self._records.get(name)
        if record is not None and record.checkpoint_id:
            return result_for(self._run, name, record.checkpoint_id)
        return self._run.read_validation(name)

    def _apply_validation_results(self) -> None:
        """Applies finished validations (in the loop's thread: records are not shared)."""
        changed = False
        scopes: set[str] = set()
        for result in self._validator.drain():
            name = os.path.basename(result.checkpoint)
            current = self._records.get(name)
            if current is None or current.checkpoint_id != result.checkpoint_id:
                continue  # deleted, or re-saved under the same name since: says nothing about it
            self._validation_passed[name] = result.passed  # live records only, or a long run grows
            scopes.add(current.scope)
            if result.passed:
                continue
            logger.error(
                "checkpoint %s FAILED %s validation: %s", result.checkpoint, result.level, result.problems
            )
            problems = "; ".join(result.problems)
            warnings.warn(
                f"checkpoint {result.checkpoint} failed {result.level} validation: {problems}", stacklevel=3
            )
            record = self._records.get(name)
            if record is not None and record.valid:
                self._records[name] = dataclasses.replace(record, valid=False)
                changed = True
        for scope in sorted(scopes):  # a checkpoint kept only until a newer one was validated can go
            self._apply_retention(scope)
            changed = True
        if changed:
            self._write_index()

    def _install_signal_handlers(self, signals: tuple[int, ...]) -> None:
        if threading.current_thread() is not threading.main_thread():
            if signals:
                warnings.warn(
                    "CheckpointManager created off the main thread: preemption signals not handled",
                    stacklevel=3,
                )
            return
        for signum in signals:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._preempted.set()  # only a flag: the save happens at the next step, outside the handler

    # -- the loop -----------------------------------------------------------------------------
    @typed_os_errors
    def step(self, state: TrainState, metrics: Mapping[str, Any] | None = None) -> CheckpointInfo | None:
        """Marks one optimizer step done (``state.step += 1``) and saves if a trigger fires."""
        state.step += 1
        state._on_epoch_end = self._on_epoch_end
        if metrics:
            self._note_metrics(state, metrics)
        if self._preempted.is_set():
            self.should_stop = True
            state.stop_requested = True
            self._preempted.clear()
            self._preemption = self._save(state, FULL, "preemption")  # synchronous: the job may exit
            self._preemption_step = state.step
            return self._preemption
        if self._inflight is not None:
            self._finish_pending(block=False)
        self._apply_validation_results()
        now = time.time()
        current = self._step_metrics if self._metrics_step == state.step else _NO_METRICS
        saved = None
        for stream in self._streams.values():
            reason = step_trigger(
                stream.triggers, stream.state, step=state.step, epoch=state.epoch, now=now, metrics=current
            )
            if reason is not None:
                saved = self._save(state, stream.scope, reason, background=True)
        return saved

    @typed_os_errors
    def save(
        self, state: TrainState, metrics: Mapping[str, Any] | None = None, *, scope: str = FULL
    ) -> CheckpointInfo:
        """Saves now (e.g. after evaluation); retention runs after the commit.

        After a preemption at this step it returns the preemption checkpoint unchanged: the loop's
        epoch tail may still run, but the committed state must be the one to resume from."""
        if self.should_stop and self._preemption is not None and self._preemption_step == state.step:
            return self._preemption
        if metrics:
            self._note_metrics(state, metrics)
        info = self._save(state, scope, "explicit")
        assert info is not None  # explicit saves are synchronous
        return info

    def _note_metrics(self, state: TrainState, metrics: Mapping[str, Any]) -> None:
        # Loss tensors and numpy scalars become Python numbers: metadata holds plain values only.
        metrics = {k: _plain_metric(v) for k, v in metrics.items()}
        state.record_metrics(metrics)
        if self._metrics_step != state.step:
            self._step_metrics = {}
            self._metrics_step = state.step
        self._step_metrics.update(metrics)
        numeric = _numeric(metrics)
        for stream in self._streams.values():
            stream.state.observe(numeric, stream.triggers.monitor, stream.triggers.mode)

    def _on_epoch_end(self, state: TrainState) -> None:
        now = time.time()
        for stream in self._streams.values():
            if stream.state.last_save_step == state.step and stream.state.last_save_epoch < state.epoch:
                # This scope already saved at this very step, after the epoch's last batch (the
                # post-evaluation save): that checkpoint is the end-of-epoch state already.
                stream.state.last_save_epoch = state.epoch
                continue
            reason = epoch_trigger(
                stream.triggers,
                stream.state,
                epoch=state.epoch,
                now=now,
                metrics=self._current_metrics(state),
            )
            if reason is not None:
                self._save(state, stream.scope, reason, background=True)

    def _current_metrics(self, state: TrainState) -> dict[str, Any]:
        return dict(self._step_metrics) if self._metrics_step == state.step else {}

    # -- saving and retention -------------------------------------------------------------------
    def _save(
        self, state: TrainState, scope: str, reason: str, *, background: bool = False
    ) -> CheckpointInfo | None:
        """Saves synchronously (returns the info) or, with ``background`` on an async manager,
        stages the state and returns None: the commit is recorded when it is observed done."""
        if scope not in self._streams:
            raise ValueError(f"this manager has no {scope!r} scope (configure weights=Scope(...))")
        state._on_epoch_end = self._on_epoch_end
        self._finish_pending(block=True)  # back-pressure: one save in flight; re-raises its failure
        name = checkpoint_name(scope, state.step)
        committed_at = time.time()
        metrics = self._current_metrics(state)
        metadata = {
            "step": state.step,
            "epoch": state.epoch,
            "scope": scope,
            "reason": reason,
            "committed_at": committed_at,
            "run_id": self.run.get("run_id"),
            "git": self.run.get("git"),
            "config": self.run.get("config"),
            "data_version": self.run.get("data_version"),
            "metrics": metrics,
        }
        record = CheckpointRecord(
            name, state.step, state.epoch, committed_at, scope, _numeric(metrics), state.step in self._pins
        )
        started = time.perf_counter()
        path = self._run.checkpoint(name)
        extra: dict[str, bytes] = {}
        if state.architecture is not None:
            metadata["architecture"] = state.architecture.to_metadata()
            if self._validate == "full" and state.probe is not None:
                (model,) = state.parts["model"].values()
                extra[validation.PROBE_FILE] = validation.make_probe_file(model, state.probe, metrics)
                # Started at the first save that will need it (not for runs that never make a probe):
                # its one torch import overlaps this save and the steps before its validation.
                validation.start_server()
        if background and self._writer is not None:
            pending = self._writer.submit_save(
                path,
                state.capture(scope),
                metadata,
                self._staging,
                chunking=self._chunking,
                hints=self._hints,
                extra_files=extra,
            )
            self._inflight = (pending, record)
            info = None
        else:
            info = api.save(
                path,
                state.capture(scope),
                metadata=metadata,
                overwrite=True,
                incremental=self._chunking is not None,
                compression=self._chunking.compression if self._chunking else None,
                chunk_bytes=self._chunking.chunk_bytes if self._chunking else None,
                hints=self._hints,
                extra_files=extra,
            )
        # The loop's cost of this save (for every="auto"): the blocking part only when async.
        self._streams[scope].state.record_save(
            step=state.step, epoch=state.epoch, now=time.time(), duration=time.perf_counter() - started
        )
        if info is not None:
            self._committed(record, info)
        return info

    def _committed(self, record: CheckpointRecord, info: CheckpointInfo | None = None) -> None:
        """A durable commit: only now do "latest", retention and the index move on."""
        if info is not None:
            record = dataclasses.replace(record, checkpoint_id=info.checkpoint_id)
        self._records[record.name] = record
        self._confirmed.add(record.name)  # written by this process: its facts are the manifest's
        self._validation_passed.pop(record.name, None)  # a result of the checkpoint this one replaced
        if info is not None:  # before retention, which may delete the checkpoint just committed
            path = self._run.checkpoint(record.name)
            self._track("on_checkpoint", path, info, record.scope, record.step, record.metrics)
        self._event("commit", record.name, record.step, epoch=record.epoch, metrics=record.metrics)
        if self._validate != "checksum":
            self._validator.submit(self._run.checkpoint(record.name), self._validate, record.checkpoint_id)
        self._apply_retention(record.scope)
        self._write_index()

    def _finish_pending(self, *, block: bool) -> None:
        if self._inflight is None:
            return
        pending, record = self._inflight
        if not block and not pending.done():
            return
        self._inflight = None
        info = pending.wait()  # re-raises a background failure here, in the training loop
        self._committed(record, info)

    def _apply_retention(self, scope: str) -> None:
        # Checkpoints a registry version points at are pinned too (re-read: another process registers).
        if not self._pins_known:
            return  # pins.json is damaged: deleting now could delete a pinned checkpoint
        try:
            registered = registered_in(Path(self._run.path))
        except CheckpointError as exc:  # unknown pins: deleting now could delete a registered one
            warnings.warn(f"retention skipped: {exc}", stacklevel=3)
            return
        reasons = self._retention_reasons(scope, registered)
        if any(not why for why in reasons.values()) and self._needs_confirming(scope):
            if not self._confirm_records(scope):
                return  # a record could not be checked against its manifest: delete nothing now
            reasons = self._retention_reasons(scope, registered)  # decided again on manifest facts
        deleted = False
        fallback = self._last_validated(scope)
        for name, why in reasons.items():
            if not why and name != fallback:
                self._delete(name)
                deleted = True
        if deleted and self._run.has_store():
            collect_garbage(self._run.path)  # chunks only the deleted checkpoints used

    def _retention_reasons(self, scope: str, registered: set[str]) -> dict[str, tuple[str, ...]]:
        records = [
            dataclasses.replace(r, pinned=True) if r.name in registered else _with_pin(r, self._pins)
            for r in self._records.values()
            if r.scope == scope
        ]
        return retention_reasons(records, self._streams[scope].retention, now=time.time())

    def _needs_confirming(self, scope: str) -> bool:
        return any(r.scope == scope and r.name not in self._confirmed for r in self._records.values())

    def _confirm_records(self, scope: str) -> bool:
        """The scope's records from the index, checked against their manifests (index_check)."""
        confirmed, changed = confirm_scope(self._run, self._records, self._confirmed, scope, record_from_info)
        if changed:
            self._write_index()
        return confirmed

    def _track(self, hook: str, *args: Any) -> None:
        """Calls a tracker hook; a tracker failure is a warning, never a failed training step (a
        tracker whose run could not start is dropped: its later calls could only fail)."""
        for tracker in list(self._trackers):
            try:
                getattr(tracker, hook)(*args)
            except Exception as exc:
                logger.warning("tracker %s failed in %s: %s", type(tracker).__name__, hook, exc)
                warnings.warn(f"tracker {type(tracker).__name__} failed in {hook}: {exc}", stacklevel=3)
                if hook == "on_run_start":
                    self._trackers.remove(tracker)

    def _event(self, kind: str, name: str, step: int, **extra: Any) -> None:
        """One line of the run's event log. Informative only (plots, reports): a lost line costs a
        mark on a picture, so it is appended without fsync."""
        self._run.append_event({"event": kind, "name": name, "step": step, "time": time.time(), **extra})

    def _last_validated(self, scope: str) -> str | None:
        """The newest checkpoint that passed validation, while newer ones are still being validated
        or failed: retention keeps it, so a failed validation never leaves the run without a good
        checkpoint (``keep_last=1`` would otherwise delete it the moment the next one commits)."""
        if self._validate == "checksum":
            return None
        newest_first = sorted(
            (r for r in self._records.values() if r.scope == scope), key=lambda r: r.newness(), reverse=True
        )
        for record in newest_first[:64]:  # bounded: a result file is read per unknown record
            passed = self._validation_passed.get(record.name)
            if passed is None:
                result = result_for(self._run, record.name, record.checkpoint_id)
                passed = None if result is None else result.get("passed") is True
            if passed:
                return record.name
        return None

    def _delete(self, name: str) -> None:
        """Renames the checkpoint out of sight first, so a half-deleted one is never loadable."""
        record = self._records.pop(name, None)
        self._validation_passed.pop(name, None)  # one entry per live record, or a long run grows
        self._confirmed.discard(name)
        if record is not None:
            self._event("delete", name, record.step)
        if not self._run.delete_checkpoint(name):
            return
        # A passed result of a deleted checkpoint has no reader; failed ones stay for the run report.
        result = self._run.read_validation(name)
        if result is not None and result.get("passed") is True:
            with contextlib.suppress(OSError):
                self._run.remove_validation(name)

    def _write_index(self) -> None:
        records = sorted(self._records.values(), key=lambda r: (r.scope, r.step))
        triggers = {scope: stream.state.to_dict() for scope, stream in self._streams.items()}
        doc = {"records": [_record_to_json(r) for r in records], "triggers": triggers}
        self._run.write_index(doc)

    def _load_trigger_states(self, index: Mapping[str, Any]) -> None:
        """Best-so-far values survive a restart, so a resumed run does not mistake its first metric
        for an improvement."""
        saved = index.get("triggers", {})
        if not isinstance(saved, dict):
            return
        for scope, stream in self._streams.items():
            if isinstance(saved.get(scope), dict):
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    stream.state = TriggerState.from_dict(saved[scope])

    # -- pins -----------------------------------------------------------------------------------
    @typed_os_errors
    def pin(self, step: int) -> None:
        """Keeps the checkpoints of ``step`` (every scope) whatever the retention policy says."""
        self._pins.add(int(step))
        self._run.write_pins(self._pins)

    @typed_os_errors
    def unpin(self, step: int) -> None:
        self._pins.discard(int(step))
        self._run.write_pins(self._pins)
        for scope in self._streams:
            self._apply_retention(scope)
        self._write_index()

    # -- queries and restore ------------------------------------------------------------------
    def checkpoints(self, scope: str | None = None) -> list[CheckpointRecord]:
        """Committed checkpoints of this run, oldest first."""
        records = [r for r in self._records.values() if scope is None or r.scope == scope]
        return sorted(records, key=lambda r: (r.step, r.created, r.name))

    def latest(self, scope: str = FULL) -> CheckpointInfo | None:
        candidates = [r for r in self.checkpoints(scope) if r.valid]
        return checkpoint_info(self._run, candidates[-1].name) if candidates else None

    def best(self, scope: str = FULL) -> CheckpointInfo | None:
        record = self._best_record(scope)
        return checkpoint_info(self._run, record.name) if record else None

    def _best_record(self, scope: str) -> CheckpointRecord | None:
        stream = self._streams.get(scope)
        monitor = stream.config.monitor if stream else None
        if monitor is None:
            raise ValueError("best() needs a monitor metric (monitor=...)")
        sign = -1.0 if stream is not None and stream.config.mode == "max" else 1.0
        scored = [
            r for r in self.checkpoints(scope) if r.valid and not math.isnan(r.metrics.get(monitor, math.nan))
        ]
        return min(scored, key=lambda r: (sign * r.metrics[monitor], -r.step)) if scored else None

    @typed_os_errors
    def restore(
        self, state: TrainState, which: Literal["latest", "best"] | int = "latest", *, partial: bool = False
    ) -> CheckpointInfo | None:
        """Restores the newest checkpoint that verifies (or the best, or a given step) into
        ``state``; None for a fresh run.

        Never quietly (:mod:`ckptvault.restore_skips`): each checkpoint it skips is named in a
        warning and the log with why -- it fails verification now (then it is marked invalid), or
        it was found invalid or failed its validation before. When nothing is restored although a
        checkpoint skipped only for a failed validation verifies, it raises
        :class:`~ckptvault.restore_skips.RestoreRefusedError` instead of returning None: the caller
        would start fresh and retention would then delete that work. ``which=STEP`` restores that
        step's checkpoint whatever its validation said."""
        state._on_epoch_end = self._on_epoch_end
        scope = FULL if any(r.scope == FULL for r in self._records.values()) else WEIGHTS
        explicit = not isinstance(which, str)
        if which == "latest":
            candidates = list(reversed(self.checkpoints(scope)))  # invalid ones: skipped, loudly
        elif which == "best":
            best = self._best_record(scope)
            candidates = [best] if best else []
        else:
            candidates = [r for r in self._records.values() if r.step == int(which) and r.scope == scope]
            if not candidates:
                raise CheckpointNotFoundError(f"{self.directory}: no {scope} checkpoint at step {which}")
        skipped: list[Skip] = []
        for record in candidates:
            if not record.valid and not explicit:
                skip = why_invalid(self._run, record)
                if skip.validation_only:
                    skipped.append(skip)
                    warn_skipped(self._run, skip)
                    continue
                # Marked invalid with no failed validation of this id on record (an index entry, an
                # earlier failed read): the bytes decide, and the load verifies every one of them.
            try:
                tree = load_checkpoint(self._run, record.name)
            except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
                skipped.append(Skip(record, f"it fails verification: {exc}", False))
                warn_skipped(self._run, skipped[-1])
                self._records[record.name] = dataclasses.replace(record, valid=False)
                continue
            if not record.valid:
                self._records[record.name] = dataclasses.replace(record, valid=True)  # verified now
            state.restore(tree, partial=partial)
            for stream in self._streams.values():
                stream.state.last_save_step = state.step
                stream.state.last_save_epoch = state.epoch
                stream.state.last_save_time = time.time()
            return checkpoint_info(self._run, record.name)
        if not explicit:
            reported = {s.record.name for s in skipped}
            for record in self.checkpoints(scope):  # ("best" never had the invalid ones as candidates)
                if not record.valid and record.name not in reported:
                    skipped.append(why_invalid(self._run, record))
                    warn_skipped(self._run, skipped[-1])
            refuse_fresh_start(self._run, skipped)
        return None
