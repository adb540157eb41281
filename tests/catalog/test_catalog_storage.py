"""The catalog over the storage protocol (issue 14): a sync skips what the change tokens say did
not change, and a symlink planted in the tree is never followed into someone else's directory."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

import ckptvault as cv
from ckptvault.catalog import Catalog
from ckptvault.storage.base import ReadHandle, Storage


def save(path: Path, step: int) -> cv.CheckpointInfo:
    return cv.save(path, {"w": np.zeros(2, dtype=np.float32)}, metadata={"step": step})


def age(root: Path, seconds: float = 100.0) -> None:
    """Moves every modification time under ``root`` into the past: nothing is within the racy
    window, so a sync has no reason to look at anything again."""
    when = time.time() - seconds
    for directory, _dirs, files in os.walk(root):
        for name in files:
            os.utime(os.path.join(directory, name), (when, when), follow_symlinks=False)
        os.utime(directory, (when, when))


class Counting:
    """A storage that counts the calls that read the tree (everything else is the inner one's)."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.opened: list[str] = []
        self.listed: list[str] = []

    def open(self, target: str) -> ReadHandle:
        self.opened.append(target)
        return self.inner.open(target)

    def list(self, prefix: str) -> Any:
        self.listed.append(prefix)
        return self.inner.list(prefix)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_sync_with_nothing_changed_reads_no_manifest_and_lists_nothing(tmp_path: Path) -> None:
    for run in ("a/run1", "a/run2", "b"):
        for step in (1, 2):
            save(tmp_path / run / f"step_{step}", step)
    with Catalog(tmp_path) as catalog:
        assert catalog.count() == 6
        age(tmp_path)  # the catalog's own directory included
        catalog.sync()  # the tokens utime changed are taken once more, outside the racy window
        counting = Counting(catalog.storage)
        catalog.storage = counting  # type: ignore[assignment]
        catalog.sync()
        assert counting.opened == [] and counting.listed == []

        save(tmp_path / "a" / "run2" / "step_3", 3)  # one new checkpoint in one run
        catalog.sync()
        assert [Path(p).relative_to(tmp_path).as_posix() for p in counting.opened] == ["a/run2/step_3"]
        assert catalog.count() == 7

        age(tmp_path)  # settled again: the next sync lists that run once more, reads nothing
        catalog.sync()
        counting.opened.clear(), counting.listed.clear()
        catalog.sync()
        assert counting.opened == [] and counting.listed == []


def test_a_symlinked_run_or_checkpoint_is_never_indexed(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    save(root / "run" / "step_1", 1)
    save(elsewhere / "run" / "step_2", 2)
    (root / "linked-run").symlink_to(elsewhere / "run")
    (root / "run" / "step_2").symlink_to(elsewhere / "run" / "step_2")
    with Catalog(root) as catalog:
        assert [row.path for row in catalog.find("")] == ["run/step_1"]
