"""Fault injection at the operating-system boundary: fail, tear or delay the Nth file operation.

Why at the ``os`` boundary and not around our ``Storage`` protocol: a checkpoint's life touches the
disk through more doors than ``Storage`` (the chunk store, retention's deletes, garbage collection,
the run index, the registry's pins, validation results, the catalog's SQLite file). Wrapping the
functions they all end in -- ``os.open/write/pwrite/fsync/ftruncate/rename/replace/unlink/rmdir/
mkdir``, the reads ``os.read/pread/preadv``, ``open()`` in a writing mode, the ``renameat2`` swap of
an overwrite and the catalog's SQLite statements -- reaches every write path at once, including the
ones nobody thought to route through a wrapper. The technique is SQLite's: run an operation with a
fault at operation 1, 2, 3, ... until it completes without reaching the fault, and after each
failure check that nothing committed was harmed (see :mod:`ckptvault.testing.invariants`).

Scope: only operations on paths under ``root`` count (a descriptor counts for the path it was
opened with), so the test's own bookkeeping elsewhere is untouched. Process-wide and thread-safe
(async saves write from a background thread): one injector may be active at a time.

Actions at the chosen operation:

* ``"error"``: raise :class:`InjectedFault` (an ``OSError`` with ``errno``, EIO by default) instead
  of doing it -- once (``persistent=False``) or for that and every later counted operation (a
  dead disk);
* ``"torn"``: a write stores only the first half of its bytes, then fails (a torn write); other
  operations fail as with ``"error"``;
* ``"delay"``: sleep ``delay_s`` and then do it (widens race windows for concurrency tests).

``record=True`` keeps an :class:`Op` log of what was done (with the bytes of every write), which
:mod:`ckptvault.testing.crashsim` replays to build the states a power cut could leave.
Not for production use: it slows every file operation of the process while active.
"""

from __future__ import annotations

import builtins
import dataclasses
import errno as errno_codes
import io
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

WRITE_KINDS = frozenset(
    {"open", "write", "fsync", "truncate", "rename", "unlink", "rmdir", "mkdir", "sqlite"}
)
READ_KINDS = frozenset({"read"})
ALL_KINDS = WRITE_KINDS | READ_KINDS

Action = Literal["error", "torn", "delay"]

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class InjectedFault(OSError):
    """The failure an injector made up; an ``OSError``, so the code under test handles it as the
    real one (``errno`` set), while a test can still tell it apart from a genuine failure."""


@dataclasses.dataclass(frozen=True)
class Op:
    """One file operation as it happened (recorded after it succeeded, or when it was faulted).

    ``path`` is absolute; ``dest`` the new name of a rename (``exchange`` swaps ``path`` and
    ``dest``); ``offset``/``data`` the position and bytes of a write, ``size`` the length of a
    truncate; ``flags`` of an open. ``faulted`` marks the operation the injector failed (a torn
    write is recorded with the half that reached the file).
    """

    index: int
    kind: str
    path: str
    dest: str = ""
    offset: int = -1
    data: bytes | None = None
    size: int = -1
    flags: int = 0
    is_dir: bool = False
    faulted: bool = False


_active: FaultInjector | None = None
_active_lock = threading.Lock()


