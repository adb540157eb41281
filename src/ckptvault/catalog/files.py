"""Reading the files a catalog indexes -- manifests, ``run.json``, validation results -- and
checking the catalog's own directory, all as untrusted input (docs/security.md): never through a
symlink, never blocking on a FIFO, never reading more than a manifest may hold. SQLite follows
links, so the catalog's database files are checked before it opens them."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

from ..config import MANIFEST_NAME, MAX_MANIFEST_BYTES
from ..errors import CorruptCheckpointError
from ..format.manifest import Manifest, parse_manifest
from ..format.tree import TreeDecodeError, TreeDecoder
from ..storage.safeopen import UnsafeFileError, open_dir, open_file, read_fd, read_file

CATALOG_DIR = ".ckptvault"
CATALOG_NAME = "catalog.sqlite"
VALIDATION_DIR = ".ckptvault-validation"


class _PlainValues:
    """Metadata holds no tensors; a leaf in it means a damaged manifest (parse_manifest checks)."""

    def encode_leaf(self, value: Any, path: str, name: str) -> dict[str, Any] | None:
        return None

    def decode_leaf(self, node: dict[str, Any], path: str) -> Any:
        raise ValueError(f"{path}: metadata cannot hold arrays or tensors")


def optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


def read_run_doc(run_dir: Path) -> dict[str, Any]:
    """A run's ``run.json`` as a dict; empty when missing, damaged, oversized, a link or a FIFO."""
    try:
        doc = json.loads(read_file(run_dir / "run.json", cap=MAX_MANIFEST_BYTES))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def check_catalog_files(root: Path) -> None:
    """Creates ``ROOT/.ckptvault`` if needed and refuses a symlinked one, or a catalog file (or its
    WAL/shared-memory files) that is a symlink or not a regular file: SQLite follows links, and the
    catalog is rewritten and deleted on a rebuild -- never someone else's file through a link."""
    os.close(open_dir(root, CATALOG_DIR, create=True))
    for suffix in ("", "-wal", "-shm"):
        path = root / CATALOG_DIR / f"{CATALOG_NAME}{suffix}"
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(
                errno.ELOOP, f"{path} is a symbolic link or not a regular file; refusing to use it"
            )


def read_manifest(directory: Path) -> tuple[Manifest, dict[str, Any]]:
    """A checkpoint's parsed manifest and decoded metadata, read with the format's limits."""
    path = directory / MANIFEST_NAME
    fd = open_file(path, os.O_RDONLY)  # never a symlink, never blocking on a FIFO
    try:
        data = read_fd(fd, path, cap=MAX_MANIFEST_BYTES)  # refuses a larger one before reading
    finally:
        os.close(fd)
    manifest = parse_manifest(data, path=str(directory))
    try:
        metadata = TreeDecoder(_PlainValues()).decode(manifest.metadata, "metadata")
    except TreeDecodeError as exc:
        raise CorruptCheckpointError(
            f"metadata: {exc}", path=str(directory), file=MANIFEST_NAME, kind="bad-manifest"
        ) from exc
    return manifest, metadata if isinstance(metadata, dict) else {}


def validation_of(directory: Path, checkpoint_id: str) -> tuple[str | None, int | None]:
    try:
        dir_fd = open_dir(directory.parent, VALIDATION_DIR)
        try:
            doc = json.loads(read_file(f"{directory.name}.json", dir_fd=dir_fd))
        finally:
            os.close(dir_fd)
    except (OSError, ValueError):  # missing, unreadable, a symlink or FIFO (never followed): no result
        return None, None
    if not isinstance(doc, dict) or doc.get("checkpoint_id") != checkpoint_id:
        return None, None
    passed = doc.get("passed")
    return optional_text(doc.get("level")), (None if not isinstance(passed, bool) else int(passed))
