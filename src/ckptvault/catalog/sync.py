"""Syncing the catalog with the tree: which directories to list again, and indexing a checkpoint.

Why a module of its own: this is the only code that writes the catalog's rows, and all of it runs
inside one ``BEGIN IMMEDIATE`` transaction of :meth:`CatalogSync.sync` (the cheap mtime checks the
:mod:`ckptvault.catalog.store` docstring describes). :class:`~ckptvault.catalog.store.Catalog`
inherits it; the reading side (:mod:`ckptvault.catalog.rows`) never needs it.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import stat
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..config import MANIFEST_NAME
from ..errors import CheckpointError
from .database import typed_db_errors
from .files import VALIDATION_DIR, read_manifest, read_run_doc, validation_of
from .files import optional_text as _text

_RACY_NS = 2_000_000_000


class CatalogSync:
    """The syncing half of :class:`~ckptvault.catalog.store.Catalog` (its ``root`` and ``_db``)."""

    root: Path
    _db: sqlite3.Connection

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
