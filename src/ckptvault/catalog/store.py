"""The catalog: a SQLite index of every committed checkpoint under a root, derived from manifests.

``ROOT/.ckptvault/catalog.sqlite`` (WAL) indexes runs, checkpoints, metrics, config values, tags,
sizes, provenance and validation status (an object-store root, ``s3://bucket/runs``, has its
database in the user's cache directory instead: :mod:`ckptvault.catalog.files`). It is never
written by a save: every open *syncs* it with the tree by cheap checks instead, so a checkpoint
another process committed a moment ago, or one whose process died between its commit and anything
else, is found without any extra step:

* each directory that is not a checkpoint has its storage change token taken; only those whose
  token changed are listed again (a commit, an overwrite or a deletion renames an entry in its run
  directory, which changes the token; on local disk the token holds the directory's mtime, on an
  object store a digest of the listing's ETags). A directory modified within the last two seconds
  is listed again at the next sync too, because file-system timestamps are coarser than two quick
  renames ("racy" mtimes);
* a listed checkpoint is (re)read when it is new or its manifest's commit time changed (an overwrite);
* a run's ``.ckptvault-validation`` directory is checked the same way for new validation results.

``rebuild`` deletes the database and indexes everything again; every query returns the same rows
as before (tested). The schema is versioned (``meta.schema_version``); a database of another
version is rebuilt from the manifests, which is always possible because it is derived.
The code is split by job: :mod:`ckptvault.catalog.database` (schema, connection, errors),
:mod:`ckptvault.catalog.sync` (the sync), :mod:`ckptvault.catalog.rows` (reading rows) and this
module (:class:`Catalog`, which joins them; every old name is still importable from here).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from ..engine import manifests
from ..format.manifest import Manifest
from ..storage.catalogfiles import remove_database_files
from ..storage.resolve import is_url, storage_for
from .database import SCHEMA_VERSION, CatalogError, connect, typed_db_errors
from .files import CATALOG_DIR as CATALOG_DIR
from .files import CATALOG_NAME as CATALOG_NAME
from .files import VALIDATION_DIR as VALIDATION_DIR
from .files import catalog_database
from .rows import CatalogRow, CatalogRows
from .sync import CatalogSync

__all__ = [
    "CATALOG_DIR",
    "CATALOG_NAME",
    "SCHEMA_VERSION",
    "VALIDATION_DIR",
    "Catalog",
    "CatalogError",
    "CatalogRow",
    "read_manifest",
]


def read_manifest(directory: str | os.PathLike[str]) -> tuple[Manifest, dict[str, Any]]:
    """A checkpoint's parsed manifest and decoded metadata (kept for existing importers; the one
    reader is :func:`ckptvault.engine.manifests.read_manifest`)."""
    return manifests.read_manifest(*storage_for(directory))


class Catalog(CatalogSync, CatalogRows):
    """``Catalog(root)``: opens (creating if needed) and syncs the catalog of a tree of runs.

    ``root`` is a local directory (``root`` becomes an absolute ``Path``) or an object-store URL
    (``root`` stays the URL, normalised by its storage: a ``Path`` would fold ``s3://`` into
    ``s3:/``). An object-store prefix is never "not a directory": one with nothing under it is an
    empty tree, as prefixes exist only through the keys below them."""

    @typed_db_errors
    def __init__(self, root: str | os.PathLike[str], *, sync: bool = True) -> None:
        self.root: Path | str
        if is_url(root):
            self.storage, self.root = storage_for(root, rooted=True)
        else:
            self.root = Path(root).absolute()
            if not self.root.is_dir():
                raise CatalogError(f"{self.root} is not a directory")
            # Rooted: below the root the tree is read through real directories only.
            self.storage = storage_for(self.root, rooted=True)[0]
        self.path = catalog_database(self.root)  # ROOT/.ckptvault/catalog.sqlite, or in the cache
        self._db = self._connect()
        if sync:
            try:
                self.sync()
            except BaseException:
                self._db.close()  # never leave a connection (maybe mid-transaction) behind
                raise

    # -- database ------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        return connect(self.path)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @typed_db_errors
    def rebuild(self) -> int:
        """Drops everything and indexes the tree again; returns the number of checkpoints."""
        self._db.close()
        remove_database_files(self.path)
        self._db = self._connect()
        self.sync()
        return int(self._db.execute("SELECT count(*) FROM checkpoints").fetchone()[0])
