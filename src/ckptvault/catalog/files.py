"""What the catalog reads beside manifests -- validation results -- and the names of its own files.

Everything a run holds is read through :class:`~ckptvault.engine.rundir.RunDirectory` (run.json,
validation results) and :func:`ckptvault.engine.manifests.read_manifest` (manifests), over the
storage protocol: untrusted input (docs/security.md), never read through a symlink, never blocking
on a FIFO, never more than a document may hold. The catalog's SQLite files are the one local-disk
exception (SQLite needs a path); :func:`check_catalog_files` checks them before SQLite opens them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..engine.rundir import VALIDATION_DIR, RunDirectory
from ..storage.catalogfiles import check_database_files

CATALOG_DIR = ".ckptvault"
CATALOG_NAME = "catalog.sqlite"
__all__ = ["CATALOG_DIR", "CATALOG_NAME", "VALIDATION_DIR", "check_catalog_files", "validation_of"]


def optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


def check_catalog_files(root: Path) -> None:
    """Creates ``ROOT/.ckptvault`` if needed and refuses a symlinked one, or a catalog file (or its
    WAL/shared-memory files) that is a symlink or not a regular file: SQLite follows links, and the
    catalog is rewritten and deleted on a rebuild -- never someone else's file through a link."""
    check_database_files(root, CATALOG_DIR, CATALOG_NAME)


def validation_of(run: RunDirectory, name: str, checkpoint_id: str) -> tuple[str | None, int | None]:
    """``(level, passed)`` of the result recorded for checkpoint ``name`` of ``run``, if it is a
    result of this very checkpoint (a result of an earlier checkpoint of the same name is not)."""
    doc = run.read_validation(name)  # missing, unreadable, a symlink or FIFO: no result
    if doc is None or doc.get("checkpoint_id") != checkpoint_id:
        return None, None
    passed = doc.get("passed")
    return optional_text(doc.get("level")), (None if not isinstance(passed, bool) else int(passed))
