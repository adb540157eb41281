"""Syncing the catalog with the tree: which directories to list again, and indexing a checkpoint.

Why a module of its own: this is the only code that writes the catalog's rows, and all of it runs
inside one ``BEGIN IMMEDIATE`` transaction of :meth:`CatalogSync.sync` (the cheap checks the
:mod:`ckptvault.catalog.store` docstring describes). :class:`~ckptvault.catalog.store.Catalog`
inherits it; the reading side (:mod:`ckptvault.catalog.rows`) never needs it.

The tree is seen only through the :class:`~ckptvault.storage.base.Storage` protocol: ``list`` for
a directory's children (checkpoints with their commit time), ``change_token`` to skip a directory
whose listing cannot have changed, :class:`~ckptvault.engine.rundir.RunDirectory` for run.json and
validation results, and :func:`~ckptvault.engine.manifests.read_manifest` for manifests. The
``dirs.mtime_ns`` column holds a directory's change token (SQLite keeps the text as it is given),
or -1 for "list again next time"; ``checkpoints.manifest_mtime_ns`` holds the manifest's commit
time in nanoseconds, as listed.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..engine.manifests import read_manifest
from ..engine.rundir import RunDirectory
from ..errors import CheckpointError
from ..policy.metrics import as_number
from ..storage.base import Storage
from ..storage.resolve import split_location
from .database import typed_db_errors
from .files import VALIDATION_DIR, validation_of
from .files import optional_text as _text

# Timestamps may be coarser than two quick changes ("racy"): what changed within this many
# seconds of being looked at is looked at again at the next sync.
_RACY_S = 2.0
_ABSENT = "absent"  # the token recorded for a run without a validation directory
_LIST_AGAIN = -1


class CatalogSync:
    """The syncing half of :class:`~ckptvault.catalog.store.Catalog` (its ``root``, ``storage``
    and ``_db``)."""

    root: Path | str  # a local directory, or an object-store URL (kept a string)
    storage: Storage
    _db: sqlite3.Connection
    _listed: dict[str, dict[str, float]]  # during a sync: directory -> {child name: modified}

    @typed_db_errors
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

    def _key(self, rel: str) -> str:
        return self.storage.join(str(self.root), *rel.split("/")) if rel else str(self.root)

    def _sync(self) -> None:
        db = self._db
        known = {p: (m, r) for p, m, r in db.execute("SELECT path, mtime_ns, is_run FROM dirs")}
        children: dict[str, list[str]] = {}
        for path in known:
            if path and not _is_validation(path):
                children.setdefault(_parent(path), []).append(path)
        seen: set[str] = set()
        self._listed = {}
        stack = [""]
        while stack:
            rel = stack.pop()
            # The token is taken before the listing: a change in between is in the listing and
            # makes the next token differ, never the other way round.
            token = self.storage.change_token(self._key(rel))
            if token is None:
                continue
            seen.add(rel)
            previous = known.get(rel)
            if previous is not None and previous[0] == token:
                stack.extend(children.get(rel, []))
                is_run = bool(previous[1])
            else:
                subdirs, is_run = self._list(rel)
                stack.extend(subdirs)
                db.execute(
                    "INSERT OR REPLACE INTO dirs (path, mtime_ns, is_run) VALUES (?, ?, ?)",
                    (rel, self._settled(rel, token), is_run),
                )
            if is_run:
                seen.add(self._sync_validation(rel, known))
        for path in set(known) - seen:
            db.execute("DELETE FROM dirs WHERE path = ?", (path,))
            if not _is_validation(path):
                db.execute("DELETE FROM checkpoints WHERE run_dir = ?", (path,))
                db.execute("DELETE FROM runs WHERE run_dir = ?", (path,))

    def _settled(self, rel: str, token: str) -> str | int:
        """What to record for a directory just looked at: its token, or "list again" when it was
        modified within the racy window (a second change in the same timestamp tick would leave
        the token as it is). Its modification time comes from its parent's listing (taken once
        per sync); one that cannot be found is looked at again too."""
        above, root_name = split_location(self.root)  # a URL split at its last "/", never by Path
        parent, _, name = rel.rpartition("/") if rel else ("..", "", "")
        if parent not in self._listed:
            key = self._key(parent) if parent != ".." else above
            try:  # a bucket's root has no parent to list (no URL names one): looked at again
                self._listed[parent] = {e.name: e.modified for e in self.storage.list(key)}
            except OSError:
                self._listed[parent] = {}
        modified = self._listed[parent].get(name or root_name)
        if modified is None or time.time() - modified < _RACY_S:
            return _LIST_AGAIN
        return token

    def _list(self, rel: str) -> tuple[list[str], bool]:
        """Lists one directory: reconciles its checkpoints, returns its other subdirectories."""
        checkpoints: dict[str, int] = {}
        subdirs: list[str] = []
        try:
            entries = self.storage.list(self._key(rel))
        except OSError:
            return [], False
        self._listed[rel] = {e.name: e.modified for e in entries}
        for entry in entries:
            if entry.name.startswith("."):  # staging areas, trash, the run's bookkeeping
                continue
            if entry.kind == "checkpoint":
                checkpoints[entry.name] = int(entry.modified * 1e9)
            elif entry.kind == "directory":
                subdirs.append(f"{rel}/{entry.name}" if rel else entry.name)
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
            # the same timestamp tick would otherwise keep the old manifest's time.
            mtime = checkpoints[name]
            self._index_checkpoint(rel, name, _LIST_AGAIN if now - mtime < _RACY_S * 1e9 else mtime)
        if not checkpoints:
            db.execute("DELETE FROM runs WHERE run_dir = ?", (rel,))
        return subdirs, bool(checkpoints)

    def _run(self, rel: str) -> RunDirectory:
        return RunDirectory(self._key(rel), self.storage)

    def _sync_validation(self, rel: str, known: Mapping[str, tuple[Any, int]]) -> str:
        path = f"{rel}/{VALIDATION_DIR}" if rel else VALIDATION_DIR
        token = self.storage.change_token(self._key(path))
        previous = known.get(path)
        if previous is None or previous[0] != (token if token is not None else _ABSENT):
            run = self._run(rel)
            for cid, name, checkpoint_id in self._db.execute(
                "SELECT id, name, checkpoint_id FROM checkpoints WHERE run_dir = ?", (rel,)
            ).fetchall():
                level, passed = validation_of(run, name, checkpoint_id)
                self._db.execute(
                    "UPDATE checkpoints SET validation_level = ?, validation_passed = ? WHERE id = ?",
                    (level, passed, cid),
                )
            recorded = self._settled(path, token) if token is not None else _ABSENT
            self._db.execute(
                "INSERT OR REPLACE INTO dirs (path, mtime_ns, is_run) VALUES (?, ?, 0)", (path, recorded)
            )
        return path

    def _index_run(self, rel: str) -> None:
        run = self._run(rel).read_run_or_empty()
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
        try:
            manifest, metadata = read_manifest(self.storage, self._key(f"{rel}/{name}" if rel else name))
        except (CheckpointError, OSError, ValueError):
            return  # not readable now (damaged, newer format): not a checkpoint `find` can return
        git = metadata.get("git")
        config = metadata.get("config")
        level, passed = validation_of(self._run(rel), name, manifest.checkpoint_id)
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


_SKIP = object()


def _metric(value: Any) -> Any:
    """A metric column's value by the package's one rule (policy.metrics); NaN is stored as NULL
    (unranked), a non-number is left out. An int beyond any float raises OverflowError: such a
    manifest is hostile and the sync skips the whole checkpoint (corpus: catalog_metric_huge_int)."""
    number = as_number(value)
    if number is None:
        return _SKIP
    return None if math.isnan(number) else number


def _num(value: Any) -> float | None:
    """A config value's number column (queries such as ``config.amp = 1``): unlike a metric, a
    bool counts as 0/1 here."""
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
