"""Reading the catalog: :class:`CatalogRow` and the queries that return rows (``find``, ``runs``).

Why a module of its own: reading only turns a compiled filter (:mod:`ckptvault.catalog.query`)
into SELECTs over the tables the sync filled and those rows into :class:`CatalogRow` objects; it
never writes. :class:`~ckptvault.catalog.store.Catalog` inherits :class:`CatalogRows`.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..storage.base import Storage
from .database import typed_db_errors
from .query import DEFAULT_SORT, compile_filter, compile_sort, single_metric_sort
from .query_sql import correlated

_COLUMNS = (
    "c.id, c.path, c.run_dir, c.name, c.checkpoint_id, c.step, c.epoch, c.scope, c.created_at, c.size_bytes, "
    "c.tensor_bytes, c.num_tensors, c.run_id, c.git_commit, c.validation_level, c.validation_passed"
)


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


class CatalogRows:
    """The reading half of :class:`~ckptvault.catalog.store.Catalog` (its ``root`` and ``_db``)."""

    root: Path | str  # a local directory, or an object-store URL (kept a string)
    storage: Storage
    _db: sqlite3.Connection

    @typed_db_errors
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
            f"WHERE s.name = ? AND s.value IS NOT NULL AND ({correlated(condition)}) "
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

    @typed_db_errors
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

    @typed_db_errors
    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM checkpoints").fetchone()[0])

    def absolute(self, row: CatalogRow) -> Path | str:
        """Where ``row``'s checkpoint is: a path under a local root, a URL under an object-store one
        (``row.path`` is relative to the root, ``/``-separated, either way)."""
        if isinstance(self.root, Path):
            return self.root / row.path
        return self.storage.join(self.root, *row.path.split("/"))


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
