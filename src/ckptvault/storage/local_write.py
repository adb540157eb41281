"""Local-disk checkpoint transactions: one atomic, durable commit point (DESIGN.md invariant 1).

A save writes into a hidden staging directory next to the target, fsyncs every file, writes
``manifest.json`` last, fsyncs it and the staging directory, renames the staging directory onto the
target and fsyncs the parent. The rename is the commit: readers see the old checkpoint or the new
one, never a mixture.

* Two writers of one target: ``rename(2)`` onto a non-empty directory fails, so the second gets
  :class:`CheckpointExistsError` and its staging area is removed; neither corrupts the other.
* Overwrite swaps old and new with ``renameat2(RENAME_EXCHANGE)`` (one atomic step), then deletes
  the old one under the staging name, where no reader looks.
* A killed writer leaves only a staging directory, swept by the next save (``local_common``).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from contextlib import suppress
from pathlib import Path

from ..config import MANIFEST_NAME, Settings
from ..errors import CheckpointExistsError, ConcurrentWriteError, StorageError
from .local_common import (
    HOST_TAG,
    STAGING_MARK,
    exchange_paths,
    is_committed,
    storage_error,
    sweep_staging,
)
from .pools import shared_pool
from .safeopen import fsync_dir, unlock_close

_LOCK_WAIT_SECONDS = 2.0


class LocalWritableFile:
    """A file in a staging directory; ``close`` fsyncs it so it is durable before the commit."""

    def __init__(self, path: Path, *, dir_fd: int | None = None) -> None:
        """``dir_fd``: create ``path.name`` in that directory (a participant's pinned staging
        directory) instead of opening ``path`` through its parents."""
        self._path = path
        # close (on a pool thread) and discard (an abort) may race: exactly one of them closes the
        # descriptor, or a reused number would be closed under someone else.
        self._lock = threading.Lock()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            if dir_fd is None:
                self._fd = os.open(path, flags, 0o644)
            else:
                self._fd = os.open(path.name, flags | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
        except OSError as exc:
            raise storage_error("cannot create", path, exc) from exc

    def write(self, data: memoryview | bytes, /) -> None:
        view = memoryview(data).cast("B")
        try:
            while view:
                written = os.write(self._fd, view[: 1 << 30])
                view = view[written:]
        except OSError as exc:
            raise storage_error("cannot write", self._path, exc) from exc

    def close(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            fd, self._fd = self._fd, -1
            try:
                os.fsync(fd)  # a failed fsync is fatal: the data may be lost, never report success
            except OSError as exc:
                raise storage_error("cannot fsync", self._path, exc) from exc
            finally:
                os.close(fd)

    def discard(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
            if fd >= 0:
                os.close(fd)
            self._fd = -1


_DIRECT_ALIGN = 4096
_DIRECT_BUFFER = 8 * 1024 * 1024  # two of them: 16 MiB of staging per file being written


class DirectWritableFile:
    """A staging-directory file written with ``O_DIRECT`` through two aligned bounce buffers.

    Measured on the CI machine (benchmarks/write_paths.py): buffered writes of 1 GiB cost the VM
    seconds of kernel CPU in the page cache, O_DIRECT writes from aligned memory reach 1.2-1.5x
    the buffered throughput and leave the CPU to hashing. The caller's bytes are copied into one
    buffer while the other is written by a helper thread. The tail is padded to the alignment and
    the file truncated to its true length before the fsync.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self._path = path
        self._fd = fd
        self._buffers = [mmap.mmap(-1, _DIRECT_BUFFER) for _ in range(2)]
        self._current = 0
        self._fill = 0
        self._size = 0
        self._pool = shared_pool("direct")  # one write in flight per file, so order is kept
        self._pending: Future[None] | None = None
        self._lock = threading.Lock()  # close and discard (an abort) may race: one of them runs

    def _flush(self, length: int) -> None:
        """Hands the current buffer's first ``length`` bytes (aligned) to the writer thread."""
        if self._pending is not None:
            self._pending.result()
        view = memoryview(self._buffers[self._current])[:length]
        self._pending = self._pool.submit(self._write_all, view)
        self._current ^= 1
        self._fill = 0

    def _write_all(self, view: memoryview) -> None:
        offset = 0
        while offset < len(view):
            offset += os.write(self._fd, view[offset:])

    def write(self, data: memoryview | bytes, /) -> None:
        view = memoryview(data).cast("B")
        try:
            while view:
                take = min(len(view), _DIRECT_BUFFER - self._fill)
                buffer = self._buffers[self._current]
                buffer[self._fill : self._fill + take] = view[:take]
                self._fill += take
                self._size += take
                view = view[take:]
                if self._fill == _DIRECT_BUFFER:
                    self._flush(_DIRECT_BUFFER)
        except OSError as exc:
            raise storage_error("cannot write", self._path, exc) from exc

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._fd < 0:
            return
        fd = self._fd
        try:
            tail = self._fill
            if tail:
                padded = -(-tail // _DIRECT_ALIGN) * _DIRECT_ALIGN
                self._buffers[self._current][tail:padded] = bytes(padded - tail)
                self._flush(padded)
            if self._pending is not None:
                self._pending.result()
            os.ftruncate(fd, self._size)
            os.fsync(fd)  # a failed fsync is fatal: the data may be lost, never report success
        except OSError as exc:
            raise storage_error("cannot write or fsync", self._path, exc) from exc
        finally:
            self._fd = -1
            os.close(fd)
            self._release()

    def _release(self) -> None:
        if self._pending is not None:  # a write still using a buffer and the descriptor
            wait_futures([self._pending])
            self._pending = None
        for buffer in self._buffers:
            # A failed write's traceback may still hold a view of the buffer: then the map is
            # freed when that view goes, not now.
            with suppress(BufferError):
                buffer.close()

    def discard(self) -> None:
        with self._lock:
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                self._release()
                os.close(fd)


def open_writable(
    path: Path, *, direct: bool, dir_fd: int | None = None
) -> LocalWritableFile | DirectWritableFile:
    """A new file for a staging directory: ``O_DIRECT`` where asked and supported, else buffered.
    With ``dir_fd`` the file is ``path.name`` in that directory (never through a link)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    if direct and hasattr(os, "O_DIRECT"):
        try:
            if dir_fd is None:
                fd = os.open(path, flags | os.O_DIRECT, 0o644)
            else:
                fd = os.open(path.name, flags | os.O_DIRECT | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this filesystem has no O_DIRECT (tmpfs)
                raise storage_error("cannot create", path, exc) from exc
        else:
            return DirectWritableFile(path, fd)
    return LocalWritableFile(path, dir_fd=dir_fd)


class LocalWriteTransaction:
    def __init__(self, target: Path, *, overwrite: bool, settings: Settings | None = None) -> None:
        self.target = target
        self.overwrite = overwrite
        settings = settings or Settings()
        self.direct_io, self.direct_io_min_bytes = settings.direct_io, settings.direct_io_min_bytes
        parent = target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error("cannot create directory", parent, exc) from exc
        self._check_target()
        sweep_staging(parent)
        name = f".{target.name}{STAGING_MARK}{HOST_TAG}.{os.getpid()}.{secrets.token_hex(4)}"
        self.staging = parent / name
        #: What participants (other ranks) join by: the staging directory's name (local_join).
        self.token = name
        try:
            os.mkdir(self.staging, 0o755)
            self._lock_fd = os.open(self.staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise storage_error("cannot create staging directory in", parent, exc) from exc
        self._lock_staging()
        self._files: list[LocalWritableFile | DirectWritableFile] = []
        self._done = False

    def _lock_staging(self) -> None:
        """Locks our staging directory, waiting briefly: a sweeper in another save may hold the lock
        for a moment while it decides to leave a young, live writer's directory alone."""
        deadline = time.monotonic() + _LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    unlock_close(self._lock_fd)
                    shutil.rmtree(self.staging, ignore_errors=True)
                    raise ConcurrentWriteError(
                        errno.EWOULDBLOCK, f"{self.staging}: staging directory locked by another process"
                    ) from None
                time.sleep(0.005)

    def _check_target(self) -> None:
        target = self.target
        if target.is_symlink():
            raise CheckpointExistsError(f"{target} is a symlink; refusing to write through it")
        if not target.exists():
            return
        if not target.is_dir():
            raise CheckpointExistsError(f"{target} exists and is not a directory")
        if is_committed(target):
            if not self.overwrite:
                raise CheckpointExistsError(
                    f"{target} is already a checkpoint; pass overwrite=True to replace it"
                )
        elif any(target.iterdir()):
            raise CheckpointExistsError(
                f"{target} is a non-empty directory that is not a checkpoint; not touching it"
            )

    def create(self, name: str, *, size_hint: int = 0) -> LocalWritableFile | DirectWritableFile:
        direct = self.direct_io and size_hint >= self.direct_io_min_bytes
        handle = open_writable(self.staging / name, direct=direct)
        self._files.append(handle)
        return handle

    def commit(self, manifest: bytes, *, wait_files: Callable[[], None] | None = None) -> None:
        if self._done:
            raise StorageError(0, "transaction already finished")
        out = self.create(MANIFEST_NAME)
        published = False
        try:
            out.write(manifest)
            # The manifest's fsync, the staging directory's and the caller's files' (``wait_files``)
            # run side by side: nothing is visible before the rename, so their order does not
            # matter, only that all are done before it. One journal commit instead of three.
            closing = shared_pool("sync").submit(out.close)
            try:
                os.fsync(self._lock_fd)  # the staging directory's entries are durable
            finally:
                wait_futures([closing])
            closing.result()
            if wait_files is not None:
                wait_files()
            old = self._publish()
            published = True
            fsync_dir(self.target.parent)
        except BaseException as exc:
            if published:  # the rename is not known durable: a failed save must leave no checkpoint
                self._unpublish(old)
            if wait_files is not None:  # never remove files a pool thread is still closing
                with suppress(BaseException):
                    wait_files()
            self.abort()
            if not isinstance(exc, OSError) or isinstance(exc, StorageError):
                raise
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise CheckpointExistsError(
                    f"{self.target} was committed by another writer while this save ran"
                ) from exc
            raise storage_error("cannot commit", self.target, exc) from exc
        self._done = True
        unlock_close(self._lock_fd)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # the replaced checkpoint, under a hidden name

    def _publish(self) -> Path | None:
        """Renames the staging directory onto the target; returns where a replaced checkpoint now
        lies (hidden; deleted once the commit is durable), None when nothing was replaced."""
        target = self.target
        if self.overwrite and target.exists():
            self._check_target()  # re-check right before the swap: never replace a foreign directory
            if exchange_paths(self.staging, target):
                return self.staging  # the old checkpoint, now under our name
            trash = (
                target.parent
                / f".{target.name}{STAGING_MARK}{HOST_TAG}.{os.getpid()}.old{secrets.token_hex(4)}"
            )
            os.rename(target, trash)  # fallback without renameat2: a moment with no checkpoint, never a mix
            try:
                os.rename(self.staging, target)
            except OSError:
                with suppress(OSError):
                    os.rename(trash, target)  # the old checkpoint back where it was
                raise
            return trash
        os.rename(self.staging, target)
        return None

    def _unpublish(self, old: Path | None) -> None:
        """Undoes :meth:`_publish` (best effort) after the parent directory's fsync failed: the old
        checkpoint, if any, returns to the target and ours to the staging name that abort removes.
        Only while the target is still the directory we published (our lock fd names it)."""
        with suppress(OSError):
            now, ours = os.stat(self.target), os.fstat(self._lock_fd)
            if (now.st_dev, now.st_ino) != (ours.st_dev, ours.st_ino):
                return
            if old == self.staging:
                exchange_paths(self.staging, self.target)
            else:
                os.rename(self.target, self.staging)
                if old is not None:
                    os.rename(old, self.target)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        for handle in self._files:
            handle.discard()
        shutil.rmtree(self.staging, ignore_errors=True)
        unlock_close(self._lock_fd)
