"""Read-ahead for the object-store backend's read handles.

Why: the engine reads a tensor in windows of about a megabyte (it hashes as it reads, and on local
disk a ``pread`` of that size is as fast as any). On an object store every read is a request with a
round trip of its own -- tens of milliseconds on S3 -- so megabyte windows would cost a request
each, one after another. Here a small read fetches the aligned 8 MiB block around it; once more
than 2 MiB of a file has been read (a scan, not one lazy read), the blocks past the furthest one
read are fetched ahead, up to 64 MiB in one ranged GET, topped up when half of it is consumed.
Reader threads share the blocks. A lazy read of one small tensor costs one 8 MiB request; loading a
whole 64 MiB data file (the backend's file size) costs two. Reads of a block or more bypass the
cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, Future

BLOCK_BYTES = 8 << 20
MAX_AHEAD_BLOCKS = 8  # the read-ahead window grows to 64 MiB
SCAN_BYTES = 2 << 20  # more read from one file than this, and reading ahead pays
KEPT_BLOCKS = 32  # at most 256 MiB of fetched blocks per open checkpoint


class BlockCache:
    """Aligned blocks of one checkpoint's files, fetched ahead and shared by reader threads."""

    def __init__(
        self,
        fetch: Callable[[str, int, int], memoryview],
        pool: Callable[[], Executor],
        *,
        block: int = BLOCK_BYTES,
        max_ahead: int = MAX_AHEAD_BLOCKS,
        kept: int = KEPT_BLOCKS,
    ) -> None:
        self._fetch = fetch
        self._pool = pool
        self.block = block
        self._max_ahead = max_ahead
        self._kept = kept
        self._lock = threading.Lock()
        self._blocks: OrderedDict[tuple[str, int], Future[memoryview]] = OrderedDict()
        self._window: dict[str, tuple[int, int]] = {}  # file -> (furthest block read, bytes read)

    def _usable(self, key: tuple[str, int]) -> bool:
        found = self._blocks.get(key)
        return found is not None and not (found.done() and found.exception() is not None)

    def _fetch_run(self, name: str, size: int, first: int, stop: int) -> None:
        """One ranged GET for blocks ``first..stop-1``, each block's future fed from it (under
        the lock)."""
        futures: list[Future[memoryview]] = []
        for k in range(first, stop):
            future: Future[memoryview] = Future()
            self._blocks[(name, k)] = future
            futures.append(future)
        start, end = first * self.block, min(stop * self.block, size)

        def done(run: Future[memoryview]) -> None:
            error = run.exception()
            for i, future in enumerate(futures):
                if error is not None:
                    future.set_exception(error)
                else:
                    lo = i * self.block
                    future.set_result(run.result()[lo : lo + self.block])

        self._pool().submit(self._fetch, name, start, end - start).add_done_callback(done)

    def _want(self, name: str, size: int, first: int, stop: int) -> None:
        """Starts fetching every block of ``first..stop-1`` not cached or on its way (under the lock)."""
        k = first
        while k < stop:
            if self._usable((name, k)):
                self._blocks.move_to_end((name, k))
                k += 1
                continue
            j = k + 1
            while j < stop and not self._usable((name, j)):
                j += 1
            self._fetch_run(name, size, k, j)
            k = j

    def read_into(self, name: str, size: int, offset: int, view: memoryview) -> None:
        """Fills ``view`` with bytes ``offset..offset+len(view)`` of ``name`` (``size`` bytes long);
        the caller has checked the range lies inside the file."""
        end = offset + len(view)
        first, last = offset // self.block, (end - 1) // self.block
        blocks = -(-size // self.block)
        with self._lock:
            frontier, read = self._window.get(name, (-1, 0))
            frontier, read = max(frontier, last), read + len(view)
            self._window[name] = (frontier, read)
            self._want(name, size, first, last + 1)
            if read > SCAN_BYTES:  # a scan, not one lazy read: keep a window in flight ahead of it
                ready = 0
                while frontier + 1 + ready < blocks and self._usable((name, frontier + 1 + ready)):
                    ready += 1
                if ready < max(1, self._max_ahead // 2):  # top it up in one large request
                    self._want(name, size, frontier + 1 + ready, min(frontier + 1 + self._max_ahead, blocks))
            wanted = [self._blocks[(name, k)] for k in range(first, last + 1)]
            while len(self._blocks) > self._kept:
                self._blocks.popitem(last=False)  # a reader still holding it keeps its bytes
        pos = 0
        for k, future in zip(range(first, last + 1), wanted, strict=True):
            data = future.result()
            lo = max(offset, k * self.block) - k * self.block
            hi = min(end, (k + 1) * self.block) - k * self.block
            view[pos : pos + hi - lo] = data[lo:hi]
            pos += hi - lo

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._window.clear()
