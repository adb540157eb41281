"""L3: the manager's book of a run -- its records, and what retention and validation do to them.

:class:`RunBook` owns the records of one open run (one writer: the manager holding the run's lease)
and every decision that deletes: retention asks :func:`~ckptvault.policy.retention_reasons`, checks
the index's claims against the manifests first (:mod:`.index_check`), never deletes past a damaged
pin list or registry marker, and keeps the newest checkpoint that passed validation while newer
ones are unproven. Everything it reads or writes goes through the run's
:class:`~ckptvault.engine.rundir.RunDirectory`; chunks only deleted checkpoints used are freed by
the chunk store's garbage collection (:mod:`ckptvault.engine.gc`, through the same storage).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..catalog.registry import registered_in
from ..engine.gc import collect_garbage
from ..engine.rundir import RunDirectory
from ..errors import CheckpointError, CheckpointNotFoundError, StorageError
from ..policy import CheckpointRecord, TriggerState, retention_reasons
from ..policy.records import best_of, metric_value
from ..types import CheckpointInfo
from ..validation import ValidationResult
from .index_check import confirm_scope
from .mirror import Mirror, open_mirror
from .mirror_config import MirrorOptions, MirrorTarget
from .records import load_records, record_from_info, record_to_json, with_pin
from .scope import Stream
from .validation_ids import result_for

logger = logging.getLogger("ckptvault")


class RunBook:
    """The records of an open run and the decisions over them (not thread-safe: the loop's)."""

    def __init__(self, run: RunDirectory, streams: Mapping[str, Stream], validate: str) -> None:
        self.run = run
        self.streams = streams
        self.validate = validate
        self.records: dict[str, CheckpointRecord] = {}
        self.confirmed: set[str] = set()  # records whose facts come from their manifest (index_check)
        self.validation_passed: dict[str, bool] = {}  # by name, for the record's current id only
        self.pins: set[int] = set()
        self.pins_known = True
        self.mirror: Mirror | None = None  # the run's mirror, if it has one (manager/mirror.py)
        self.following = False  # a follower rank's book: read from the run, never written

    def open(self) -> None:
        """Reads pins, the index and the listing; rewrites the index when it was rebuilt."""
        try:
            self.pins = self.run.read_pins()
        except StorageError:
            raise
        except CheckpointError as exc:  # damaged: keep everything rather than guess
            warnings.warn(str(exc), stacklevel=4)
            self.pins, self.pins_known = set(), False
        index = self.run.read_index()
        self.records = load_records(self.run, index)
        self._load_trigger_states(index)
        if len(index.get("records", ())) != len(self.records):
            self.write_index()  # rebuilt or reconciled: later opens need not read the manifests

    def follow(self) -> None:
        """Opens the book of a rank other than 0 in a torch.distributed job: rank 0 keeps the
        records, this rank reads them from the index rank 0 writes (reconciled with the listing)
        each time it is asked, so ``latest()``/``checkpoints()``/``best()`` give every rank the same
        answer without a collective (a call made on one rank only must not hang)."""
        self.following = True
        self.records = load_records(self.run)

    def _load_trigger_states(self, index: Mapping[str, Any]) -> None:
        """Best-so-far values survive a restart, so a resumed run does not mistake its first metric
        for an improvement."""
        saved = index.get("triggers", {})
        if not isinstance(saved, dict):
            return
        for scope, stream in self.streams.items():
            if isinstance(saved.get(scope), dict):
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    stream.state = TriggerState.from_dict(saved[scope])

    # -- the mirror (manager/mirror.py) ---------------------------------------------------------
    def open_mirror(
        self,
        target: MirrorTarget | None,
        keep_last: int | None,
        max_behind: int,
        grace: float,
        budget: int | None,
    ) -> Mirror | None:
        """Starts the run's mirror (after :meth:`open`: it queues what an earlier process left
        un-uploaded); None without one."""
        options = MirrorOptions(keep_last, max_behind, grace, budget)
        self.mirror = open_mirror(self.run, target, options, self.records, self.streams)
        remote_size = self.mirror.remote.storage.file_bytes if self.mirror is not None else None
        if remote_size and self.run.storage.file_bytes is None:
            # Copies keep files as they are: written at the mirror's preferred size, they upload
            # and pull as mid-sized objects, several at once (this run's storage is its own).
            self.run.storage.file_bytes = remote_size
        return self.mirror

    @contextlib.contextmanager
    def mirror_paused(self) -> Iterator[None]:
        """Holds the mirror's uploads while the loop saves (the save's cost is the loop's)."""
        if self.mirror is None:
            yield
            return
        self.mirror.loop_idle.clear()
        try:
            yield
        finally:
            self.mirror.loop_idle.set()

    def check_mirror(self) -> None:
        if self.mirror is not None:
            self.mirror.check()

    def mirror_preempted(self) -> None:
        if self.mirror is not None:
            self.mirror.preempted()

    def close_mirror(self) -> None:
        """Closes the mirror (its queue uploaded), then applies retention once more: what waited
        only for its upload goes now, not at the next run's first commit. A failure of that
        retention is a warning: closing must go on to release the run."""
        if self.mirror is None:
            return
        self.mirror.close()
        try:
            for scope in self.streams:
                self.apply_retention(scope)
            self.write_index()
        except (CheckpointError, OSError) as exc:
            warnings.warn(f"retention after the mirror's last uploads failed: {exc}", stacklevel=4)

    # -- records --------------------------------------------------------------------------------
    def checkpoints(self, scope: str | None = None) -> list[CheckpointRecord]:
        """Committed checkpoints of this run, oldest first."""
        if self.following:
            self.records = load_records(self.run)
        records = [r for r in self.records.values() if scope is None or r.scope == scope]
        return sorted(records, key=lambda r: (r.step, r.created, r.name))

    def best_record(self, scope: str) -> CheckpointRecord | None:
        """The valid record with the best monitored value (policy's one "best": ties go to the newer)."""
        stream = self.streams.get(scope)
        monitor = stream.config.monitor if stream else None
        if stream is None or monitor is None:
            raise ValueError("best() needs a monitor metric (monitor=...)")
        if self.following:
            self.records = load_records(self.run)
        newest_first = sorted(
            (r for r in self.records.values() if r.scope == scope and r.valid), key=lambda r: r.newness()
        )[::-1]
        return best_of(newest_first, lambda r: metric_value(r.metrics, monitor), stream.config.mode)

    def committed(self, record: CheckpointRecord, info: CheckpointInfo | None) -> CheckpointRecord:
        """Books a durable commit written by this process (its facts are the manifest's)."""
        if info is not None:
            record = dataclasses.replace(record, checkpoint_id=info.checkpoint_id)
        self.records[record.name] = record
        self.confirmed.add(record.name)
        self.validation_passed.pop(record.name, None)  # a result of the checkpoint this one replaced
        if self.mirror is not None:
            self.mirror.committed(record)  # queued for upload, so protected from retention from now
        return record

    def mark_valid(self, name: str, valid: bool) -> None:
        record = self.records.get(name)
        if record is not None and record.valid != valid:
            self.records[name] = dataclasses.replace(record, valid=valid)

    def event(self, kind: str, name: str, step: int, **extra: Any) -> None:
        """One line of the run's event log (informative only: plots, reports)."""
        self.run.append_event({"event": kind, "name": name, "step": step, "time": time.time(), **extra})

    def write_index(self) -> None:
        records = sorted(self.records.values(), key=lambda r: (r.scope, r.step))
        triggers = {scope: stream.state.to_dict() for scope, stream in self.streams.items()}
        self.run.write_index({"records": [record_to_json(r) for r in records], "triggers": triggers})

    # -- retention --------------------------------------------------------------------------------
    def apply_retention(self, scope: str) -> bool:
        """Deletes what the scope's policy no longer keeps; True when anything was deleted."""
        # Checkpoints a registry version points at are pinned too (re-read: another process registers).
        if not self.pins_known:
            return False  # pins.json is damaged: deleting now could delete a pinned checkpoint
        try:
            registered = registered_in(self.run)
        except CheckpointError as exc:  # unknown pins: deleting now could delete a registered one
            warnings.warn(f"retention skipped: {exc}", stacklevel=4)
            return False
        reasons = self._retention_reasons(scope, registered)
        if any(not why for why in reasons.values()) and self._needs_confirming(scope):
            if not self._confirm_records(scope):
                return False  # a record could not be checked against its manifest: delete nothing now
            reasons = self._retention_reasons(scope, registered)  # decided again on manifest facts
        deleted = False
        fallback = self._last_validated(scope)
        # A mirrored run keeps what its mirror lacks, and the newest it holds (manager/mirror.py).
        protected = self.mirror.protected() if self.mirror is not None else set()
        for name, why in reasons.items():
            if not why and name != fallback and name not in protected:
                self.delete(name)
                deleted = True
        if self.mirror is not None and self.mirror.options.local_budget_bytes is not None:
            deleted = self._enforce_budget(self.mirror, registered) or deleted
        if deleted:  # chunks only the deleted checkpoints used (a run without a store: nothing to do)
            collect_garbage(self.run.path, storage=self.run.storage)
        return deleted

    def _enforce_budget(self, mirror: Mirror, registered: set[str]) -> bool:
        """Over the local-disk budget: the oldest checkpoints already on the mirror go first, whatever
        the scopes' retention keeps (never a pinned or registered one); True if any was deleted."""
        records = self.checkpoints()
        untouchable = registered | {r.name for r in records if r.step in self.pins}
        victims = mirror.over_budget(records, untouchable)
        for name in victims:
            self.delete(name)
        return bool(victims)

    def _retention_reasons(self, scope: str, registered: set[str]) -> dict[str, tuple[str, ...]]:
        records = [
            dataclasses.replace(r, pinned=True) if r.name in registered else with_pin(r, self.pins)
            for r in self.records.values()
            if r.scope == scope
        ]
        return retention_reasons(records, self.streams[scope].retention, now=time.time())

    def _needs_confirming(self, scope: str) -> bool:
        return any(r.scope == scope and r.name not in self.confirmed for r in self.records.values())

    def _confirm_records(self, scope: str) -> bool:
        """The scope's records from the index, checked against their manifests (index_check)."""
        confirmed, changed = confirm_scope(self.run, self.records, self.confirmed, scope, record_from_info)
        if changed:
            self.write_index()
        return confirmed

    def _last_validated(self, scope: str) -> str | None:
        """The newest checkpoint that passed validation, while newer ones are still being validated
        or failed: retention keeps it, so a failed validation never leaves the run without a good
        checkpoint (``keep_last=1`` would otherwise delete it the moment the next one commits)."""
        if self.validate == "checksum":
            return None
        newest_first = sorted(
            (r for r in self.records.values() if r.scope == scope), key=lambda r: r.newness(), reverse=True
        )
        for record in newest_first[:64]:  # bounded: a result file is read per unknown record
            passed = self.validation_passed.get(record.name)
            if passed is None:
                result = result_for(self.run, record.name, record.checkpoint_id)
                passed = None if result is None else result.get("passed") is True
            if passed:
                return record.name
        return None

    def delete_by_request(self, name: str) -> None:
        """A user's deletion of one checkpoint (:meth:`CheckpointManager.delete`): refused for a
        checkpoint the run does not list, a pinned one and a registered one (their protection is
        the point of pins and the registry); the index is written at once."""
        record = self.records.get(name)
        if record is None:
            raise CheckpointNotFoundError(f"{name!r} is not a committed checkpoint of {self.run.path}")
        if record.step in self.pins:
            raise CheckpointError(f"{name} is pinned (step {record.step}): unpin it before deleting it")
        if name in registered_in(self.run):
            raise CheckpointError(f"{name} is registered in the model registry: unregister it first")
        self.delete(name)
        self.write_index()

    def delete(self, name: str) -> None:
        """Deletes a checkpoint (never half visible: :meth:`Storage.delete`) and forgets it."""
        record = self.records.pop(name, None)
        self.validation_passed.pop(name, None)  # one entry per live record, or a long run grows
        self.confirmed.discard(name)
        if record is not None:
            self.event("delete", name, record.step)
        if not self.run.delete_checkpoint(name):
            return
        # A passed result of a deleted checkpoint has no reader; failed ones stay for the run report.
        result = self.run.read_validation(name)
        if result is not None and result.get("passed") is True:
            with contextlib.suppress(OSError):
                self.run.remove_validation(name)

    # -- validation results -----------------------------------------------------------------------
    def apply_validations(self, results: Iterable[ValidationResult]) -> None:
        """Applies finished validations: a failed one marks its record invalid (loudly), and a
        checkpoint kept only until a newer one was validated may go."""
        changed = False
        scopes: set[str] = set()
        for result in results:
            name = os.path.basename(result.checkpoint)
            current = self.records.get(name)
            if current is None or current.checkpoint_id != result.checkpoint_id:
                continue  # deleted, or re-saved under the same name since: says nothing about it
            self.validation_passed[name] = result.passed  # live records only, or a long run grows
            scopes.add(current.scope)
            if result.passed:
                continue
            logger.error(
                "checkpoint %s FAILED %s validation: %s", result.checkpoint, result.level, result.problems
            )
            problems = "; ".join(result.problems)
            warnings.warn(
                f"checkpoint {result.checkpoint} failed {result.level} validation: {problems}", stacklevel=4
            )
            if current.valid:
                self.mark_valid(name, False)
                changed = True
        # A result may free a checkpoint retention held as the last validated one; the index is
        # rewritten only when something changed (a whole-file rewrite per result made every save
        # of a long run cost O(checkpoints kept) twice: docs/scaling.md).
        for scope in sorted(scopes):
            changed = self.apply_retention(scope) or changed
        if changed:
            self.write_index()


def call_trackers(trackers: list[Any], hook: str, *args: Any) -> None:
    """Calls a tracker hook; a tracker failure is a warning, never a failed training step (a
    tracker whose run could not start is dropped: its later calls could only fail)."""
    for tracker in list(trackers):
        try:
            getattr(tracker, hook)(*args)
        except Exception as exc:
            logger.warning("tracker %s failed in %s: %s", type(tracker).__name__, hook, exc)
            warnings.warn(f"tracker {type(tracker).__name__} failed in {hook}: {exc}", stacklevel=4)
            if hook == "on_run_start":
                trackers.remove(tracker)


def open_run(
    run: RunDirectory, config: Any, data_version: str | None, scopes: Mapping[str, Any]
) -> dict[str, Any]:
    """The run's record (run.json) as this session starts: provenance captured for a new run, a
    restart noted for an existing one, the retention in force (for ``ckptvault ls``)."""
    from ..training.provenance import capture_provenance

    settings = {name: dataclasses.asdict(scope) for name, scope in scopes.items()}
    record = run.read_run()
    if record is not None:
        resumes = [*record.get("resumes", []), {"at": time.time(), "pid": os.getpid()}]
        record["resumes"] = resumes[-100:]  # the most recent restarts; bounded
    else:
        record = capture_provenance(config=config, data_version=data_version)
    record["scopes"] = settings
    run.write_run(record)
    return record
