"""The one save pipeline (:class:`SaveRequest`), background commits, and the handle a caller waits on.

Every save -- ``ckptvault.save``, ``ckptvault.save_async``, the manager's synchronous and
asynchronous saves -- is a :class:`SaveRequest` (where: storage and target; how: metadata,
overwrite, digest, chunking, hints, extra files, a check after the commit) run through the same two
steps: :meth:`SaveRequest.plan` encodes the state, :meth:`SaveRequest.commit` writes and commits it.
A synchronous save runs both now (:meth:`SaveRequest.run`); an asynchronous one plans and stages
now and commits in a :class:`BackgroundWriter`'s thread (:meth:`BackgroundWriter.submit_save`), so
both kinds take the same options and produce the same checkpoint.

One worker thread per :class:`BackgroundWriter`, so saves commit one after another in submission
order. By default one save is in flight per writer: a new save first waits for the previous one
(back-pressure instead of unbounded staging memory); a writer built with ``queue_bytes`` lets small
saves queue behind it in memory of their own (see the class). A failure in the background is kept by
its :class:`PendingSave` and re-raised by ``wait()``.

A failure is never lost: until someone has seen it (``wait()`` raised it, or ``exception()``
returned it), the writer's next ``submit``/``submit_save`` raises it instead of starting the next
save, and :meth:`BackgroundWriter.raise_unobserved` raises a finished one for a caller that saves by
other means (``cv.save``).
At interpreter exit every writer finishes its pending save (it commits or is cleanly aborted by the
storage transaction: never half-committed), and a failure still unseen then is printed on stderr.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..config import Settings
from ..storage.base import Storage
from ..types import CheckpointInfo
from .checkpoint_info import info_from_manifest
from .chunks import ChunkOptions, HintCache
from .feed import FeedAborted
from .staging import StagingBuffer, feed_plan, fits, stage_plan, staged_bytes
from .writer import SavePlan, commit_plan, plan_save


@dataclass(frozen=True)
class SaveRequest:
    """One save: where it goes and how, whichever way it runs (the library's one save pipeline).

    The caller names the place in the backend's terms (``api`` resolves paths and registry
    references, the manager passes its run's storage). ``after_commit`` runs on the committed
    target before the save counts as done (``api``'s validation: a failure is the save's failure,
    raised by ``save`` or by the pending save's ``wait``).
    """

    storage: Storage
    target: str
    metadata: dict[str, Any] | None = None
    overwrite: bool = False
    digest: str | None = None
    chunking: ChunkOptions | None = None
    hints: HintCache | None = None
    extra_files: dict[str, bytes] | None = None
    after_commit: Callable[[str], None] | None = None

    def settings(self) -> Settings:
        """The environment's settings, read once per save (never in the middle of one)."""
        settings = Settings.from_env()
        return settings if self.digest is None else dataclasses.replace(settings, digest=self.digest)

    def plan(self, state: object, settings: Settings) -> SavePlan:
        """Encodes ``state`` and decides where every blob goes (the caller's thread: it reads the state)."""
        return plan_save(
            self.target,
            state,
            self.metadata,
            settings,
            chunking=self.chunking,
            hints=self.hints,
            extra_files=self.extra_files,
            storage=self.storage,
        )

    def commit(self, plan: SavePlan, settings: Settings) -> CheckpointInfo:
        """Writes, hashes, fsyncs and commits a planned save; nothing is visible unless it returns."""
        manifest = commit_plan(self.storage, self.target, plan, overwrite=self.overwrite, settings=settings)
        info = info_from_manifest(self.target, manifest, plan.metadata)
        if self.after_commit is not None:
            self.after_commit(self.target)
        return info

    def run(self, state: object) -> CheckpointInfo:
        """The synchronous save: durable when it returns, nothing committed when it raises."""
        settings = self.settings()
        return self.commit(self.plan(state, settings), settings)


class PendingSave:
    """A save whose bytes are staged and being committed in the background."""

    def __init__(self, future: Future[Any], path: str) -> None:
        self._future = future
        self.path = path
        self._observed = False  # whether a caller has been given the outcome (success or failure)

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> CheckpointInfo:
        """The committed checkpoint's info; re-raises the background failure, if any."""
        try:
            info: CheckpointInfo = self._future.result(timeout)
        except BaseException:
            if self._future.done():  # the save's own failure (not a timeout of this wait): seen now
                self._observed = True
            raise
        self._observed = True
        return info

    def exception(self) -> BaseException | None:
        """The background failure once done (None while running or after success). A failure
        returned here counts as seen: it is not raised again by the next save."""
        if not self._future.done():
            return None
        self._observed = True
        return self._future.exception()

    @property
    def future(self) -> Future[Any]:
        return self._future

    def failed(self) -> bool:
        """Finished with a failure (seen or not); does not count as seeing it."""
        return self._future.done() and self._future.exception() is not None

    def unobserved_failure(self) -> BaseException | None:
        """The failure of this finished save if no caller has seen it yet (blocks until done)."""
        error = self._future.exception()
        return None if self._observed else error

    def mark_observed(self) -> None:
        self._observed = True


_WRITERS: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()
_WRITERS_LOCK = threading.Lock()


class BackgroundWriter:
    """One worker thread that commits staged saves (and other jobs) in submission order.

    By default one save is in flight: the next waits for it, and every save is staged in the
    caller's reused :class:`StagingBuffer`. With ``queue_bytes``, a save whose staged bytes are at
    most that is instead staged into fresh memory of its own and queued behind the jobs in flight
    (up to ``max_in_flight`` unfinished jobs), so a caller writing small checkpoints back to back
    (Lightning's top-k file and then ``last.ckpt`` at the same step) does not wait for the first
    commit's fsyncs; allocating a few MiB is cheap, which is not true of the large states the reused
    buffer is for. Queued jobs run in order, so two saves to one target commit in the order given.
    """

    def __init__(self, *, queue_bytes: int = 0, max_in_flight: int = 1) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptvault-async")
        self.queue_bytes = queue_bytes
        self.max_in_flight = max_in_flight
        self._jobs: deque[PendingSave] = deque()  # submitted, oldest first; pruned when seen
        with _WRITERS_LOCK:
            _WRITERS.add(self)

    @property
    def pending(self) -> PendingSave | None:
        """The newest job submitted and not yet pruned (None when idle and nothing is unseen)."""
        return self._jobs[-1] if self._jobs else None

    def jobs(self) -> list[PendingSave]:
        return list(self._jobs)

    def wait_idle(self) -> None:
        """Blocks until every job finished; raises the oldest failure nobody saw, if any.

        Raised once: the failure is then marked seen, so the caller's retry proceeds."""
        self._raise_first_unseen(block=True)

    def raise_unobserved(self) -> None:
        """Raises the failure of a *finished* job nobody saw (once); never waits for one in flight."""
        self._raise_first_unseen(block=False)

    def _raise_first_unseen(self, *, block: bool) -> None:
        if block:  # every job finishes before a failure is raised: nothing runs on behind the caller
            futures.wait([job.future for job in self._jobs])
        try:
            for job in list(self._jobs):
                if not block and not job.done():
                    break
                error = job.unobserved_failure()
                if error is not None:
                    job.mark_observed()
                    raise error
        finally:
            self._prune()

    def _prune(self) -> None:
        """Forgets the finished jobs at the front whose outcome needs no one's attention."""
        while self._jobs and self._jobs[0].done() and self._jobs[0].unobserved_failure() is None:
            self._jobs.popleft()

    def _in_flight(self) -> int:
        return sum(1 for job in self._jobs if not job.done())

    def _enqueue(self, path: str, job: Callable[[], Any]) -> PendingSave:
        pending = PendingSave(self._pool.submit(job), path)
        self._jobs.append(pending)
        return pending

    def submit(self, path: str, job: Callable[[], Any]) -> PendingSave:
        """Runs ``job`` after the jobs in flight; waits first when ``max_in_flight`` are unfinished.
        A job that holds no staging memory (a removal) is never refused for its size."""
        self.raise_unobserved()
        if self._in_flight() >= self.max_in_flight:
            self.wait_idle()
        return self._enqueue(path, job)

    def submit_save(self, request: SaveRequest, state: object, staging: StagingBuffer) -> PendingSave:
        """Plans and stages ``state`` now (the caller's only wait) and commits ``request`` in the
        background; the same request :meth:`SaveRequest.run` would save synchronously."""
        self.raise_unobserved()
        settings = request.settings()
        plan = request.plan(state, settings)
        if (
            self._in_flight()
            and self._in_flight() < self.max_in_flight
            and staged_bytes(plan) <= self.queue_bytes
            and fits(plan, staging)
        ):
            staged = stage_plan(plan, StagingBuffer())  # its own memory: the reused buffer is busy
            return self._enqueue(request.target, lambda: request.commit(staged, settings))
        self.wait_idle()  # the staging buffer is free again only after the previous commit
        staged = stage_plan(plan, staging) if fits(plan, staging) else feed_plan(plan, staging)
        pending = self._enqueue(request.target, lambda: request.commit(staged, settings))
        if staged.feed is not None:
            try:
                staged.feed.produce()  # the loop waits here until the last piece is staged
            except FeedAborted:
                pending.wait()  # the background failure, raised here where the loop can see it
                raise
        return pending

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


def _finish_pending_saves() -> None:
    """At exit: lets every pending save finish, and reports on stderr each failure nobody saw
    (raising from an exit hook would only print a traceback of this hook, not the save's)."""
    with _WRITERS_LOCK:
        writers = list(_WRITERS)
    for writer in writers:
        for job in writer.jobs():
            try:
                error = job.unobserved_failure()
            except BaseException as exc:  # reported, never raised from an exit hook
                error = exc
            if error is not None:
                job.mark_observed()
                _report_lost_failure(job.path, error)


def _report_lost_failure(path: str, error: BaseException) -> None:
    with contextlib.suppress(Exception):
        print(
            f"ckptvault: the asynchronous save to {path} FAILED and nobody waited for it: "
            f"{type(error).__name__}: {error} (that checkpoint was not committed)",
            file=sys.stderr,
            flush=True,
        )


# The commit of a pending save starts thread pools (hashing, fsync). concurrent.futures refuses new
# work once its own exit hook has run, and that hook runs before ordinary atexit handlers. Hooks
# registered with threading's exit registry run in reverse order, so this one (registered after
# concurrent.futures.thread was imported above) finishes pending saves while pools still work.
_register = getattr(threading, "_register_atexit", None)
if callable(_register):
    _register(_finish_pending_saves)
else:  # pragma: no cover - other interpreters
    atexit.register(_finish_pending_saves)
