"""L1: the user's own local files, for the modules above storage that read or write outside a run.

Checkpoints go through the :class:`~ckptvault.storage.base.Storage` protocol; some outputs and
inputs are plain local files by nature: an exported model directory, the data files a run
fingerprints, a foreign ``.pt`` file being imported. Their file operations live here (issue 14: no
``os``/``shutil`` file operation above ``storage/``), so each mechanism -- staging, fsync, rename --
exists once. Single files are published by :mod:`ckptvault.storage.atomic_file`; directories, reads
and walks are here; descriptors (pipes and files) in :mod:`ckptvault.storage.localfiles_fd`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Literal

from ..errors import CheckpointError, StorageError
from .atomic_file import temp_beside
from .safeopen import fsync_dir

__all__ = [
    "Refusal",
    "durable_output",
    "file_size",
    "publish_directory",
    "read_blocks",
    "read_link",
    "scratch_directory",
    "stat_path",
    "walk_sorted",
]

Refusal = Literal["exists", "foreign"]
"""Why :func:`publish_directory` will not replace an existing target: it exists and ``overwrite``
was not given, or it is not an earlier output (no marker file)."""


def file_size(path: str | os.PathLike[str]) -> int:
    """The size in bytes of the file at ``path`` (links followed); ``OSError`` when it is missing."""
    return os.path.getsize(path)


@contextlib.contextmanager
def durable_output(path: Path) -> Iterator[BinaryIO]:
    """A new file at ``path`` (inside a staged directory), fsynced on a clean exit, so the directory
    it is in can be published knowing its contents are on disk."""
    with open(path, "wb") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def scratch_directory(target: Path) -> Iterator[Path]:
    """A fresh empty directory beside ``target`` (same file system, so what is made in it can be
    renamed onto ``target``), removed with whatever is left in it when the block ends."""
    work = temp_beside(target)
    try:
        work.mkdir()
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def publish_directory(
    target: Path,
    *,
    overwrite: bool,
    marker: str,
    refuse: Callable[[Refusal], BaseException],
    action: str = "write",
) -> Iterator[Path]:
    """Yields a fresh sibling directory to fill; on a clean exit it is fsynced and renamed to
    ``target``, so a reader sees the whole output or none of it.

    An existing ``target`` is replaced only with ``overwrite`` and only when it is a real directory
    holding ``marker`` (an earlier output of the same kind, never the user's other data); an empty
    real directory is simply removed first. Otherwise ``refuse(why)`` is raised. The replacement
    renames the old directory aside, the new one in (the old one back if that fails), fsyncs the
    parent and only then deletes the old one. On any failure the staged directory is removed; an
    :class:`OSError` becomes a :class:`StorageError` saying ``cannot <action> <target>`` unless it
    already is a :class:`CheckpointError`.
    """
    temp = temp_beside(target)
    try:
        temp.mkdir()
        yield temp
        fsync_dir(temp)
        _install_directory(temp, target, overwrite, marker, refuse)
    except OSError as exc:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(exc, CheckpointError):
            raise
        raise StorageError(exc.errno or 0, f"cannot {action} {target}: {exc}") from exc
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _install_directory(
    temp: Path, target: Path, overwrite: bool, marker: str, refuse: Callable[[Refusal], BaseException]
) -> None:
    if target.exists() or target.is_symlink():
        if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
            target.rmdir()
        elif not overwrite:
            raise refuse("exists")
        elif not (target.is_dir() and not target.is_symlink() and (target / marker).is_file()):
            raise refuse("foreign")
        else:
            old = temp_beside(target)
            os.rename(target, old)
            try:
                os.rename(temp, target)
            except BaseException:
                os.rename(old, target)  # the earlier output stays where it was
                raise
            fsync_dir(target.parent)
            shutil.rmtree(old, ignore_errors=True)
            return
    os.rename(temp, target)
    fsync_dir(target.parent)


# -- reading the user's files (data fingerprints) -------------------------------------------------
def stat_path(path: str, *, follow_symlinks: bool = True) -> os.stat_result:
    """``stat`` (or ``lstat``) of ``path``; ``OSError`` as the system gives it."""
    return os.stat(path, follow_symlinks=follow_symlinks)


def read_link(path: str) -> str:
    """The target text of the symlink at ``path`` (never followed)."""
    return os.readlink(path)


def walk_sorted(root: str, rel: str = "") -> Iterator[tuple[str, str, os.stat_result]]:
    """(relative path, full path, lstat) of everything under ``root``, sorted by name, depth first.

    Symlinks are reported, never followed (a link cannot pull in foreign data or make a cycle).
    Errors (permission denied, a directory vanishing) propagate: a caller describing the data must
    not silently describe less of it.
    """
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        child_rel = f"{rel}/{entry.name}" if rel else entry.name
        st = entry.stat(follow_symlinks=False)
        yield child_rel, entry.path, st
        if stat.S_ISDIR(st.st_mode):
            yield from walk_sorted(entry.path, child_rel)


def read_blocks(path: str, buffer: memoryview) -> Iterator[memoryview]:
    """The bytes of the file at ``path``, read into ``buffer`` and yielded as slices of it (each
    valid until the next one): unbuffered, so a large file streams at disk speed without copies."""
    with open(path, "rb", buffering=0) as handle:
        while True:
            n = handle.readinto(buffer)
            if not n:
                return
            yield buffer[:n]
