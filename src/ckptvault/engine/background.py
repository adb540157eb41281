"""Background commits for asynchronous saves, and the handle a caller waits on.

One worker thread per :class:`BackgroundWriter`, so at most one save is in flight per writer: a
new save first waits for the previous one (back-pressure instead of unbounded staging memory). A
failure in the background is kept by its :class:`PendingSave` and re-raised by ``wait()``. At
interpreter exit every writer finishes its pending save (it commits or is cleanly aborted by the
storage transaction: never half-committed).
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from ..config import Settings
from ..types import CheckpointInfo
from .chunks import ChunkOptions, HintCache
from .feed import FeedAborted
from .staging import StagingBuffer, feed_plan, fits, stage_plan
from .writer import commit_plan, plan_save


class PendingSave:
    """A save whose bytes are staged and being committed in the background."""

    def __init__(self, future: Future[CheckpointInfo], path: str) -> None:
        self._future = future
        self.path = path

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> CheckpointInfo:
        """The committed checkpoint's info; re-raises the background failure, if any."""
        return self._future.result(timeout)

    def exception(self) -> BaseException | None:
        """The background failure once done (None while running or after success)."""
        return self._future.exception() if self._future.done() else None


_WRITERS: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()
_WRITERS_LOCK = threading.Lock()


class BackgroundWriter:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptvault-async")
        self.pending: PendingSave | None = None
        with _WRITERS_LOCK:
            _WRITERS.add(self)

    def wait_idle(self) -> None:
        """Blocks until the pending save (if any) finished; does not raise its failure."""
        if self.pending is not None:
            self.pending._future.exception()

    def submit(self, path: str, job: Callable[[], CheckpointInfo]) -> PendingSave:
        self.wait_idle()
        self.pending = PendingSave(self._pool.submit(job), path)
        return self.pending

    def submit_save(
        self,
        path: object,
        state: object,
        metadata: dict[str, object] | None,
        staging: StagingBuffer,
        *,
        overwrite: bool = True,
        chunking: ChunkOptions | None = None,
        hints: HintCache | None = None,
        extra_files: dict[str, bytes] | None = None,
    ) -> PendingSave:
        """Plans and stages ``state`` now (the caller's only wait) and commits it in the background."""
        from .. import api

        self.wait_idle()  # the staging buffer is free again only after the previous commit
        storage, target = api.storage_for(path)  # type: ignore[arg-type]
        settings = Settings.from_env()
        plan = plan_save(
            target, state, metadata, settings, chunking=chunking, hints=hints, extra_files=extra_files
        )
        staged = stage_plan(plan, staging) if fits(plan, staging) else feed_plan(plan, staging)

        def commit() -> CheckpointInfo:
            manifest = commit_plan(storage, target, staged, overwrite=overwrite, settings=settings)
            return api.info_from_manifest(target, manifest, staged.metadata)

        pending = self.submit(target, commit)
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
    with _WRITERS_LOCK:
        writers = list(_WRITERS)
    for writer in writers:
        writer.wait_idle()


# The commit of a pending save starts thread pools (hashing, fsync). concurrent.futures refuses new
# work once its own exit hook has run, and that hook runs before ordinary atexit handlers. Hooks
# registered with threading's exit registry run in reverse order, so this one (registered after
# concurrent.futures.thread was imported above) finishes pending saves while pools still work.
_register = getattr(threading, "_register_atexit", None)
if callable(_register):
    _register(_finish_pending_saves)
else:  # pragma: no cover - other interpreters
    atexit.register(_finish_pending_saves)