class FaultInjector:
    """Counts the file operations under ``root`` and injects a fault at number ``fail_at``.

    Use as a context manager; ``count`` says how many operations it saw, ``fired`` how many it
    faulted, ``log`` what happened (kinds of every counted operation; with ``record=True`` the
    full operations a crash replay needs). ``fail_at=None`` only counts (and records): the way to
    learn how many operations a write path has. ``kinds`` limits what counts (default: the
    writing operations; add ``"read"`` for restore paths).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        fail_at: int | None = None,
        persistent: bool = False,
        action: Action = "error",
        errno: int = errno_codes.EIO,
        delay_s: float = 0.05,
        kinds: Iterable[str] = WRITE_KINDS,
        record: bool = False,
    ) -> None:
        if fail_at is not None and fail_at < 1:
            raise ValueError("fail_at counts from 1")
        self.root = os.path.realpath(root)
        self.fail_at = fail_at
        self.persistent = persistent
        self.action = action
        self.errno = errno
        self.delay_s = delay_s
        self.kinds = frozenset(kinds)
        unknown = self.kinds - ALL_KINDS
        if unknown:
            raise ValueError(f"unknown operation kinds {sorted(unknown)}")
        self.record = record
        self.count = 0
        self.fired = 0
        self.log: list[Op] = []
        self._lock = threading.RLock()
        self._fds: dict[int, str] = {}
        self._local = threading.local()
        self._saved: dict[tuple[Any, str], Any] = {}

    # -- decisions ------------------------------------------------------------------------------
    def _inside(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + os.sep)

    def _quiet(self) -> bool:
        """True inside an operation we already counted as one (rmtree's inner unlinks)."""
        return bool(getattr(self._local, "depth", 0))

    def _decide(self, kind: str, path: str) -> tuple[int, bool]:
        """The operation's number (0: not counted) and whether to fault it."""
        if kind not in self.kinds or self._quiet() or not self._inside(path):
            return 0, False
        with self._lock:
            self.count += 1
            n = self.count
            fire = self.fail_at is not None and (n == self.fail_at or (self.persistent and n > self.fail_at))
            if fire and self.action != "delay":
                self.fired += 1
        if fire and self.action == "delay":
            time.sleep(self.delay_s)
            return n, False
        return n, fire

    def _fault(self, kind: str, path: str, n: int) -> InjectedFault:
        return InjectedFault(self.errno, f"injected fault at {kind} #{n}: {os.strerror(self.errno)}", path)

    def _log(self, op: Op) -> None:
        with self._lock:
            self.log.append(op)

    def _resolve(self, path: Any, dir_fd: int | None = None) -> str:
        if isinstance(path, int):
            return self._fds.get(path, "")
        text = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(text):
            base = self._fds.get(dir_fd, "")
            return os.path.normpath(os.path.join(base, text)) if base else ""
        return os.path.abspath(text)

    def kinds_seen(self) -> list[str]:
        """The kinds of the counted operations in order (needs ``record``; for messages)."""
        return [op.kind for op in self.log]

    # -- install --------------------------------------------------------------------------------
    def __enter__(self) -> FaultInjector:
        global _active
        with _active_lock:
            if _active is not None:
                raise RuntimeError("another FaultInjector is active")
            _active = self
        from ..storage import local  # late: a test may import this module before the engine

        patches: dict[tuple[Any, str], Callable[..., Any]] = {
            (os, "open"): self._open,
            (os, "close"): self._close,
            (os, "write"): self._write,
            (os, "pwrite"): self._pwrite,
            (os, "fsync"): self._fsync,
            (os, "fdatasync"): self._fsync,
            (os, "ftruncate"): self._ftruncate,
            (os, "rename"): self._rename,
            (os, "replace"): self._replace,
            (os, "unlink"): self._unlink,
            (os, "remove"): self._unlink,
            (os, "rmdir"): self._rmdir,
            (os, "mkdir"): self._mkdir,
            (os, "read"): self._read,
            (os, "pread"): self._pread,
            (os, "preadv"): self._preadv,
            (builtins, "open"): self._open_file,
            (io, "open"): self._open_file,
            (shutil, "rmtree"): self._rmtree,
            (local, "exchange_paths"): self._exchange,
            (sqlite3, "connect"): self._sqlite_connect,
        }
        for (owner, name), replacement in patches.items():
            self._saved[(owner, name)] = getattr(owner, name)
            setattr(owner, name, replacement)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        global _active
        for (owner, name), original in self._saved.items():
            setattr(owner, name, original)
        self._saved.clear()
        with _active_lock:
            _active = None

    def _orig(self, owner: Any, name: str) -> Any:
        return self._saved[(owner, name)]

    # -- os functions ---------------------------------------------------------------------------
    def _open(self, path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        where = self._resolve(path, dir_fd)
        writing = bool(flags & _WRITE_FLAGS)
        n, fire = self._decide("open" if writing else "read", where)
        if fire:
            raise self._fault("open", where, n)
        fd: int = self._orig(os, "open")(path, flags, mode, dir_fd=dir_fd)
        self._fds[fd] = where
        if n and self.record and writing:
            self._log(Op(n, "open", where, flags=flags, is_dir=bool(flags & os.O_DIRECTORY)))
        return fd

    def _close(self, fd: int) -> None:
        self._fds.pop(fd, None)
        self._orig(os, "close")(fd)

    def _do_write(self, fd: int, data: Any, offset: int | None) -> int:
        where = self._fds.get(fd, "")
        n, fire = self._decide("write", where)
        write = self._orig(os, "write")
        pwrite = self._orig(os, "pwrite")
        view = memoryview(data).cast("B")
        if fire:
            if self.action == "torn" and len(view) > 1:
                half = len(view) // 2
                if _is_direct(fd):
                    half -= half % 4096  # O_DIRECT writes whole blocks
                if half:
                    at = os.lseek(fd, 0, os.SEEK_CUR) if offset is None else offset
                    done = write(fd, view[:half]) if offset is None else pwrite(fd, view[:half], offset)
                    if self.record:
                        self._log(Op(n, "write", where, offset=at, data=bytes(view[:done]), faulted=True))
            raise self._fault("write", where, n)
        if n and self.record:
            at = os.lseek(fd, 0, os.SEEK_CUR) if offset is None else offset
            done = write(fd, view) if offset is None else pwrite(fd, view, offset)
            self._log(Op(n, "write", where, offset=at, data=bytes(view[:done])))
            return int(done)
        return int(write(fd, data) if offset is None else pwrite(fd, data, offset))

    def _write(self, fd: int, data: Any) -> int:
        return self._do_write(fd, data, None)

    def _pwrite(self, fd: int, data: Any, offset: int) -> int:
        return self._do_write(fd, data, offset)

    def _fsync(self, fd: Any) -> None:
        number = fd if isinstance(fd, int) else fd.fileno()
        where = self._fds.get(number, "")
        n, fire = self._decide("fsync", where)
        if fire:
            raise self._fault("fsync", where, n)
        self._orig(os, "fsync")(fd)
        if n and self.record:
            self._log(Op(n, "fsync", where, is_dir=os.path.isdir(where)))

    def _ftruncate(self, fd: int, length: int) -> None:
        where = self._fds.get(fd, "")
        n, fire = self._decide("truncate", where)
        if fire:
            raise self._fault("truncate", where, n)
        self._orig(os, "ftruncate")(fd, length)
        if n and self.record:
            self._log(Op(n, "truncate", where, size=length))

    def _move(
        self, name: str, src: Any, dst: Any, src_dir_fd: int | None = None, dst_dir_fd: int | None = None
    ) -> None:
        a, b = self._resolve(src, src_dir_fd), self._resolve(dst, dst_dir_fd)
        n, fire = self._decide("rename", a if self._inside(a) else b)
        if fire:
            raise self._fault("rename", a, n)
        self._orig(os, name)(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        if n and self.record:
            self._log(Op(n, "rename", a, dest=b))

    def _rename(
        self, src: Any, dst: Any, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None
    ) -> None:
        self._move("rename", src, dst, src_dir_fd, dst_dir_fd)

    def _replace(
        self, src: Any, dst: Any, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None
    ) -> None:
        self._move("replace", src, dst, src_dir_fd, dst_dir_fd)

    def _unlink(self, path: Any, *, dir_fd: int | None = None) -> None:
        where = self._resolve(path, dir_fd)
        n, fire = self._decide("unlink", where)
        if fire:
            raise self._fault("unlink", where, n)
        self._orig(os, "unlink")(path, dir_fd=dir_fd)
        if n and self.record:
            self._log(Op(n, "unlink", where))

    def _rmdir(self, path: Any, *, dir_fd: int | None = None) -> None:
        where = self._resolve(path, dir_fd)
        n, fire = self._decide("rmdir", where)
        if fire:
            raise self._fault("rmdir", where, n)
        self._orig(os, "rmdir")(path, dir_fd=dir_fd)
        if n and self.record:
            self._log(Op(n, "rmdir", where))

    def _mkdir(self, path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        where = self._resolve(path, dir_fd)
        n, fire = self._decide("mkdir", where)
        if fire:
            raise self._fault("mkdir", where, n)
        self._orig(os, "mkdir")(path, mode, dir_fd=dir_fd)
        if n and self.record:
            self._log(Op(n, "mkdir", where, is_dir=True))

    def _read(self, fd: int, length: int) -> bytes:
        n, fire = self._decide("read", self._fds.get(fd, ""))
        if fire:
            raise self._fault("read", self._fds.get(fd, ""), n)
        return bytes(self._orig(os, "read")(fd, length))

    def _pread(self, fd: int, length: int, offset: int) -> bytes:
        n, fire = self._decide("read", self._fds.get(fd, ""))
        if fire:
            raise self._fault("read", self._fds.get(fd, ""), n)
        return bytes(self._orig(os, "pread")(fd, length, offset))

    def _preadv(self, fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        n, fire = self._decide("read", self._fds.get(fd, ""))
        if fire:
            raise self._fault("read", self._fds.get(fd, ""), n)
        return int(self._orig(os, "preadv")(fd, buffers, offset, flags))

    # -- higher-level doors ---------------------------------------------------------------------
    def _rmtree(self, path: Any, ignore_errors: bool = False, onerror: Any = None, **kwargs: Any) -> None:
        """An rmtree counts as one operation and its inner unlinks as none: the code under test
        chose to delete a whole tree (always something already out of sight), and the crash
        replay treats it as one step. A fault makes it fail before touching anything."""
        where = self._resolve(path)
        n, fire = self._decide("unlink", where)
        if fire:
            if ignore_errors:
                return
            raise self._fault("unlink", where, n)
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            self._orig(shutil, "rmtree")(path, ignore_errors=ignore_errors, onerror=onerror, **kwargs)
        finally:
            self._local.depth -= 1
        if n and self.record:
            self._log(Op(n, "rmtree", where))

    def _exchange(self, a: Path, b: Path) -> bool:
        pa, pb = os.path.abspath(a), os.path.abspath(b)
        n, fire = self._decide("rename", pa)
        if fire:
            raise self._fault("rename", pa, n)
        done = bool(self._orig(_local_module(), "exchange_paths")(a, b))
        if done and n and self.record:
            self._log(Op(n, "exchange", pa, dest=pb))
        return done

    def _open_file(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        writing = any(c in mode for c in "wax+")
        where = self._fds.get(file, "") if isinstance(file, int) else self._resolve(file)
        n, fire = self._decide("open" if writing else "read", where)
        if fire:
            raise self._fault("open", where, n)
        handle = self._orig(io, "open")(file, mode, *args, **kwargs)
        if not n or not writing:
            if not isinstance(file, int):
                with self._lock:  # its descriptor number may be a stale entry of a closed one
                    self._fds.pop(handle.fileno(), None)
            return handle
        if self.record and not isinstance(file, int):
            flags = os.O_CREAT | (os.O_TRUNC if "w" in mode else 0) | (os.O_EXCL if "x" in mode else 0)
            self._log(Op(n, "open", where, flags=flags))
        with self._lock:
            self._fds[handle.fileno()] = where
        return _CountingFile(handle, self, where, append="a" in mode)

    def _sqlite_connect(self, database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        where = self._resolve(database) if database != ":memory:" else ""
        if not self._inside(where):
            return self._orig(sqlite3, "connect")(database, *args, **kwargs)  # type: ignore[no-any-return]
        injector = self

        class _Connection(sqlite3.Connection):
            """Counts each statement and commit as one operation: a fault is what a full disk or
            an I/O error inside SQLite surfaces as (an ``OperationalError``)."""

            def _gate(self) -> None:
                n, fire = injector._decide("sqlite", where)
                if fire:
                    raise sqlite3.OperationalError(f"injected fault at sqlite #{n}: disk I/O error")

            def execute(self, *a: Any, **k: Any) -> sqlite3.Cursor:
                self._gate()
                return super().execute(*a, **k)

            def executemany(self, *a: Any, **k: Any) -> sqlite3.Cursor:
                self._gate()
                return super().executemany(*a, **k)

            def executescript(self, *a: Any, **k: Any) -> sqlite3.Cursor:
                self._gate()
                return super().executescript(*a, **k)

            def commit(self) -> None:
                self._gate()
                super().commit()

        kwargs["factory"] = _Connection
        return self._orig(sqlite3, "connect")(database, *args, **kwargs)  # type: ignore[no-any-return]


def _local_module() -> Any:
    from ..storage import local

    return local


def _is_direct(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))


class _CountingFile:
    """A file object opened for writing under the injector. What its buffered writes send to the
    disk counts as one ``write`` operation at each ``flush``/``close`` (as many syscalls as a
    ``json.dump`` makes would turn a fault loop over N into thousands of runs of the same thing);
    a fault there raises before the buffered bytes are flushed."""

    def __init__(self, handle: Any, injector: FaultInjector, where: str, append: bool) -> None:
        self._handle = handle
        self._injector = injector
        self._where = where
        self._append = append
        self._dirty = False
        fd = handle.fileno()
        self._synced = os.fstat(fd).st_size if append else os.lseek(fd, 0, os.SEEK_CUR)

    def write(self, data: Any) -> int:
        self._dirty = True
        return int(self._handle.write(data))

    def writelines(self, lines: Iterable[Any]) -> None:
        self._dirty = True
        self._handle.writelines(lines)

    def _push(self) -> None:
        if not self._dirty or self._handle.closed:
            return
        injector = self._injector
        n, fire = injector._decide("write", self._where)
        if fire:
            raise injector._fault("write", self._where, n)
        self._dirty = False
        self._handle.flush()
        fd = self._handle.fileno()
        after = os.fstat(fd).st_size if self._append else os.lseek(fd, 0, os.SEEK_CUR)
        if n and injector.record:
            before = self._synced if not self._append else min(self._synced, after)
            with injector._orig(io, "open")(self._where, "rb") as reader:
                reader.seek(before)
                chunk = reader.read(after - before)
            injector._log(Op(n, "write", self._where, offset=before, data=chunk))
        self._synced = after

    def flush(self) -> None:
        self._push()
        self._handle.flush()

    def close(self) -> None:
        if self._handle.closed:
            return
        try:
            self._push()
        finally:
            with self._injector._lock:
                self._injector._fds.pop(self._handle.fileno(), None)
            self._handle.close()

    def __enter__(self) -> _CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)
