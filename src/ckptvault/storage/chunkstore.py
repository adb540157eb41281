"""The run's content-addressed chunk store: what incremental and compressed checkpoints reference.

Layout, beside the checkpoints of a run (docs/format.md §11)::

    RUN/.ckptvault-store/
      lock                              flock: shared by writers, exclusive by garbage collection
      chunks/ab/ab12…ef.raw             one file per chunk, named by the digest of its raw bytes
      chunks/ab/ab12…ef.zstd            and the codec its bytes are stored with

Chunk files are immutable. A writer puts a chunk by writing a private temporary file in the chunk's
directory, fsyncing it and renaming it onto its final name; a chunk that is already there (same
digest, any codec) is referenced instead of written again. Before the checkpoint's manifest is
committed the writer fsyncs every directory it added a name to, so a committed manifest never
references a chunk that a crash can take away.

Garbage collection (:mod:`ckptvault.engine.gc`, through the protocol) takes the lock exclusively
and calls :meth:`ChunkStore.sweep` with every digest the run's committed manifests name.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ..errors import CorruptCheckpointError, UnsafeCheckpointError
from .badlist import BadList
from .base import SweepReport
from .chunkfiles import DIRECT_MIN, frame_size, write_direct
from .local_common import storage_error as _error
from .safeopen import UnsafeFileError, fsync_dir, open_dir, open_file, unlock_close

STORE_NAME = ".ckptvault-store"
CODECS = ("raw", "zstd", "lz4")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX64_ANYWHERE = re.compile(rb"[0-9a-f]{64}")
_TMP_PREFIX = ".tmp-"


def store_for(checkpoint: str | Path) -> Path:
    """The store a checkpoint's chunks live in: ``.ckptvault-store`` beside the checkpoint."""
    return Path(checkpoint).parent / STORE_NAME


