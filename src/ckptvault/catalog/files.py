"""What the catalog reads beside manifests -- validation results -- and the names of its own files.

Everything a run holds is read through :class:`~ckptvault.engine.rundir.RunDirectory` (run.json,
validation results) and :func:`ckptvault.engine.manifests.read_manifest` (manifests), over the
storage protocol: untrusted input (docs/security.md), never read through a symlink, never blocking
on a FIFO, never more than a document may hold. The catalog's SQLite files are the one local-disk
exception (SQLite needs a path); :func:`catalog_database` says where they are and checks them
before SQLite opens them.

Where: a local root keeps its catalog inside the tree (``ROOT/.ckptvault/catalog.sqlite``), beside
what it indexes. An object-store root cannot hold a SQLite file, and the database is derived data
anyway, so it lives in the user's cache directory (:func:`cache_dir`), under
``catalogs/<scheme>-<bucket>-<hash of the root URL>/catalog.sqlite``: one database per root, found
again by every process of the user that opens the same root, and never written to the bucket.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from ..engine.rundir import VALIDATION_DIR, RunDirectory
from ..storage.catalogfiles import check_database_files, check_private_database_files
from .database import CatalogError

CATALOG_DIR = ".ckptvault"
CATALOG_NAME = "catalog.sqlite"
CACHE_ENV = "CKPTVAULT_CACHE_DIR"
CACHED_CATALOGS = "catalogs"  # the cache's folder of object-store roots' catalogs
__all__ = [
    "CACHED_CATALOGS",
    "CACHE_ENV",
    "CATALOG_DIR",
    "CATALOG_NAME",
    "VALIDATION_DIR",
    "cache_dir",
    "cached_catalog_name",
    "catalog_database",
    "check_catalog_files",
    "validation_of",
]


def optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


def check_catalog_files(root: Path) -> None:
    """Creates ``ROOT/.ckptvault`` if needed and refuses a symlinked one, or a catalog file (or its
    WAL/shared-memory files) that is a symlink or not a regular file: SQLite follows links, and the
    catalog is rewritten and deleted on a rebuild -- never someone else's file through a link."""
    check_database_files(root, CATALOG_DIR, CATALOG_NAME)


def cache_dir() -> Path:
    """The user's ckptvault cache: ``$CKPTVAULT_CACHE_DIR``, else ``$XDG_CACHE_HOME/ckptvault``, else
    ``~/.cache/ckptvault`` (the rule the fingerprint cache follows too). Read at each call, so a test
    or a job can point it elsewhere."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    try:
        base = Path(xdg) if xdg else Path.home() / ".cache"
    except RuntimeError as exc:  # no home directory to be found (a bare container)
        raise CatalogError(f"no cache directory for the catalog: set {CACHE_ENV} ({exc})") from exc
    return base.absolute() / "ckptvault"


def cached_catalog_name(root: str) -> str:
    """The cache folder of the catalog of the object-store root ``root`` (a normalised URL):
    readable (scheme and bucket) and unique (a hash of the whole URL: two prefixes of one bucket
    are two catalogs)."""
    scheme, _, rest = root.partition("://")  # as the storage spelled it: scheme://bucket/key
    bucket = rest.partition("/")[0]
    digest = hashlib.blake2b(root.encode("utf-8"), digest_size=8).hexdigest()
    return f"{re.sub(r'[^a-z0-9]', '_', scheme)}-{re.sub(r'[^A-Za-z0-9._-]', '_', bucket)[:63]}-{digest}"


def catalog_database(root: Path | str) -> Path:
    """The catalog database's path for ``root`` -- a local directory (a ``Path``: inside it) or an
    object-store URL (a ``str``: in :func:`cache_dir`) -- its directory created and checked first."""
    if isinstance(root, Path):
        check_catalog_files(root)
        return root / CATALOG_DIR / CATALOG_NAME
    base, folder = cache_dir(), f"{CACHED_CATALOGS}/{cached_catalog_name(root)}"
    check_private_database_files(base, folder, CATALOG_NAME)
    return base / folder / CATALOG_NAME


def validation_of(run: RunDirectory, name: str, checkpoint_id: str) -> tuple[str | None, int | None]:
    """``(level, passed)`` of the result recorded for checkpoint ``name`` of ``run``, if it is a
    result of this very checkpoint (a result of an earlier checkpoint of the same name is not)."""
    doc = run.read_validation(name)  # missing, unreadable, a symlink or FIFO: no result
    if doc is None or doc.get("checkpoint_id") != checkpoint_id:
        return None, None
    passed = doc.get("passed")
    return optional_text(doc.get("level")), (None if not isinstance(passed, bool) else int(passed))
