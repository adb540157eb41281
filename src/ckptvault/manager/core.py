"""L3: CheckpointManager -- a run of checkpoints with triggers, retention, validation and restore.

Built on the one save pipeline and the engine's readers, never beside them: every checkpoint it
writes is an ordinary ckptvault checkpoint. The run's layout (docs/format.md, "Run layout") belongs
to :class:`~ckptvault.engine.rundir.RunDirectory`; this module orchestrates the training loop's
calls over the package's parts: streams (:mod:`.scope`), records and retention (:mod:`.book`),
saving, validation (:mod:`.validation_ids`), signals, restore and the mirror (:mod:`.mirror`).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

from .. import validation
from ..engine.background import PendingSave
from ..engine.chunks import HintCache
from ..engine.rundir import RunDirectory, checkpoint_name
from ..errors import CheckpointError, typed_os_errors
from ..policy import CheckpointRecord, epoch_trigger, step_trigger
from ..policy.metrics import numeric_metrics, plain_metric
from ..storage.base import Storage
from ..storage.resolve import is_url
from ..training.sharded_state import sharded_tree, unsendable
from ..training.state import FULL, WEIGHTS, TrainState
from ..types import CheckpointInfo
from .book import RunBook, call_trackers, open_run
from .lease import RunLease
from .mirror_config import MirrorTarget
from .ranks import RankGroup
from .records import checkpoint_info
from .restore import restore_from
from .restore_ranks import restore_ranks
from .saving import RunSaver, ShardedPending, architecture_files, checkpoint_metadata
from .scope import Scope, Stream, full_scope
from .signals import SIGNALS, Preemption
from .validation_ids import BackgroundValidator, result_for

RUN_DIR_ENV = "CKPTVAULT_RUN_DIR"
_NO_METRICS: Mapping[str, Any] = {}


class CheckpointManager:
    """Saves a training run's checkpoints when triggers fire, keeps what the retention policy
    keeps, and restores the newest valid one.

    Configuration: the full scope's options (:class:`~ckptvault.manager.scope.Scope`'s fields:
    ``every_n_steps=``, ``keep_last=``, ``monitor=``, ...) as keyword arguments or as
    ``full=Scope(...)``; ``weights=Scope(...)`` adds a weights-only stream. ``storage=`` names the
    backend the run lives on (default: the local disk at ``directory``).

    Concurrency contract: ONE writer per run, enforced by the run's lease; a second manager gets
    :class:`ConcurrentWriteError` naming the holder. Inside a torch.distributed job every rank
    constructs the manager and makes the same calls: triggers and preemption are agreed by a
    collective each step, every rank writes its shards of each checkpoint, and rank 0 alone holds
    the lease, keeps the records, retention, validation and trackers (:mod:`.ranks`). Any number
    of readers may read the run meanwhile: checkpoints appear atomically and are never half
    visible when deleted. Not
    thread-safe: call it from the training loop's thread. :meth:`close` releases the lease (on local
    disk so does process exit, SIGKILL included; on an object store it lapses after 5 minutes).

    Asynchronous saves (``async_save=True``): a save fired by :meth:`step` or an epoch trigger
    blocks only while the state is copied into a reused host staging buffer (at most
    ``max_staging_bytes``); hashing, writing and the commit run in a background thread, one save in
    flight (the next waits for it). "latest", the index and retention move on only once the commit
    is seen complete (at the next ``step``/``save``/``wait``), which is also where a background
    failure is raised. Explicit :meth:`save` and preemption saves are synchronous.

    Incremental saves (``incremental=True``; ``compression=`` too) store tensors of at least
    64 KiB as ``chunk_bytes`` chunks in the run's store: a stored chunk is referenced, not
    rewritten, and a tensor whose torch version counter shows it unchanged is not even hashed
    (``trust_version_counter=False`` always hashes: ``.data`` writes do not bump the counter).

    Validation (``validate=``, default ``"full"``) runs in the background after each commit:
    ``"readback"`` re-hashes the checkpoint; ``"full"`` also rebuilds the model in a separate
    process and compares outputs on a probe batch (needs ``TrainState(model_factory=...)`` and a
    probe, else it runs readback and says so). A failed checkpoint is logged, shown by ``ls``,
    and never chosen by ``restore`` or ``best``.

    Preemption: SIGTERM and SIGUSR1 (``preemption_signals``) set a flag; the next :meth:`step`
    commits a full checkpoint and :attr:`should_stop` becomes true (the loop exits cleanly).

    Two tiers (``mirror="s3://..."`` or ``(storage, key)``): each commit is uploaded in the background
    to a mirror run (``mirror_keep_last``), restore on an empty run pulls from it; retention keeps
    what it lacks, ``local_budget_bytes`` deletes uploaded ones first (:mod:`.mirror`).
    """

    @typed_os_errors
    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        full: Scope | None = None,
        weights: Scope | None = None,
        config: Any = None,
        data_version: str | None = None,
        preemption_signals: tuple[int, ...] = SIGNALS,
        async_save: bool = False,
        max_staging_bytes: int | None = None,
        incremental: bool = False,
        compression: str | None = None,
        chunk_bytes: int | None = None,
        trust_version_counter: bool = True,
        validate: str = "full",
        trackers: Sequence[Any] = (),
        storage: Storage | None = None,
        mirror: MirrorTarget | None = None,
        mirror_keep_last: int | None = None,
        mirror_max_behind: int = 8,
        mirror_grace_seconds: float = 30.0,
        local_budget_bytes: int | None = None,
        **scope_options: Any,
    ) -> None:
        if directory is None:
            directory = os.environ.get(RUN_DIR_ENV)
            if not directory:
                raise ValueError(f"give the run directory, or set {RUN_DIR_ENV}")
        # A name only (the run is reached through self._run); a URL stays a string.
        self.directory: Path | str = os.fspath(directory) if is_url(directory) else Path(directory)
        scopes = {FULL: full_scope(full, scope_options)}
        if weights is not None:
            scopes[WEIGHTS] = weights
        self._streams = {name: Stream.of(name, config) for name, config in scopes.items()}
        now = time.time()
        for stream in self._streams.values():
            stream.state.last_save_time = now
        self._validate = validation.check_level(validate)
        self._run = RunDirectory(self.directory, storage)
        self._book = RunBook(self._run, self._streams, self._validate)
        self._ranks = RankGroup.detect()  # in a torch.distributed job: only rank 0 keeps the books
        self._lead = lead = self._ranks is None or self._ranks.is_coordinator
        self._lease: RunLease | None = RunLease(self._run, self.directory) if lead else None
        try:
            self.run = open_run(self._run, config, data_version, scopes) if lead else {}
            self._book.open() if lead else self._book.follow()  # followers read rank 0's records
            options = (mirror_keep_last, mirror_max_behind, mirror_grace_seconds, local_budget_bytes)
            self.mirror = self._book.open_mirror(mirror if lead else None, *options)
        except BaseException:
            self.close()
            raise
        self._inflight: tuple[PendingSave | ShardedPending, CheckpointRecord] | None = None
        self._saver = RunSaver(
            self._run,
            async_save=async_save,
            max_staging_bytes=max_staging_bytes,
            incremental=incremental,
            compression=compression,
            chunk_bytes=chunk_bytes,
            trust_version_counter=trust_version_counter,
        )
        self._validator = BackgroundValidator()
        self.should_stop = False
        self._preemption: CheckpointInfo | None = None
        self._preemption_step = -1
        self._signals = Preemption()
        self._step_metrics: dict[str, Any] = {}
        self._metrics_step = -1
        self._signals.install(preemption_signals)
        self._trackers = list(trackers) if lead else []
        self._track("on_run_start", str(self.directory), dict(self.run))

    @property
    def _hints(self) -> HintCache | None:
        """The hint cache of incremental saves (None when every tensor is hashed each save)."""
        return self._saver.hints

    # -- lifecycle ------------------------------------------------------------------------------
    @typed_os_errors
    def close(self) -> None:
        """Finishes a pending save (a failure is reported as a warning: use ``wait()`` to get it
        raised), releases the run's lease and restores the previous signal handlers."""
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
        saver = getattr(self, "_saver", None)
        if saver is not None:
            saver.shutdown()
        self._book.close_mirror()  # uploads what is queued (after a preemption: no further wait)
        signals = getattr(self, "_signals", None)
        if signals is not None:
            signals.restore()
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
        record = self._book.records.get(name)
        if record is not None and record.checkpoint_id:
            return result_for(self._run, name, record.checkpoint_id)
        return self._run.read_validation(name)

    def _apply_validation_results(self) -> None:
        """Applies finished validations (in the loop's thread: records are not shared)."""
        self._book.apply_validations(self._validator.drain())

    # -- the loop -----------------------------------------------------------------------------
    @typed_os_errors
    def step(self, state: TrainState, metrics: Mapping[str, Any] | None = None) -> CheckpointInfo | None:
        """Marks one optimizer step done (``state.step += 1``) and saves if a trigger fires."""
        state.step += 1
        state._on_epoch_end = self._on_epoch_end
        if self._lease is not None:
            self._lease.keep_alive()  # an object store's lease must not lapse between saves
        if metrics:
            self._note_metrics(state, metrics)
        now = time.time()
        current = self._step_metrics if self._metrics_step == state.step else _NO_METRICS
        reasons = [
            step_trigger(s.triggers, s.state, step=state.step, epoch=state.epoch, now=now, metrics=current)
            for s in self._streams.values()
        ]
        preempted = self._signals.take()
        if self._ranks is not None:  # one decision for every rank (time, metrics, signals differ)
            preempted, reasons = self._ranks.agree(preempted, reasons)
        if preempted:
            self.should_stop = True
            state.stop_requested = True
            self._preemption = self._save(state, FULL, "preemption")  # synchronous: the job may exit
            self._preemption_step = state.step
            self._book.mirror_preempted()  # a bounded grace for its uploads, then what is left is named
            return self._preemption
        if self._inflight is not None:
            self._finish_pending(block=False)
        self._apply_validation_results()
        saved = None
        for stream, reason in zip(self._streams.values(), reasons, strict=True):
            if reason is not None:
                saved = self._save(state, stream.scope, reason, background=True)
        self._book.check_mirror()  # MirrorBehindError: too many committed checkpoints not uploaded
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
        assert info is not None  # explicit saves are synchronous (and shared by every rank)
        self._book.check_mirror()
        return info

    def _note_metrics(self, state: TrainState, metrics: Mapping[str, Any]) -> None:
        # Loss tensors and numpy scalars become Python numbers: metadata holds plain values only.
        metrics = {k: plain_metric(v) for k, v in metrics.items()}
        state.record_metrics(metrics)
        if self._metrics_step != state.step:
            self._step_metrics = {}
            self._metrics_step = state.step
        self._step_metrics.update(metrics)
        numeric = numeric_metrics(metrics)
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
            reason = reason if self._ranks is None else self._ranks.share(reason)
            if reason is not None:
                self._save(state, stream.scope, reason, background=True)

    def _current_metrics(self, state: TrainState) -> dict[str, Any]:
        return dict(self._step_metrics) if self._metrics_step == state.step else {}

    # -- saving ---------------------------------------------------------------------------------
    def _save(
        self, state: TrainState, scope: str, reason: str, *, background: bool = False
    ) -> CheckpointInfo | None:
        """Saves synchronously (returns the info) or, with ``background`` on an async manager,
        stages the state and returns None: the commit is recorded when it is observed done."""
        if scope not in self._streams:
            raise ValueError(f"this manager has no {scope!r} scope (configure weights=Scope(...))")
        state._on_epoch_end = self._on_epoch_end
        self._finish_pending(block=True)  # back-pressure: one save in flight; re-raises its failure
        if self._lease is not None:
            self._lease.renew()  # a lease that expired and was taken: stop before writing
        name = checkpoint_name(scope, state.step)
        committed_at = time.time()
        metrics = self._current_metrics(state)
        metadata = checkpoint_metadata(self.run, state, scope, reason, committed_at, metrics)
        record = CheckpointRecord(
            name,
            state.step,
            state.epoch,
            committed_at,
            scope,
            numeric_metrics(metrics),
            state.step in self._book.pins,
        )
        started = time.perf_counter()
        with self._book.mirror_paused():  # uploads hold while the loop waits for its own save
            if self._ranks is not None:  # every rank writes its shards; rank 0 commits
                group = self._ranks.async_group() if background and self._saver.writer else None
                tree = sharded_tree(state, scope, self._ranks.rank)
                self._ranks.check(unsendable(tree), f"saving {name}")  # fail every rank, never hang them
                outcome: CheckpointInfo | PendingSave | ShardedPending | None
                outcome = self._saver.save_sharded(name, tree, metadata, group=group)
            else:
                extra = architecture_files(state, metadata, self._validate, metrics)
                outcome = self._saver.save(name, state.capture(scope), metadata, extra, background=background)
        # The loop's cost of this save (for every="auto"): the blocking part only when async.
        self._streams[scope].state.record_save(
            step=state.step, epoch=state.epoch, now=time.time(), duration=time.perf_counter() - started
        )
        if isinstance(outcome, (PendingSave, ShardedPending)):
            self._inflight = (outcome, record)
            return None
        if self._ranks is not None:  # rank 0 keeps the books; every rank returns once they are written
            return cast(CheckpointInfo | None, self._ranks.lead(lambda: self._committed(record, outcome)))
        return self._committed(record, outcome)

    def _committed(
        self, record: CheckpointRecord, info: CheckpointInfo | None = None
    ) -> CheckpointInfo | None:
        """A durable commit: only now do "latest", retention and the index move on."""
        record = self._book.committed(record, info)
        if info is not None:  # before retention, which may delete the checkpoint just committed
            path = self._run.checkpoint(record.name)
            self._track("on_checkpoint", path, info, record.scope, record.step, record.metrics)
        self._book.event("commit", record.name, record.step, epoch=record.epoch, metrics=record.metrics)
        if self._validate != "checksum":
            self._validator.submit(self._run.checkpoint(record.name), self._validate, record.checkpoint_id)
        self._book.apply_retention(record.scope)
        self._book.write_index()
        return info

    def _finish_pending(self, *, block: bool) -> None:
        if self._inflight is None:
            return
        pending, record = self._inflight
        if not block and not pending.done():
            return
        self._inflight = None
        info = pending.wait()  # re-raises a background failure here, in the training loop
        if self._lead:
            self._committed(record, info)

    def _track(self, hook: str, *args: Any) -> None:
        call_trackers(self._trackers, hook, *args)

    # -- pins -----------------------------------------------------------------------------------
    @typed_os_errors
    def pin(self, step: int) -> None:
        """Keeps the checkpoints of ``step`` (every scope) whatever the retention policy says."""
        self._book.pins.add(int(step))
        self._run.write_pins(self._book.pins)

    @typed_os_errors
    def unpin(self, step: int) -> None:
        self._book.pins.discard(int(step))
        self._run.write_pins(self._book.pins)
        for scope in self._streams:
            self._book.apply_retention(scope)
        self._book.write_index()

    @typed_os_errors
    def delete(self, name: str) -> None:
        """Deletes checkpoint ``name`` as retention would (not pinned/registered ones; rank 0 only)."""
        self.wait()
        if not self._lead:
            raise CheckpointError("delete on the coordinator (rank 0): it alone keeps the run's records")
        self._book.delete_by_request(name)

    # -- queries and restore ------------------------------------------------------------------
    def checkpoints(self, scope: str | None = None) -> list[CheckpointRecord]:
        """Committed checkpoints of this run, oldest first."""
        return self._book.checkpoints(scope)

    def latest(self, scope: str = FULL) -> CheckpointInfo | None:
        candidates = [r for r in self.checkpoints(scope) if r.valid]
        return checkpoint_info(self._run, candidates[-1].name) if candidates else None

    def best(self, scope: str = FULL) -> CheckpointInfo | None:
        record = self._book.best_record(scope)
        return checkpoint_info(self._run, record.name) if record else None

    @typed_os_errors
    def restore(
        self, state: TrainState, which: Literal["latest", "best"] | int = "latest", *, partial: bool = False
    ) -> CheckpointInfo | None:
        """Restores the newest checkpoint that verifies (or the best, or a given step) into
        ``state``; None for a fresh run. Never quietly (:mod:`ckptvault.manager.restore`): each
        checkpoint skipped is named in a warning with why (fails verification now, or was found
        invalid or failed validation before); when only checkpoints that failed validation verify,
        :class:`~ckptvault.manager.restore.RestoreRefusedError` instead of None (a fresh start's
        retention would delete that work). ``which=STEP`` restores that step whatever validation said."""
        state._on_epoch_end = self._on_epoch_end
        if self._ranks is not None:
            return restore_ranks(self._book, self._ranks, state, which, partial=partial)
        return restore_from(self._book, state, which, partial=partial)