class ChunkStore:
    """One run's chunk store on local disk. Thread-safe: a save puts chunks from a thread pool.

    The store's parent (the run directory) is taken as named; the store, ``chunks`` and every shard
    directory must be real directories -- a symlink among them raises
    :class:`~ckptvault.storage.safeopen.UnsafeFileError` before anything is read, written or
    deleted through it (a run directory is untrusted input, docs/security.md).

    Chunks that a reader found bad are listed by :meth:`report_bad` (:mod:`.badlist`); :meth:`find`
    and :meth:`has` treat a listed file as absent, so the next save writes a fresh copy instead of
    referencing the bad one again.
    """

    def __init__(self, root: str | Path, *, direct_io: bool = True) -> None:
        self.root = Path(root)
        self.chunks = self.root / "chunks"
        self._dirty: set[Path] = set()
        self._dirty_lock = threading.Lock()
        self._real: set[Path] = set()  # directories checked to be real (not symlinks) in this store
        self.bad = BadList(self.root)
        self.direct_io = direct_io

    @classmethod
    def for_checkpoint(cls, checkpoint: str | Path, *, direct_io: bool = True) -> ChunkStore:
        return cls(store_for(checkpoint), direct_io=direct_io)

    def exists(self) -> bool:
        return self._real_dir(self.root, create=False)  # a symlinked store raises UnsafeFileError

    # -- names --------------------------------------------------------------------------------
    def path(self, digest: str, codec: str) -> Path:
        # Both parts come from a parsed manifest or our own hashing; checked again because a path
        # built from them is opened, and nothing may leave the store.
        if not _HEX64.match(digest) or codec not in CODECS:
            raise UnsafeCheckpointError(f"unsafe chunk reference {digest[:70]!r}.{codec[:10]!r}")
        return self.chunks / digest[:2] / f"{digest}.{codec}"

    def find(self, digest: str, raw_len: int) -> tuple[str, int] | None:
        """An existing chunk file of this content that looks whole, as ``(codec, stored size)``.

        A raw chunk must have exactly ``raw_len`` bytes; a frame's header and plane table must add
        up to its file size. A file that fails (truncated by a crash of the medium, or damaged) is
        not reused: the writer writes a fresh copy over it. Content is not re-hashed here; that is
        what ``verify`` is for.
        """
        for codec in CODECS:
            path = self.path(digest, codec)
            if not self._real_dir(path.parent, create=False):
                return None
            try:
                st = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _error("checking chunk", path, exc) from exc
            if not stat.S_ISREG(st.st_mode) or self._is_bad(path.name, st):
                continue
            if codec == "raw" and st.st_size == raw_len:
                return codec, st.st_size
            if codec != "raw" and 0 < st.st_size <= raw_len and frame_size(path, raw_len) == st.st_size:
                return codec, st.st_size
        return None

    def has(self, digest: str, codec: str, stored_len: int) -> bool:
        path = self.path(digest, codec)
        if not self._real_dir(path.parent, create=False):
            return False
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == stored_len and not self._is_bad(path.name, st)

    # -- chunks found bad ---------------------------------------------------------------------
    def _is_bad(self, name: str, st: os.stat_result) -> bool:
        return self.bad.contains(name, st)

    def report_bad(self, digest: str, codec: str) -> None:
        """Records that the chunk file now under this name holds bytes that do not match its
        digest, so no later save references it again (see :mod:`.badlist`)."""
        path = self.path(digest, codec)
        with suppress(OSError):
            if self._real_dir(path.parent, create=False):
                self.bad.add(path)

    # -- writing ------------------------------------------------------------------------------
    def _real_dir(self, directory: Path, *, create: bool) -> bool:
        """Checks that ``directory`` (the store or one below it) and every directory between it
        and the run directory is a real directory, never a symlink (UnsafeFileError); creates
        missing ones when ``create`` (remembering which parents to fsync), else returns False."""
        if directory in self._real:
            return True
        probe = base = self.root.parent
        if create and base not in self._real:
            self._make_run_dir(base)
        for part in directory.relative_to(base).parts:
            child = probe / part
            if child not in self._real:
                try:
                    os.close(open_dir(probe, part))
                except FileNotFoundError:
                    if not create:
                        return False
                    try:
                        os.mkdir(child, 0o755)
                    except FileExistsError:
                        pass
                    except OSError as exc:
                        raise _error("creating", child, exc) from exc
                    with self._dirty_lock:
                        self._dirty.add(probe)
                    os.close(open_dir(probe, part))
                with self._dirty_lock:
                    self._real.add(child)
            probe = child
        return True

    def _make_run_dir(self, base: Path) -> None:
        """Creates the run directory (the caller's path, followed) and missing parents."""
        missing = []
        probe = base
        while not probe.is_dir():
            missing.append(probe)
            probe = probe.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                pass
            except OSError as exc:
                raise _error("creating", path, exc) from exc
            with self._dirty_lock:
                self._dirty.add(path.parent)
        with self._dirty_lock:
            self._real.add(base)

    def _ensure_dir(self, directory: Path) -> None:
        self._real_dir(directory, create=True)

    def put(self, digest: str, codec: str, data: memoryview | bytes) -> int:
        """Stores one chunk durably under its final name; returns its stored size."""
        final = self.path(digest, codec)
        directory = final.parent
        self._ensure_dir(directory)
        tmp = directory / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        view = memoryview(data).cast("B")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        direct = self.direct_io and len(view) >= DIRECT_MIN and hasattr(os, "O_DIRECT")
        try:
            fd = os.open(tmp, flags | (os.O_DIRECT if direct else 0), 0o644)
        except OSError as exc:
            if not (direct and exc.errno == errno.EINVAL):
                raise _error("creating chunk", tmp, exc) from exc
            self.direct_io = direct = False  # this filesystem has no O_DIRECT (tmpfs): stop trying
            try:
                fd = os.open(tmp, flags, 0o644)
            except OSError as exc2:
                raise _error("creating chunk", tmp, exc2) from exc2
        try:
            try:
                if direct:
                    write_direct(fd, view)
                else:
                    while view:
                        view = view[os.write(fd, view) :]
                os.fsync(fd)  # a failed fsync fails the save; never retried as success
            finally:
                os.close(fd)
            os.rename(tmp, final)  # replaces a concurrent writer's copy of the same bytes: harmless
        except OSError as exc:
            with suppress(OSError):
                os.unlink(tmp)
            raise _error("writing chunk", final, exc) from exc
        with self._dirty_lock:
            self._dirty.add(directory)
        return len(memoryview(data).cast("B"))

    def sync(self) -> None:
        """Makes every name added since the last call durable (fsync of the directories)."""
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        # Deepest first: a new directory's own entries before the entry naming it.
        for directory in sorted(dirty, key=lambda p: len(p.parts), reverse=True):
            try:
                fsync_dir(directory)
            except OSError as exc:
                raise _error("syncing", directory, exc) from exc

    # -- reading ------------------------------------------------------------------------------
    def read(
        self, digest: str, codec: str, stored_len: int, *, where: str | None = None, tensor: str | None = None
    ) -> bytearray:
        """The stored bytes of one chunk, after checking it is a regular file of the right size.

        Errors name the checkpoint (``where``) and the tensor the chunk belongs to.
        """
        try:
            return self._read(digest, codec, stored_len, where)
        except CorruptCheckpointError as exc:
            exc.tensor = tensor
            raise

    def _read(self, digest: str, codec: str, stored_len: int, where: str | None) -> bytearray:
        path = self.path(digest, codec)
        try:
            if not self._real_dir(path.parent, create=False):
                raise FileNotFoundError(errno.ENOENT, "no shard directory", str(path.parent))
            # O_NONBLOCK: a FIFO planted in place of a chunk must not wait for a writer.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"chunk {digest[:16]}….{codec} is missing from the chunk store {self.root}",
                path=where,
                kind="missing-chunk",
            ) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeCheckpointError(f"chunk {path.name} is a symlink", path=where) from exc
            raise _error("opening chunk", path, exc) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeCheckpointError(f"chunk {path.name} is not a regular file", path=where)
            os.set_blocking(fd, True)
            if st.st_size != stored_len:
                kind = "truncated" if st.st_size < stored_len else "size-mismatch"
                raise CorruptCheckpointError(
                    f"chunk {path.name} has {st.st_size} bytes, the manifest says {stored_len}",
                    path=where,
                    kind=kind,
                )
            buffer = bytearray(stored_len)
            view = memoryview(buffer)
            got = 0
            while got < stored_len:
                n = os.preadv(fd, [view[got:]], got)
                if n == 0:
                    raise CorruptCheckpointError(
                        f"chunk {path.name} shrank while read", path=where, kind="truncated"
                    )
                got += n
            return buffer
        except OSError as exc:
            raise _error("reading chunk", path, exc) from exc
        finally:
            os.close(fd)

    # -- locking and collection ---------------------------------------------------------------
    @contextmanager
    def locked(self, *, exclusive: bool) -> Iterator[None]:
        """The store lock: shared for a save (first chunk to commit), exclusive for GC."""
        self._ensure_dir(self.root)
        try:
            fd = open_file(self.root / "lock", os.O_RDWR | os.O_CREAT)
        except UnsafeFileError:
            raise
        except OSError as exc:
            raise _error("opening lock of", self.root, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            unlock_close(fd)  # LOCK_UN first: a forked child may share the descriptor

    def iter_files(self) -> Iterator[tuple[Path, str | None]]:
        """Every file under ``chunks/`` with its digest, or None for temporary and foreign files.

        A symlinked store or ``chunks`` directory raises UnsafeFileError: its files are not ours."""
        if not self._real_dir(self.chunks, create=False):
            return
        for sub in os.scandir(self.chunks):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(sub.path):
                name = entry.name
                digest, _, codec = name.partition(".")
                if entry.is_dir(follow_symlinks=False):
                    continue  # a directory is never ours (a symlink named like a chunk is: it goes)
                ok = _HEX64.match(digest) and codec in CODECS and digest[:2] == sub.name
                yield Path(entry.path), digest if ok else None

    def sweep(self, live: set[str], *, dry_run: bool = False) -> SweepReport:
        """Deletes every chunk whose digest is not in ``live`` and our temporary leftovers (call it
        holding ``locked(exclusive=True)``); foreign files are never touched."""
        kept = deleted = freed = temporary = 0
        touched: set[Path] = set()
        for path, digest in self.iter_files():
            if digest is not None and digest in live:
                kept += 1
                continue
            if digest is None and not path.name.startswith(_TMP_PREFIX):
                continue  # not ours: never delete what we did not write
            try:
                size = path.lstat().st_size
                if not dry_run:
                    path.unlink()
                    touched.add(path.parent)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _error("deleting chunk", path, exc) from exc
            if digest is None:
                temporary += 1
            else:
                deleted += 1
                freed += size
        for directory in touched:
            fsync_dir(directory)
        if not dry_run:
            self.bad.prune(self.chunks)
        return SweepReport(kept, deleted, freed, temporary)
