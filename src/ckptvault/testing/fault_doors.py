"""The patched functions of :class:`~ckptvault.testing.faults.FaultInjector`: ``os``, ``open()``,
``shutil.rmtree``, the ``renameat2`` swap and ``sqlite3.connect`` as the injector replaces them.

Why a module of its own: each replacement is the same small pattern (resolve the path, ask the
counter whether to fault, do the real call, log it) repeated for every door to the disk; keeping
them apart from the injector's install/uninstall leaves each module one job. They are methods of
:class:`PatchedDoors`, which :class:`~ckptvault.testing.faults.FaultInjector` inherits.
"""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .fault_log import WRITE_FLAGS, Op, OpCounter


class PatchedDoors(OpCounter):
    """The replacements an injector installs for the functions through which files are touched."""

    # -- os functions ---------------------------------------------------------------------------
    def _open(self, path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        where = self._resolve(path, dir_fd)
        writing = bool(flags & WRITE_FLAGS)
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

    def __init__(self, handle: Any, injector: OpCounter, where: str, append: bool) -> None:
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
