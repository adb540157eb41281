"""Long-lived worker threads for the save path, started once per process instead of once per save.

Starting a thread costs ~0.1 ms and on a loaded two-core machine far more (the new thread must be
scheduled before ``start`` returns); a tiny save used to start up to five (one hash thread, one per
fsync). The pools here are created on first use and kept. Their work items never submit to the
same pool and wait, so sharing them between concurrent saves (an async save in the background and a
synchronous one in the foreground) only queues, never deadlocks.

A forked child inherits the pool objects but not their threads: work submitted there would wait
forever, so the pools are forgotten in the child (``os.register_at_fork``) and made afresh.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..config import Settings

_pools: dict[str, ThreadPoolExecutor] = {}
_lock = threading.Lock()

# Workers per pool: hashing overlaps the writes of one file at a time per save; fsyncs of the files
# of one save run side by side (the kernel batches them into one journal commit); an O_DIRECT file
# has one write in flight at a time. A close on the "sync" pool may wait for a "direct" write, never
# the other way round.
# ``CKPTVAULT_IO_THREADS=1`` makes every pool one thread: the I/O of a save then runs in submission
# order on one thread, which the strace tests need (they count fsyncs per thread).
SIZES = {"hash": 2, "sync": 6, "direct": 4}


def shared_pool(kind: str) -> ThreadPoolExecutor:
    """The process's pool for ``kind`` (a key of :data:`SIZES`), created on first use."""
    pool = _pools.get(kind)
    if pool is None:
        with _lock:
            pool = _pools.get(kind)
            if pool is None:
                size = 1 if Settings.from_env().io_threads == 1 else SIZES[kind]
                pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix=f"ckptvault-{kind}")
                _pools[kind] = pool
    return pool


def wait_all(futures: Iterable[Future[Any]]) -> None:
    """Waits for every future, then raises the first failure: a caller that aborts after an error
    must know no work item is still using its files or buffers."""
    first: BaseException | None = None
    for future in futures:
        try:
            future.result()
        except BaseException as exc:
            if first is None:
                first = exc
    if first is not None:
        raise first


def _forget_after_fork() -> None:
    global _lock
    _pools.clear()
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
