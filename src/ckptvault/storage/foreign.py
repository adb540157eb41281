"""Files of other tools' formats on local disk, touched safely (DCP directories for import and
export, ``distributed/interop*.py``): the one place above which such code needs no ``os`` calls.

Everything here refuses to follow a link at the last component (``O_NOFOLLOW``) and reads only the
bytes asked for: a foreign directory is untrusted input (docs/security.md).
"""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def regular_size(path: Path) -> int | None:
    """The size of ``path`` when it is a regular file (not a link, device or directory), else
    None. Raises FileNotFoundError when nothing is there."""
    info = os.lstat(path)
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def read_range(path: Path, offset: int, length: int) -> bytes:
    """At most ``length`` bytes of ``path`` from ``offset`` (fewer at the end of the file)."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def read_head(path: Path, max_bytes: int) -> bytes:
    """The first ``max_bytes`` bytes of ``path`` (a caller compares the length with its limit)."""
    return read_range(path, 0, max_bytes)


@contextmanager
def scratch_file(directory: str, data: bytes, suffix: str = "") -> Iterator[str]:
    """``data`` in a private file of ``directory`` for an API that only takes a path; removed
    when the block ends."""
    path = os.path.join(directory, f"{uuid.uuid4().hex}{suffix}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        yield path
    finally:
        with suppress(FileNotFoundError):
            os.unlink(path)


def replace_directory(staging: Path, target: Path) -> None:
    """Puts the finished directory ``staging`` at ``target``, removing what was there (a link is
    removed, never followed)."""
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def resolved_link(path: str) -> str | None:
    """Where ``path`` points when it is a symlink (as another tool may make one, e.g. Lightning's
    ``last.ckpt``), else None."""
    return os.path.realpath(path) if os.path.islink(path) else None


def remove_link(path: str) -> bool:
    """Removes ``path`` when it is a symlink (the link itself, never its target); False otherwise."""
    if not os.path.islink(path):
        return False
    os.unlink(path)
    return True


def present(path: str) -> bool:
    """Whether anything (a dangling link included) is at ``path``."""
    return os.path.lexists(path)
