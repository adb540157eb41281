"""The catalog: a SQLite index of every committed checkpoint under a root, derived from manifests.

``ROOT/.ckptvault/catalog.sqlite`` (WAL) indexes runs, checkpoints, metrics, config values, tags,
sizes, provenance and validation status. It is never written by a save: every open *syncs* it with
the tree by cheap checks instead, so a checkpoint another process committed a moment ago, or one
whose process died between its commit and anything else, is found without any extra step:

* each directory that is not a checkpoint is stat-ed; only those whose mtime changed are listed
  again (a commit, an overwrite or a deletion renames an entry in its run directory, which changes
  that directory's mtime). A directory modified within the last two seconds is listed again at the
  next sync too, because file-system timestamps are coarser than two quick renames ("racy" mtimes);
* a listed checkpoint is (re)read when it is new or its manifest's mtime changed (an overwrite);
* a run's ``.ckptvault-validation`` directory is checked the same way for new validation results.

``rebuild`` deletes the database and indexes everything again; every query returns the same rows
as before (tested). The schema is versioned (``meta.schema_version``); a database of another
version is rebuilt from the manifests, which is always possible because it is derived.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from ..config import MANIFEST_NAME
from ..errors import CheckpointError, typed_os_errors
from .files import CATALOG_DIR as CATALOG_DIR
from .files import CATALOG_NAME as CATALOG_NAME
from .files import VALIDATION_DIR as VALIDATION_DIR
from .files import check_catalog_files, read_run_doc, validation_of
from .files import optional_text as _text
from .files import read_manifest as read_manifest
from .query import DEFAULT_SORT, compile_filter, compile_sort, single_metric_sort

SCHEMA_VERSION = 1
_RACY_NS = 2_000_000_000
_SCHEMA = (Path(__file__).with_name("schema.sql")).read_text()
_COLUMNS = (
    "c.id, c.path, c.run_dir, c.name, c.checkpoint_id, c.step, c.epoch, c.scope, c.created_at, c.size_bytes, "
    "c.tensor_bytes, c.num_tensors, c.run_id, c.git_commit, c.validation_level, c.validation_passed"
)


class CatalogError(CheckpointError):
    """The catalog cannot be opened or updated (not a directory, database locked for too long)."""


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _typed_db_errors(func: Callable[_P, _R]) -> Callable[_P, _R]:
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


@dataclass(frozen=True)
class CatalogRow:
    """One checkpoint as the catalog knows it (``find`` returns these)."""

    path: str  # relative to the root
    run_dir: str
    name: str
    checkpoint_id: str
    step: int
    epoch: int | None
    scope: str | None
    created_at: str
    size_bytes: int
    tensor_bytes: int
    num_tensors: int
    run_id: str | None
    git_commit: str | None
    validation_level: str | None
    validation_passed: bool | None
    metrics: dict[str, float | None]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Catalog:
    """``Catalog(root)``: opens (creating if needed) and syncs the catalog of a tree of runs."""

    @_typed_db_errors
    def __init__(self, root: str | os.PathLike[str], *, sync: bool = True) -> None:
        self.root = Path(root).absolute()
        if not self.root.is_dir():
            raise CatalogError(f"{self.root} is not a directory")
        self.path = self.root / CATALOG_DIR / CATALOG_NAME
        check_catalog_files(self.root)
        self._db = self._connect()
        if sync:
            try:
                self.sync()
            except BaseException:
                self._db.close()  # never leave a connection (maybe mid-transaction) behind
                raise

    # -- database ------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
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
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(_SCHEMA)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        return db

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @_typed_db_errors
    def rebuild(self) -> int:
        """Drops everything and indexes the tree again; returns the number of checkpoints."""
        self._db.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        self._db = self._connect()
        self.sync()
        return int(self._db.execute("SELECT count(*) FROM checkpoints").fetchone()[0])

    # -- sync ------------------------------------------------------------------------------------
    @_typed_db_errors
    def sync(self) -> None:
        """Brings the catalog up to date with the tree (see the module docstring)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")  # one syncing writer at a time; readers go on (WAL)
        try:
            self._sync()
            db.execute("COMMIT")
        except BaseException:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                db.close()  # closing discards the transaction and releases the write lock
            raise

    def _sync(self) -> None:
        db = self._db
        known = {p: (m, r) for p, m, r in db.execute("SELECT path, mtime_ns, is_run FROM dirs")}
        children: dict[str, list[str]] = {}
        for path in known:
            if path and not _is_validation(path):
                children.setdefault(_parent(path), []).append(path)
        seen: set[str] = set()
        now = time.time_ns()
        stack = [""]
        while stack:
            rel = stack.pop()
            try:
                st = os.stat(self.root / rel if rel else self.root, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if not stat.S_ISDIR(st.st_mode):
                continue
            seen.add(rel)
            previous = known.get(rel)
            if previous is not None and previous[0] == st.st_mtime_ns:
                stack.extend(children.get(rel, []))
                is_run = bool(previous[1])
            else:
                subdirs, is_run = self._list(rel)
                stack.extend(subdirs)
                mtime = -1 if now - st.st_mtime_ns < _RACY_NS else st.st_mtime_ns
                db.execute(
                    "INSERT OR REPLACE INTO dirs (path, mtime_ns, is_run) VALUES (?, ?, ?)",
                    (rel, mtime, is_run),
                )
            if is_run:
                seen.add(self._sync_validation(rel, known, now))
        for path in set(known) - seen:
            db.execute("DELETE FROM dirs WHERE path = ?", (path,))
            if not _is_validation(path):
                db.execute("DELETE FROM checkpoints WHERE run_dir = ?", (path,))
                db.execute("DELETE FROM runs WHERE run_dir = ?", (path,))

    def _list(self, rel: str) -> tuple[list[str], bool]:
        """Lists one directory: reconciles its checkpoints, returns its other subdirectories."""
        base = self.root / rel if rel else self.root
        checkpoints: dict[str, int] = {}
        subdirs: list[str] = []
        try:
            entries = list(os.scandir(base))
        except OSError:
            return [], False
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                mst = os.stat(Path(entry.path) / MANIFEST_NAME, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                subdirs.append(f"{rel}/{entry.name}" if rel else entry.name)
                continue
            if stat.S_ISREG(mst.st_mode):
                checkpoints[entry.name] = mst.st_mtime_ns
        db = self._db
        stored = {
            n: m
            for n, m in db.execute(
                "SELECT name, manifest_mtime_ns FROM checkpoints WHERE run_dir = ?", (rel,)
            )
        }
        for name in set(stored) - set(checkpoints):
            db.execute("DELETE FROM checkpoints WHERE run_dir = ? AND name = ?", (rel, name))
        changed = [n for n, m in checkpoints.items() if stored.get(n) != m]
        if checkpoints:
            self._index_run(rel)
        now = time.time_ns()
        for name in sorted(changed):
            # A manifest written within the racy window is read again next time: an overwrite in
            # the same timestamp tick would otherwise keep the old manifest's mtime.
            mtime = checkpoints[name]
            self._index_checkpoint(rel, name, -1 if now - mtime < _RACY_NS else mtime)
        if not checkpoints:
            db.execute("DELETE FROM runs WHERE run_dir = ?", (rel,))
        return subdirs, bool(checkpoints)

    def _sync_validation(self, rel: str, known: Mapping[str, tuple[int, int]], now: int) -> str:
        path = f"{rel}/{VALIDATION_DIR}" if rel else VALIDATION_DIR
        try:
            mtime = os.stat(self.root / path, follow_symlinks=False).st_mtime_ns
        except (FileNotFoundError, NotADirectoryError):
            mtime = 0
        previous = known.get(path)
        if previous is None or previous[0] != mtime:
            for cid, name, checkpoint_id in self._db.execute(
                "SELECT id, name, checkpoint_id FROM checkpoints WHERE run_dir = ?", (rel,)
            ).fetchall():
                level, passed = validation_of(self.root / rel / name, checkpoint_id)
                self._db.execute(
                    "UPDATE checkpoints SET validation_level = ?, validation_passed = ? WHERE id = ?",
                    (level, passed, cid),
                )
            recorded = -1 if now - mtime < _RACY_NS else mtime
            self._db.execute(
                "INSERT OR REPLACE INTO dirs (path, mtime_ns, is_run) VALUES (?, ?, 0)", (path, recorded)
            )
        return path

    def _index_run(self, rel: str) -> None:
        run = read_run_doc(self.root / rel)
        git = run.get("git")
        self._db.execute(
            "INSERT OR REPLACE INTO runs (run_dir, run_id, config_json, git_commit, data_version) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                rel,
                _text(run.get("run_id")),
                json.dumps(run.get("config"), default=str),
                _text(git.get("commit")) if isinstance(git, dict) else None,
                _text(run.get("data_version")),
            ),
        )

    def _index_checkpoint(self, rel: str, name: str, manifest_mtime_ns: int) -> None:
        """Indexes one checkpoint; a manifest whose values SQLite or JSON cannot hold (a step or size
        beyond 64 bits, a metric float() overflows, config keys json cannot order) is left out like
        a damaged one instead of failing the whole sync."""
        db = self._db
        db.execute("SAVEPOINT index_checkpoint")
        try:
            self._insert_checkpoint(rel, name, manifest_mtime_ns)
        except (OverflowError, TypeError, ValueError):
            db.execute("ROLLBACK TO index_checkpoint")
            db.execute("DELETE FROM checkpoints WHERE run_dir = ? AND name = ?", (rel, name))
        finally:
            db.execute("RELEASE index_checkpoint")

    def _insert_checkpoint(self, rel: str, name: str, manifest_mtime_ns: int) -> None:
        db = self._db
        db.execute("DELETE FROM checkpoints WHERE run_dir = ? AND name = ?", (rel, name))
        directory = self.root / rel / name
        try:
            manifest, metadata = read_manifest(directory)
        except (CheckpointError, OSError, ValueError):
            return  # not readable now (damaged, newer format): not a checkpoint `find` can return
        git = metadata.get("git")
        config = metadata.get("config")
        level, passed = validation_of(directory, manifest.checkpoint_id)
        epoch = metadata.get("epoch")
        cursor = db.execute(
            "INSERT INTO checkpoints (path, run_dir, name, checkpoint_id, step, epoch, scope, created_at, "
            "size_bytes, tensor_bytes, num_tensors, run_id, git_commit, config_json, validation_level, "
            "validation_passed, manifest_mtime_ns) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                f"{rel}/{name}" if rel else name,
                rel,
                name,
                manifest.checkpoint_id,
                manifest.step,
                epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None,
                _text(metadata.get("scope")),
                manifest.created_at,
                manifest.total_bytes,
                manifest.tensor_bytes,
                len(manifest.tensors),
                _text(metadata.get("run_id")),
                _text(git.get("commit")) if isinstance(git, dict) else None,
                json.dumps(config, default=str, sort_keys=True) if config is not None else None,
                level,
                passed,
                manifest_mtime_ns,
            ),
        )
        cid = cursor.lastrowid
        metrics = metadata.get("metrics")
        if isinstance(metrics, dict):
            db.executemany(
                "INSERT OR REPLACE INTO metrics (checkpoint, name, value) VALUES (?, ?, ?)",
                [
                    (cid, str(k), v)
                    for k, v in ((k, _metric(v)) for k, v in metrics.items())
                    if v is not _SKIP
                ],
            )
        if config is not None:
            db.executemany(
                "INSERT OR REPLACE INTO config (checkpoint, key, value, num) VALUES (?, ?, ?, ?)",
                [(cid, key, json.dumps(value, default=str), _num(value)) for key, value in _flatten(config)],
            )
        tags = metadata.get("tags")
        if isinstance(tags, dict):
            db.executemany(
                "INSERT OR REPLACE INTO tags (checkpoint, key, value) VALUES (?, ?, ?)",
                [
                    (cid, str(k), v if isinstance(v, str) else json.dumps(v, default=str))
                    for k, v in tags.items()
                ],
            )

    # -- queries ---------------------------------------------------------------------------------
    @_typed_db_errors
    def find(self, where: str = "", *, sort: str = "", limit: int | None = None) -> list[CatalogRow]:
        """Checkpoints matching a filter (``'val_acc > 0.9 and step >= 1000'``), sorted and limited.

        The filter is parsed and compiled to parameterised SQL (``catalog/query.py``); text never
        becomes SQL. Raises :class:`~ckptvault.catalog.query.QueryError` for a bad filter.
        """
        condition, params = compile_filter(where)
        order, order_params = compile_sort(sort)
        by_metric = single_metric_sort(sort) if limit is not None else None
        if by_metric is not None:
            return self._find_by_metric(condition, params, by_metric, int(limit or 0))
        sql = f"SELECT {_COLUMNS} FROM checkpoints c WHERE {condition} ORDER BY {order}"
        args: list[Any] = [*params, *order_params]
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        return self._rows(self._db.execute(sql, args).fetchall())

    def _find_by_metric(
        self, condition: str, params: list[Any], by: tuple[str, bool], limit: int
    ) -> list[CatalogRow]:
        """A limited find sorted by one metric: walks the (name, value) index in order and stops at
        the limit; checkpoints without the metric (or NaN) follow, in the default order, as in
        ``compile_sort``'s NULLs-last rule."""
        name, descending = by
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM metrics s JOIN checkpoints c ON c.id = s.checkpoint "
            f"WHERE s.name = ? AND s.value IS NOT NULL AND ({condition}) "
            f"ORDER BY s.value{' DESC' if descending else ''}, {DEFAULT_SORT} LIMIT ?",
            [name, *params, limit],
        ).fetchall()
        if len(rows) < limit:
            rows += self._db.execute(
                f"SELECT {_COLUMNS} FROM checkpoints c WHERE ({condition}) AND c.id NOT IN "
                "(SELECT m.checkpoint FROM metrics m WHERE m.name = ? AND m.value IS NOT NULL) "
                f"ORDER BY {DEFAULT_SORT} LIMIT ?",
                [*params, name, limit - len(rows)],
            ).fetchall()
        return self._rows(rows)

    def _rows(self, rows: list[Any]) -> list[CatalogRow]:
        metrics: dict[int, dict[str, float | None]] = {r[0]: {} for r in rows}
        if rows:
            for chunk in _chunks([r[0] for r in rows], 500):
                marks = ",".join("?" * len(chunk))
                for cid, name, value in self._db.execute(
                    f"SELECT checkpoint, name, value FROM metrics WHERE checkpoint IN ({marks})", chunk
                ):
                    metrics[cid][name] = value
        return [
            CatalogRow(
                path=r[1],
                run_dir=r[2],
                name=r[3],
                checkpoint_id=r[4],
                step=r[5],
                epoch=r[6],
                scope=r[7],
                created_at=r[8],
                size_bytes=r[9],
                tensor_bytes=r[10],
                num_tensors=r[11],
                run_id=r[12],
                git_commit=r[13],
                validation_level=r[14],
                validation_passed=None if r[15] is None else bool(r[15]),
                metrics=metrics[r[0]],
            )
            for r in rows
        ]

    @_typed_db_errors
    def runs(self) -> list[dict[str, Any]]:
        return [
            {
                "run_dir": r[0],
                "run_id": r[1],
                "config": json.loads(r[2]) if r[2] else None,
                "git_commit": r[3],
            }
            for r in self._db.execute(
                "SELECT run_dir, run_id, config_json, git_commit FROM runs ORDER BY run_dir"
            )
        ]

    @_typed_db_errors
    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM checkpoints").fetchone()[0])

    def absolute(self, row: CatalogRow) -> Path:
        return self.root / row.path


_SKIP = object()


def _metric(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _SKIP
    number = float(value)
    return None if math.isnan(number) else number


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(float(value)):
        return float(value)
    return None


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    elif prefix:
        yield prefix, value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _is_validation(path: str) -> bool:
    return path == VALIDATION_DIR or path.endswith("/" + VALIDATION_DIR)


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
