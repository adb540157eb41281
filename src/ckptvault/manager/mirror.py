"""L3: a run's mirror -- every committed checkpoint uploaded in the background to a second storage.

Why: a local disk is fast but dies with its machine; an object store survives it but is too slow to
wait for in the training loop. So ``CheckpointManager(run, mirror="s3://...")`` commits locally (the
loop waits only for that), and this module's single worker thread copies each committed checkpoint
to the mirror with :func:`~ckptvault.engine.transfer.copy_checkpoint` (incremental: only chunks the
mirror lacks; verified; committed there with the protocol, manifest last). The mirror is a run of its
own (run.json, index, retention ``mirror_keep_last``), so ``ckptvault ls`` and ``restore`` work on it.

The promises, and where each is kept:

* **nothing un-mirrored is lost to retention** -- :meth:`Mirror.protected` names the local
  checkpoints newer than the newest one the mirror holds (queued, uploading or failed) and that
  newest one itself; the book's retention never deletes them. With a local-disk budget
  (``local_budget_bytes``) :meth:`Mirror.over_budget` picks the oldest *uploaded* checkpoints to
  delete first; an un-mirrored one is never deleted, not even over budget;
* **failures are loud, and bounded** -- each failed attempt is a warning (and a log line); an upload
  is retried with backoff ``retries`` times; when the mirror is more than ``max_behind`` checkpoints
  behind, :meth:`Mirror.check` raises :class:`~ckptvault.errors.MirrorBehindError` in the training
  loop. Checkpoints left un-mirrored by one process are queued again by the next one on the run;
* **one writer on the mirror** -- the mirror run's lease is held from start to close (renewed
  before every upload), so two runs mirroring to one place fail fast;
* **tiers are visible** -- the tier of each checkpoint (queued, uploading, remote, failed) is written
  to the run's ``.ckptvault-mirror.json`` through the run's storage, where ``ckptvault ls`` (another
  process) reads it: a checkpoint is *local*, *uploading*, *remote* (deleted locally) or *both*;
* **preemption** -- after the preemption checkpoint commits, :meth:`Mirror.preempted` gives the
  uploads ``grace_seconds`` and then names, in a warning, what is left un-uploaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from ..engine.gc import collect_garbage
from ..engine.rundir import RunDirectory, dumps
from ..engine.transfer import CopyReport, copy_checkpoint
from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    MirrorBehindError,
)
from ..policy import CheckpointRecord
from .disk_budget import LocalSizes
from .mirror_config import LeaseRenewer, MirrorOptions, MirrorTarget, ProgressLog, resolve_mirror
from .records import load_records, record_to_json
from .scope import Scope
from .tiers import MIRROR_NAME, tier_entry

PULL_PART_BYTES = 32 << 20  # a mirrored file may be one big object: fewer, larger ranged reads
logger = logging.getLogger("ckptvault")


class Mirror:
    """The uploader of one run (see the module docstring). The loop's thread calls
    :meth:`committed`, :meth:`protected`, :meth:`over_budget`, :meth:`check`, :meth:`pull` and
    :meth:`close`; one worker thread does every upload, remote deletion and remote document write.

    An upload is tried ``RETRIES`` times, waiting ``BACKOFF_SECONDS`` doubled after each failure
    (class attributes: a test shortens them)."""

    RETRIES = 3
    BACKOFF_SECONDS = 1.0

    def __init__(
        self,
        local: RunDirectory,
        target: MirrorTarget,
        options: MirrorOptions,
        records: Mapping[str, CheckpointRecord],
        scopes: Iterable[str],
    ) -> None:
        self.local = local
        self.remote, self.label = resolve_mirror(target)
        self.options = options
        self.sizes = LocalSizes(local)
        self._cond = threading.Condition()
        self._doc_lock = threading.Lock()
        self._lease = self.remote.acquire()  # ConcurrentWriteError (naming the holder) when taken
        try:
            self._remote: dict[str, CheckpointRecord] = load_records(self.remote)
            run = local.read_run() or {}
            keep = dataclasses.asdict(Scope(keep_last=options.keep_last))
            self.remote.write_run({**run, "scopes": dict.fromkeys(scopes, keep), "mirror_of": local.path})
        except BaseException:
            self._lease.release()
            raise
        self._local: dict[str, CheckpointRecord] = dict(records)
        self._local = {r.name: r for r in self._behind()}  # left un-mirrored by an earlier process
        self._queue: deque[CheckpointRecord] = deque(self._local.values())  # oldest first
        self._uploading: str | None = None
        self._active = False  # an upload and the tier record's update after it are under way
        self._failed: dict[str, str] = {}
        self.last_error: str | None = None
        self.last_report: CopyReport | None = None
        self.loop_idle = threading.Event()  # cleared while the loop saves: uploads hold (LeaseRenewer)
        self.loop_idle.set()
        self._preempted = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="ckptvault-mirror", daemon=True)
        self._thread.start()
        self._write_tiers()

    def __repr__(self) -> str:
        return f"Mirror({self.local.path!r} -> {self.label!r})"

    # -- what the mirror holds (any thread; under the lock) ---------------------------------------------
    def uploaded(self, record: CheckpointRecord) -> bool:
        """Whether the mirror holds this very checkpoint (same name and id)."""
        with self._cond:
            held = self._remote.get(record.name)
            return held is not None and _same(held, record)

    def _newest_remote(self) -> dict[str, CheckpointRecord]:
        newest: dict[str, CheckpointRecord] = {}
        for record in self._remote.values():
            if record.scope not in newest or record.newness() > newest[record.scope].newness():
                newest[record.scope] = record
        return newest

    def _behind(self) -> list[CheckpointRecord]:
        """Local checkpoints newer than the newest the mirror holds of their scope, oldest first."""
        newest = self._newest_remote()
        out = []
        for record in self._local.values():
            held = self._remote.get(record.name)
            if held is not None and _same(held, record):
                continue
            top = newest.get(record.scope)
            if top is None or record.newness() > top.newness():
                out.append(record)
        return sorted(out, key=lambda r: r.newness())

    def unuploaded(self) -> list[str]:
        """Names of the committed checkpoints the mirror does not hold yet (oldest first)."""
        with self._cond:
            return [r.name for r in self._behind()]

    def protected(self) -> set[str]:
        """What local retention must not delete now: every un-mirrored checkpoint and, per scope, the
        newest one the mirror holds (the fast local copy of the newest safe point)."""
        with self._cond:
            return {r.name for r in self._behind()} | {r.name for r in self._newest_remote().values()}

    def over_budget(self, records: list[CheckpointRecord], untouchable: set[str]) -> list[str]:
        """Local checkpoints to delete, oldest uploaded first, until the run fits
        ``local_budget_bytes``; never an un-mirrored one, one in ``untouchable`` (pinned,
        registered) or the newest of a scope. Says so when even that is not enough."""
        budget = self.options.local_budget_bytes
        if budget is None:
            return []
        live = list(records)
        total = self.sizes.total(live)
        if total <= budget:
            return []
        newest = {
            max((r for r in live if r.scope == s), key=lambda r: r.newness()).name
            for s in {r.scope for r in live}
        }
        candidates = [r for r in live if r.name not in (untouchable | newest) and self.uploaded(r)]
        victims: list[str] = []
        for record in sorted(candidates, key=lambda r: r.newness()):
            if total <= budget:
                break
            live.remove(record)
            victims.append(record.name)
            total = self.sizes.total(live)
        if total > budget:
            text = (
                f"{self.local.path} holds {total} bytes, over local_budget_bytes={budget}: what is left "
                f"is not on the mirror yet, pinned, registered or the newest checkpoint"
            )
            _warn(text)
        return victims

    def check(self) -> None:
        """Raises MirrorBehindError when more than ``max_behind`` committed checkpoints are not on
        the mirror (called in the training loop after each step's local work)."""
        with self._cond:
            behind = [r.name for r in self._behind()]
            error = self.last_error
        if len(behind) > self.options.max_behind:
            raise MirrorBehindError(
                0,
                f"the mirror {self.label} is {len(behind)} checkpoints behind {self.local.path} (more than "
                f"mirror_max_behind={self.options.max_behind}): {', '.join(behind[:5])}"
                f"{', ...' if len(behind) > 5 else ''} not uploaded; last upload error: {error or 'none'}",
            )

    # -- the loop's side -------------------------------------------------------------------------------
    def committed(self, record: CheckpointRecord) -> None:
        """Queues a checkpoint just committed locally (its name replaces a queued one of that name)."""
        with self._cond:
            self._local[record.name] = record
            self._failed.pop(record.name, None)
            queued = [r for r in self._queue if r.name != record.name]
            self._queue = deque([*queued, record])
            self._cond.notify_all()
        self._write_tiers()

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until nothing is queued or uploading (True), or ``timeout`` seconds passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._active:
                if not self._thread.is_alive():
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.5 if left is None else min(left, 0.5))
            return True

    def preempted(self) -> None:
        """After the preemption checkpoint committed: ``grace_seconds`` for the uploads, then a
        warning naming every checkpoint still not on the mirror (they upload when the run resumes
        here; a run resumed elsewhere restores the newest one the mirror has)."""
        self._preempted = True
        self.flush(self.options.grace_seconds)
        left = self.unuploaded()
        if not left:
            logger.info("preemption: every checkpoint of %s is on the mirror %s", self.local.path, self.label)
            return
        text = (
            f"preemption: {len(left)} checkpoint(s) not uploaded to the mirror {self.label} within "
            f"mirror_grace_seconds={self.options.grace_seconds}: {', '.join(left)} "
            f"(only in {self.local.path})"
        )
        _warn(text)

    def close(self, timeout: float | None = None) -> None:
        """Uploads what is queued (waiting ``timeout`` seconds at most; after a preemption not at
        all: its grace is spent), stops the worker and releases the mirror's lease. The lease goes
        even when an upload is still running after a preemption (the process is about to end, and
        the upload with it, unseen): a job restarted elsewhere must not wait for the lease to lapse."""
        self.flush(0 if self._preempted else timeout)
        left = self.unuploaded()
        if left and not self._preempted:  # (a preemption named them already)
            _warn(
                f"closing with {', '.join(left)} not uploaded to the mirror {self.label} (last error: "
                f"{self.last_error}); the next manager on {self.local.path} uploads them"
            )
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=None if not self._active else 1.0)
        self._lease.release()
        self._write_tiers()

    def pull(self, scope: str, step: int | None = None) -> CheckpointRecord | None:
        """Copies the newest checkpoint of ``scope`` (of ``step``, if given) the mirror holds into the
        local run, verified on the way; one that is damaged (or gone) is skipped with a warning and
        the next older tried. The record of what was pulled, or None when nothing could be."""
        with self._cond:
            candidates = sorted(
                (r for r in self._remote.values() if r.scope == scope and r.valid and step in (None, r.step)),
                key=lambda r: r.newness(),
                reverse=True,
            )
        for record in candidates:
            source = self.remote.checkpoint(record.name)
            try:
                with ProgressLog(f"pulling {record.name} from {self.label}") as progress:
                    report = copy_checkpoint(
                        self.remote.storage,
                        source,
                        self.local.storage,
                        self.local.checkpoint(record.name),
                        overwrite=True,
                        progress=progress,
                        part_bytes=PULL_PART_BYTES,
                    )
            except (CorruptCheckpointError, CheckpointNotFoundError, IncompatibleCheckpointError) as exc:
                # That checkpoint's fault: the next older may do. A failing medium (StorageError)
                # raises instead: restoring an older one, or nothing, would throw work away.
                _warn(f"restore could not pull {record.name} from the mirror {self.label}: {exc}")
                continue
            logger.info(
                "pulled %s from %s: %d bytes (%d chunks already here) in %.1fs",
                record.name,
                self.label,
                report.bytes_copied,
                report.chunks_skipped,
                report.seconds,
            )
            self._write_tiers()
            return record
        return None

    # -- the worker -----------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    return
                record = self._queue.popleft()
                self._uploading = record.name
                self._active = True
            self._write_tiers()
            try:
                self._upload_with_retries(record)
            finally:
                with self._cond:
                    self._uploading = None
                self._write_tiers()
                with self._cond:  # idle only once the tier record says so (flush's callers read it)
                    self._active = False
                    self._cond.notify_all()

    def _upload_with_retries(self, record: CheckpointRecord) -> None:
        for attempt in range(1, self.RETRIES + 1):
            try:
                self._upload(record)
                return
            except CheckpointNotFoundError:
                return  # deleted (or replaced: queued again) before its upload; nothing to send
            except BaseException as exc:  # the worker must outlive any failure: it is reported
                final = attempt == self.RETRIES or isinstance(exc, CorruptCheckpointError)
                text = (
                    f"upload of {record.name} to the mirror {self.label} failed "
                    f"(attempt {attempt}/{self.RETRIES}{'' if final else ', retrying'}): {exc}"
                )
                _warn(text)
                with self._cond:
                    self.last_error = f"{record.name}: {exc}"
                    if final:
                        self._failed[record.name] = str(exc)
                if final or self._stop.wait(self.BACKOFF_SECONDS * 2 ** (attempt - 1)):
                    return

    def _upload(self, record: CheckpointRecord) -> None:
        self._lease.renew()  # lost (expired and taken): another writer owns the mirror now
        report = copy_checkpoint(
            self.local.storage,
            self.local.checkpoint(record.name),
            self.remote.storage,
            self.remote.checkpoint(record.name),
            overwrite=True,
            progress=LeaseRenewer(self._lease, self.loop_idle),
        )
        held = dataclasses.replace(record, checkpoint_id=report.checkpoint_id)
        with self._cond:
            self.last_report = report  # what the last upload sent and skipped (benchmarks, tests)
            self._remote[record.name] = held
            self._failed.pop(record.name, None)
            self._local = {r.name: r for r in self._behind()}
        logger.info(
            "uploaded %s to %s: %d bytes, %d chunks (%d already there) in %.1fs",
            record.name,
            self.label,
            report.bytes_copied,
            report.chunks_copied,
            report.chunks_skipped,
            report.seconds,
        )
        self._remote_retention()
        with self._cond:
            records = sorted(self._remote.values(), key=lambda r: (r.scope, r.step))
        self.remote.write_index({"records": [record_to_json(r) for r in records], "triggers": {}})

    def _remote_retention(self) -> None:
        """``mirror_keep_last`` newest per scope stay on the mirror (and every locally pinned step);
        chunks only the deleted ones used are then collected there."""
        keep = self.options.keep_last
        if keep is None:
            return
        try:
            pins = self.local.read_pins()
        except CheckpointError as exc:
            logger.warning("mirror retention skipped: %s", exc)
            return
        with self._cond:
            victims = []
            for scope in {r.scope for r in self._remote.values()}:
                ordered = sorted(
                    (r for r in self._remote.values() if r.scope == scope), key=lambda r: r.newness()
                )
                victims += [r.name for r in ordered[:-keep] if r.step not in pins]
        for name in victims:
            self.remote.delete_checkpoint(name)
            with self._cond:
                self._remote.pop(name, None)
        if victims:
            collect_garbage(self.remote.path, storage=self.remote.storage)

    # -- the tier record --------------------------------------------------------------------------------
    def tiers(self) -> dict[str, Any]:
        """The tier document ``ckptvault ls`` reads (see :func:`read_tiers`)."""
        with self._cond:
            entries: dict[str, dict[str, Any]] = {}
            for record in self._remote.values():
                entries[record.name] = tier_entry(record, "remote")
            for record in self._local.values():
                entries[record.name] = tier_entry(
                    record, "failed" if record.name in self._failed else "local"
                )
            for record in self._queue:
                entries[record.name] = tier_entry(record, "queued")
            if self._uploading is not None and self._uploading in entries:
                entries[self._uploading]["tier"] = "uploading"
            return {
                "mirror": self.label,
                "updated": time.time(),
                "behind": len(self._behind()),
                "last_error": self.last_error,
                "checkpoints": entries,
            }

    def _write_tiers(self) -> None:
        """Derived, informative data: not flushed, and a failure to write it is only logged."""
        with self._doc_lock:
            doc = self.tiers()
            try:
                self.local.storage.put(self.local.key(MIRROR_NAME), dumps(doc, compact=True), durable=False)
            except OSError as exc:
                logger.warning("could not record mirror tiers in %s: %s", self.local.path, exc)


def _warn(text: str) -> None:
    """A log line and a warning; a warnings filter that turns it into an error must not kill the
    worker thread (the log line is still there)."""
    logger.warning("%s", text)
    with contextlib.suppress(Warning):
        warnings.warn(text, stacklevel=3)


def _same(a: CheckpointRecord, b: CheckpointRecord) -> bool:
    return not a.checkpoint_id or not b.checkpoint_id or a.checkpoint_id == b.checkpoint_id


def open_mirror(
    local: RunDirectory,
    target: MirrorTarget | None,
    options: MirrorOptions,
    records: Mapping[str, CheckpointRecord],
    scopes: Iterable[str],
) -> Mirror | None:
    """The manager's mirror, or None when it has none (``mirror=None``)."""
    return None if target is None else Mirror(local, target, options, records, scopes)
