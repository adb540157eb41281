"""The catalog's database file: its schema, how it is opened, and the errors it raises.

Why a module of its own: opening the SQLite file (WAL, the pragmas, dropping a database of another
schema version and creating it anew) and turning ``sqlite3``/``OSError`` failures into
:class:`CatalogError` are the same for the syncing and the reading halves of
:class:`~ckptvault.catalog.store.Catalog`; neither needs the other to know them.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

from ..errors import CheckpointError, typed_os_errors
from ..storage.catalogfiles import remove_database_files

SCHEMA_VERSION = 1
_SCHEMA = (Path(__file__).with_name("schema.sql")).read_text()


class CatalogError(CheckpointError):
    """The catalog cannot be opened or updated (not a directory, database locked for too long)."""


_P = ParamSpec("_P")
_R = TypeVar("_R")


def typed_db_errors(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """A public catalog call raises CatalogError for a failing database (a full disk, an I/O error
    or a lock held too long inside SQLite) and StorageError for a failing file system -- never a raw
    ``sqlite3.Error``/``OSError``."""
    inner = typed_os_errors(func)

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return inner(*args, **kwargs)
        except sqlite3.Error as exc:
            raise CatalogError(f"catalog database: {exc}") from exc

    return wrapper


def connect(path: Path) -> sqlite3.Connection:
    """Opens the catalog database at ``path``, creating it (or recreating one of another schema
    version, or a damaged one) with the current schema."""
    db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    row = None
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # derived data: a lost tail is re-synced, never wrong
        db.execute("PRAGMA foreign_keys=ON")
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError:  # no such table, or a damaged file that is not a database
        row = None
    if row is None or row[0] != str(SCHEMA_VERSION):
        # No migration can be wrong about derived data: an older (or damaged) catalog is
        # dropped and indexed again from the manifests.
        db.close()
        remove_database_files(path)
        db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(_SCHEMA)
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    return db
