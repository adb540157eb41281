"""L1: the catalog's own database files on local disk.

SQLite needs a local path and follows links, so the catalog database is the one thing above
``storage/`` that is a plain file rather than a protocol document: these functions check its
directory and files before SQLite opens them, and remove them for a rebuild, so that the catalog
never writes or deletes someone else's file through a link planted in its place. A catalog of an
object-store root keeps its database in the user's cache directory instead
(:func:`check_private_database_files`): there, the directory holding it is the user's own and
readable by nobody else, since the catalog lists the user's buckets and runs.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .safeopen import UnsafeFileError, open_dir

DATABASE_SUFFIXES = ("", "-wal", "-shm")  # the database and SQLite's WAL and shared-memory files


def check_database_files(root: Path, directory: str, name: str) -> None:
    """Creates ``root/directory`` if needed and refuses a symlinked one, or a database file (or
    its WAL/shared-memory files) that is a symlink or not a regular file."""
    os.close(open_dir(root, directory, create=True))
    for suffix in DATABASE_SUFFIXES:
        path = root / directory / f"{name}{suffix}"
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(
                errno.ELOOP, f"{path} is a symbolic link or not a regular file; refusing to use it"
            )


def check_private_database_files(base: Path, directory: str, name: str) -> None:
    """:func:`check_database_files` for a database in a per-user cache: ``base`` is created (mode
    0700) if missing; ``base/directory`` is created below it through real directories only, must
    belong to this user (another user's directory planted at a predictable cache name is refused)
    and is made owner-only (0700)."""
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = open_dir(base, directory, create=True)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            raise UnsafeFileError(
                errno.EPERM, f"{base / directory} belongs to another user; refusing to use it"
            )
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    check_database_files(base, directory, name)


def remove_database_files(path: Path) -> None:
    """Deletes the database at ``path`` and its WAL/shared-memory files (a link is removed itself,
    never what it points at); missing ones are fine."""
    for suffix in DATABASE_SUFFIXES:
        Path(f"{path}{suffix}").unlink(missing_ok=True)
