"""The catalog (``Catalog(root)``, ``ckptvault find``): a SQLite index derived from the manifests.

What is checked, on real checkpoints written by ``ckptvault.save``:

* acceptance: a catalog built incrementally while several runs (nested too) were written, deleted
  from and overwritten answers a battery of queries exactly as a catalog rebuilt from scratch does
  (same rows, same order), and the answers are the right ones (checked against the metadata the
  test wrote);
* sync: checkpoints committed by another process (even one killed right after its commit), deleted
  ones, overwritten ones and quick successive changes in one run directory are all seen by the next
  sync of an already open catalog;
* validation results beside a run; damaged or foreign directories; a catalog of another schema
  version, a damaged or a deleted catalog file;
* the CLI ``ckptvault find`` and its refusal of injection attempts.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import ckptvault as cv
from ckptvault.catalog import Catalog, CatalogRow
from ckptvault.catalog.query import QueryError
from ckptvault.catalog.store import CATALOG_DIR, CATALOG_NAME
from ckptvault.cli.main import app
from ckptvault.validation import ValidationResult, record_result


def save(path: Path, step: int, *, overwrite: bool = False, **metadata: Any) -> cv.CheckpointInfo:
    """A tiny checkpoint whose manifest carries ``step`` and the given metadata keys."""
    return cv.save(path, {"w": torch.zeros(2)}, metadata={"step": step, **metadata}, overwrite=overwrite)


def catalog_files(root: Path) -> list[Path]:
    base = root / CATALOG_DIR / CATALOG_NAME
    return [Path(f"{base}{suffix}") for suffix in ("", "-wal", "-shm")]


def delete_catalog(root: Path) -> None:
    for path in catalog_files(root):
        path.unlink(missing_ok=True)


def paths(rows: list[CatalogRow]) -> list[str]:
    return [r.path for r in rows]


def find_paths(root: Path, where: str = "", **kwargs: Any) -> list[str]:
    with Catalog(root) as catalog:
        return paths(catalog.find(where, **kwargs))


# --------------------------------------------------------------------------- acceptance: rebuild

RUNS: dict[str, dict[str, Any]] = {
    "a/run1": {
        "run_id": "r1",
        "git": {"commit": "abc1234aaaa"},
        "config": {"lr": 0.001, "optimizer": {"name": "adam"}, "batch": 32},
    },
    "a/run3": {
        "run_id": "r3",
        "git": {"commit": "abc1234aaaa"},
        "config": {"lr": 0.01, "optimizer": {"name": "sgd"}, "batch": 64},
    },
    "b/c/run2": {
        "run_id": "r2",
        "git": {"commit": "def5678bbbb"},
        "config": {"lr": 0.1, "optimizer": {"name": "adam"}, "batch": 64, "amp": True},
    },
    "run4": {"run_id": "r4", "config": {"lr": 0.001, "optimizer": {"name": "adamw"}, "batch": 16}},
}
PER_RUN = 70


def _metadata(rng: random.Random, run: str, step: int) -> dict[str, Any]:
    loss = math.nan if step % 17 == 0 else round(rng.uniform(0.05, 3.0), 4)
    tags: dict[str, Any] = {"stage": "warmup" if step < 10 else "main"}
    if rng.random() < 0.2:
        tags["best"] = "yes"
    return {
        **RUNS[run],
        "epoch": step // 10,
        "scope": "full" if step % 3 else "weights",
        # val_acc rounded to two digits: many ties, which the sort must break the same way every time
        "metrics": {"val_acc": round(rng.random(), 2), "loss": loss, "lr": RUNS[run]["config"]["lr"]},
        "tags": tags,
    }


def build_tree(root: Path) -> tuple[dict[str, dict[str, Any]], str]:
    """Writes the runs while an open catalog syncs now and then (the catalog is built incrementally),
    deleting and overwriting some checkpoints on the way. Returns {path: metadata} of the checkpoints
    that remain, and a ``created`` time between the first and second half of them."""
    rng = random.Random(1234)
    live: dict[str, dict[str, Any]] = {}
    created: list[str] = []
    with Catalog(root) as catalog:
        for i in range(PER_RUN):
            for run in RUNS:
                step = i + 1
                rel = f"{run}/step_{step:08d}"
                meta = _metadata(rng, run, step)
                info = save(root / rel, step, **meta)
                live[rel] = meta
                created.append(info.created_at)
            if i % 9 == 4:
                catalog.sync()
            if i % 13 == 7:  # a deletion and an overwrite with other metrics
                gone = f"a/run3/step_{i:08d}"
                shutil.rmtree(root / gone)
                del live[gone]
                redo = f"b/c/run2/step_{i - 2:08d}"
                meta = _metadata(rng, "b/c/run2", i - 2)
                save(root / redo, i - 2, overwrite=True, **meta)
                live[redo] = meta
        # a checkpoint straight under the root (run_dir "") and one with no metadata at all
        save(root / "loose", 5, metrics={"val_acc": 0.95})
        live["loose"] = {"metrics": {"val_acc": 0.95}}
        cv.save(root / "a" / "bare", {"w": torch.zeros(1)})
        live["a/bare"] = {}
        catalog.sync()
    created.sort()
    return live, created[len(created) // 2]


def battery(created_mid: str) -> list[tuple[str, str, int | None]]:
    """(filter, sort, limit): filters on metrics, step, run, tags, config, git, created; sorts; limits."""
    return [
        ("", "", None),
        ("val_acc > 0.9", "", None),
        ("val_acc > 0.9", "-val_acc", 5),
        ("val_acc > 0.5 and step >= 20", "-val_acc", None),
        ("val_acc >= 0.3 and val_acc < 0.6 or loss > 2.5", "loss", 20),
        ("loss is nan", "", None),
        ("loss is null", "-step", None),
        ("not (loss > 1)", "-loss", None),
        ("step in (1, 2, 3) and not run = 'a/run1'", "", None),
        ("step >= 60", "-step", 7),
        ("epoch = 3", "val_acc", None),
        ("run = 'b/c/run2'", "-val_acc,step", None),
        ("run ~ 'a/*'", "-step", 10),
        ("run_id in ('r1', 'r4')", "loss", 15),
        ("scope = 'weights'", "", None),
        ("tag.stage = 'warmup'", "", None),
        ("tag.best is not null", "-val_acc", None),
        ("tags.best = 'yes' and val_acc > 0.5", "tag.stage,-step", None),
        ("config.optimizer.name = 'adam'", "-val_acc", 10),
        ("config.lr < 0.01", "config.lr,-val_acc", None),
        ("config.batch in (32, 16)", "", None),
        ("config.amp = true", "", None),
        ("config.optimizer.name ~ 'adam*'", "-config.batch,step", None),
        ("git = 'def5678bbbb'", "", None),
        ("git ~ 'abc1*'", "-val_acc", 3),
        ("git is null", "", None),
        (f"created > '{created_mid}'", "created", None),
        (f"created <= '{created_mid}' and val_acc > 0.8", "-created", None),
        ("metric.lr = 0.1", "-metrics.val_acc", None),
        ("", "-val_acc", None),
        ("", "-size,-step", 25),
        ("", "run,-step", 50),
        ("", "", 1),
    ]


def answers(catalog: Catalog, queries: list[tuple[str, str, int | None]]) -> list[list[dict[str, Any]]]:
    out = []
    for where, sort, limit in queries:
        rows = catalog.find(where, sort=sort, limit=limit)
        # NaN != NaN: compare metrics through JSON (NaN is stored as NULL anyway)
        out.append([json.loads(json.dumps(r.as_dict(), default=str)) for r in rows])
    return out


def _val(meta: dict[str, Any], name: str) -> float | None:
    value = meta.get("metrics", {}).get(name)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _key(rel: str) -> tuple[str, int]:
    run, _, name = rel.rpartition("/")
    return run, int(name.split("_")[1]) if name.startswith("step_") else 5


def test_rebuilt_catalog_answers_every_query_like_the_incremental_one(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    live, created_mid = build_tree(root)
    queries = battery(created_mid)

    with Catalog(root) as catalog:
        assert catalog.count() == len(live)
        before = answers(catalog, queries)
        runs_before = catalog.runs()
        # The answers are the right ones, not just stable ones.
        assert sorted(paths(catalog.find(""))) == sorted(live)
        assert set(paths(catalog.find("val_acc > 0.9"))) == {
            p for p, m in live.items() if (_val(m, "val_acc") or 0) > 0.9
        }
        top = [p for p, m in live.items() if _val(m, "val_acc") is not None]
        top.sort(key=lambda p: (-(_val(live[p], "val_acc") or 0), *_key(p)))
        assert paths(catalog.find("", sort="-val_acc"))[: len(top)] == top
        assert set(paths(catalog.find("loss is nan"))) == {
            p for p, m in live.items() if isinstance(m.get("metrics", {}).get("loss"), float)
            and math.isnan(m["metrics"]["loss"])
        }  # fmt: skip
        assert set(paths(catalog.find("config.optimizer.name = 'adam'"))) == {
            p for p, m in live.items() if m.get("config", {}).get("optimizer", {}).get("name") == "adam"
        }
        assert set(paths(catalog.find("git ~ 'abc1*'"))) == {
            p for p, m in live.items() if m.get("git", {}).get("commit", "").startswith("abc1")
        }
        assert set(paths(catalog.find("tag.best is not null"))) == {
            p for p, m in live.items() if "best" in m.get("tags", {})
        }
        assert paths(catalog.find("run = 'b/c/run2'", sort="step")) == sorted(
            (p for p in live if p.startswith("b/c/run2/")), key=_key
        )
        half = catalog.find(f"created > '{created_mid}'")
        assert 0 < len(half) < len(live)
        overwritten = catalog.find("path = 'b/c/run2/step_00000005'")[0]
        assert overwritten.metrics["val_acc"] == live["b/c/run2/step_00000005"]["metrics"]["val_acc"]
        assert [r.path for r in catalog.find("run = ''")] == ["loose"]
        assert not catalog.find("path = 'a/run3/step_00000007'")  # deleted

    # 1. the catalog files deleted: reopening indexes everything again
    delete_catalog(root)
    with Catalog(root) as catalog:
        assert answers(catalog, queries) == before
        assert catalog.runs() == runs_before
    # 2. rebuild() on an open catalog
    with Catalog(root) as catalog:
        assert catalog.rebuild() == len(live)
        assert answers(catalog, queries) == before
    # 3. the CLI's rebuild
    result = CliRunner().invoke(app, ["catalog", "rebuild", str(root)])
    assert result.exit_code == 0, result.output
    assert f"indexed {len(live)} checkpoints" in result.output
    with Catalog(root) as catalog:
        assert answers(catalog, queries) == before


def test_same_step_checkpoints_of_one_run_keep_their_order_after_rebuild(tmp_path: Path) -> None:
    """The manager writes ``step_N`` and ``weights_N`` into one run with the same step; written
    weights-first they are indexed in that order, but a rebuild indexes names in sorted order."""
    run = tmp_path / "run"
    save(run / "weights_00000005", 5, scope="weights", metrics={"loss": 1.0})
    with Catalog(tmp_path) as catalog:
        save(run / "step_00000005", 5, scope="full", metrics={"loss": 1.0})
        catalog.sync()
        before = [
            paths(catalog.find("")),
            paths(catalog.find("", sort="loss")),
            paths(catalog.find("", limit=1)),
        ]
        catalog.rebuild()
        after = [
            paths(catalog.find("")),
            paths(catalog.find("", sort="loss")),
            paths(catalog.find("", limit=1)),
        ]
    assert after == before


# --------------------------------------------------------------------------- sync

_SAVE_SNIPPET = textwrap.dedent(
    """
    import os, signal, sys, json
    import numpy as np
    import ckptvault
    path, step, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ckptvault.save(path, {"w": np.zeros(2)}, metadata={"step": step, "metrics": {"val_acc": 0.5}})
    if how == "exit":
        os._exit(0)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


def _save_elsewhere(path: Path, step: int, how: str = "return") -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", _SAVE_SNIPPET, str(path), str(step), how])


def test_an_open_catalog_sees_commits_deletions_and_overwrites_at_the_next_sync(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "exp"
    save(run / "step_00000001", 1, metrics={"val_acc": 0.1})
    save(run / "step_00000002", 2, metrics={"val_acc": 0.2})
    with Catalog(tmp_path) as catalog:
        assert paths(catalog.find("")) == ["runs/exp/step_00000001", "runs/exp/step_00000002"]

        # committed by another process a moment ago
        done = _save_elsewhere(run / "step_00000003", 3)
        assert done.wait(timeout=60) == 0
        catalog.sync()
        assert paths(catalog.find("step = 3")) == ["runs/exp/step_00000003"]
        assert catalog.find("step = 3")[0].metrics == {"val_acc": 0.5}

        # deleted
        shutil.rmtree(run / "step_00000001")
        catalog.sync()
        assert paths(catalog.find("")) == ["runs/exp/step_00000002", "runs/exp/step_00000003"]

        # overwritten with other metrics (a new checkpoint_id too)
        old_id = catalog.find("step = 2")[0].checkpoint_id
        info = save(run / "step_00000002", 2, overwrite=True, metrics={"val_acc": 0.99, "loss": 0.5})
        catalog.sync()
        row = catalog.find("step = 2")[0]
        assert row.metrics == {"val_acc": 0.99, "loss": 0.5}
        assert row.checkpoint_id == info.checkpoint_id != old_id
        assert paths(catalog.find("val_acc > 0.9")) == ["runs/exp/step_00000002"]

        # a whole new run in a new nested directory, and a whole run removed
        save(tmp_path / "runs" / "deep" / "er" / "run" / "s1", 1)
        catalog.sync()
        assert catalog.count() == 3
        shutil.rmtree(tmp_path / "runs" / "exp")
        catalog.sync()
        assert paths(catalog.find("")) == ["runs/deep/er/run/s1"]
        assert [r["run_dir"] for r in catalog.runs()] == ["runs/deep/er/run"]


def _recent(st: os.stat_result) -> None:
    """The simulation of coarse timestamps holds only while the faked mtime is under two seconds old;
    after that a real coarse file system would have given the change a newer mtime."""
    if time.time_ns() - st.st_mtime_ns > 1_500_000_000:
        pytest.skip("the machine stalled for seconds: the coarse-timestamp simulation does not hold")


def test_two_quick_changes_in_one_run_directory_are_both_seen(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save(run / "a", 1)
    with Catalog(tmp_path) as catalog:
        assert catalog.count() == 1
        save(run / "b", 2)  # milliseconds after the sync listed the directory
        catalog.sync()
        save(run / "c", 3)
        shutil.rmtree(run / "a")
        catalog.sync()
        assert paths(catalog.find("")) == ["run/b", "run/c"]

        # A file system with coarse timestamps gives the second change the directory's old mtime:
        # the directory was modified less than two seconds ago, so it must be listed again anyway.
        st = os.stat(run)
        catalog.sync()
        save(run / "d", 4)
        os.utime(run, ns=(st.st_atime_ns, st.st_mtime_ns))
        catalog.sync()
        _recent(st)
        assert paths(catalog.find("")) == ["run/b", "run/c", "run/d"]
        st = os.stat(run)
        shutil.rmtree(run / "b")
        os.utime(run, ns=(st.st_atime_ns, st.st_mtime_ns))
        catalog.sync()
        _recent(st)
        assert paths(catalog.find("")) == ["run/c", "run/d"]


def test_an_overwrite_within_one_timestamp_tick_is_seen(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save(run / "best", 1, metrics={"val_acc": 0.1})
    manifest = run / "best" / "manifest.json"
    with Catalog(tmp_path) as catalog:
        assert catalog.find("")[0].metrics == {"val_acc": 0.1}
        old = os.stat(manifest)
        save(run / "best", 2, overwrite=True, metrics={"val_acc": 0.9})
        # what a file system with 1 s (or one-jiffy) timestamps records for two saves that close
        os.utime(manifest, ns=(old.st_atime_ns, old.st_mtime_ns))
        catalog.sync()
        row = catalog.find("")[0]
    assert (row.step, row.metrics) == (2, {"val_acc": 0.9})


def test_a_process_killed_right_after_its_commit_is_found_by_the_next_open(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save(run / "step_00000001", 1)
    Catalog(tmp_path).close()  # the catalog exists and knows the run
    procs = {
        "exit": _save_elsewhere(run / "step_00000002", 2, "exit"),
        "kill": _save_elsewhere(tmp_path / "other" / "step_00000003", 3, "kill"),
    }
    assert procs["exit"].wait(timeout=60) == 0
    assert procs["kill"].wait(timeout=60) == -signal.SIGKILL
    assert find_paths(tmp_path) == ["other/step_00000003", "run/step_00000001", "run/step_00000002"]
    assert find_paths(tmp_path, "val_acc = 0.5") == ["other/step_00000003", "run/step_00000002"]


# --------------------------------------------------------------------------- validation status


def _record(checkpoint: Path, passed: bool, checkpoint_id: str, level: str = "readback") -> None:
    record_result(
        ValidationResult(str(checkpoint), level, level, passed, (), 0.1, checkpoint_id=checkpoint_id)
    )


def test_validation_results_are_reflected_and_foreign_ones_ignored(tmp_path: Path) -> None:
    run = tmp_path / "run"
    infos = {s: save(run / f"step_{s}", s) for s in (1, 2, 3, 4)}
    _record(run / "step_1", True, infos[1].checkpoint_id, "full")
    with Catalog(tmp_path) as catalog:
        status = {r.name: (r.validation_level, r.validation_passed) for r in catalog.find("")}
        assert status == {
            "step_1": ("full", True),
            "step_2": (None, None),
            "step_3": (None, None),
            "step_4": (None, None),
        }
        # results written after the catalog was opened: one failure, one of another checkpoint_id
        _record(run / "step_2", False, infos[2].checkpoint_id)
        _record(run / "step_3", False, "0" * 32)
        catalog.sync()
        assert paths(catalog.find("valid = 0")) == ["run/step_2"]
        assert paths(catalog.find("valid = 1")) == ["run/step_1"]
        assert paths(catalog.find("valid is null")) == ["run/step_3", "run/step_4"]
        assert paths(catalog.find("validation = 'readback'")) == ["run/step_2"]
        assert paths(catalog.find("not valid = 0")) == ["run/step_1", "run/step_3", "run/step_4"]
        row = catalog.find("step = 2")[0]
        assert (row.validation_level, row.validation_passed) == ("readback", False)

        # a later result replaces the earlier one; an overwrite makes the old result foreign
        _record(run / "step_2", True, infos[2].checkpoint_id)
        catalog.sync()
        assert catalog.find("step = 2")[0].validation_passed is True
        new = save(run / "step_1", 1, overwrite=True)
        assert new.checkpoint_id != infos[1].checkpoint_id
        catalog.sync()
        assert catalog.find("step = 1")[0].validation_passed is None
    # and a rebuild agrees
    delete_catalog(tmp_path)
    with Catalog(tmp_path) as catalog:
        assert paths(catalog.find("valid = 1")) == ["run/step_2"]
        assert paths(catalog.find("valid is null")) == ["run/step_1", "run/step_3", "run/step_4"]


# --------------------------------------------------------------------------- damage and oddities


def test_damaged_foreign_and_hidden_directories_are_not_listed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save(run / "good", 1)
    for name in ("garbage", "truncated", "foreign", "empty"):
        save(run / name, 2)
    (run / "garbage" / "manifest.json").write_bytes(b"\x00\xffnot json at all")
    manifest = (run / "truncated" / "manifest.json").read_bytes()
    (run / "truncated" / "manifest.json").write_bytes(manifest[: len(manifest) // 2])
    doc = json.loads((run / "foreign" / "manifest.json").read_text())
    doc["format"] = "something-else"
    (run / "foreign" / "manifest.json").write_text(json.dumps(doc))
    (run / "empty" / "manifest.json").write_bytes(b"")
    (run / "no_manifest").mkdir()
    (run / "no_manifest" / "data-00000.safetensors").write_bytes(b"x" * 10)
    (run / "manifest_is_a_dir" / "manifest.json").mkdir(parents=True)
    save(run / "no_manifest" / "nested", 3)  # a checkpoint below a plain directory is found
    save(run / ".hidden_ckpt", 4)
    save(tmp_path / ".hidden" / "run" / "ckpt", 5)
    save(run / ".ckptvault-store" / "chunky", 6)
    save(run / ".step_00000007.tmp-abc", 7)
    (tmp_path / "loose_file").write_text("not a directory")
    os.symlink(run / "good", tmp_path / "link_to_good")

    with Catalog(tmp_path) as catalog:
        assert paths(catalog.find("")) == ["run/good", "run/no_manifest/nested"]
        assert [r["run_dir"] for r in catalog.runs()] == ["run", "run/no_manifest"]
        # damage after indexing: the next sync drops it (the overwrite renames, as a save does)
        shutil.copytree(run / "good", run / "tmp")
        (run / "tmp" / "manifest.json").write_bytes(b"{")
        shutil.rmtree(run / "good")
        os.rename(run / "tmp", run / "good")
        catalog.sync()
        assert paths(catalog.find("")) == ["run/no_manifest/nested"]


def test_a_catalog_of_another_schema_version_is_rebuilt_transparently(tmp_path: Path) -> None:
    for step in range(1, 6):
        save(tmp_path / "run" / f"s{step}", step, metrics={"loss": 1.0 / step})
    with Catalog(tmp_path) as catalog:
        before = answers(catalog, [("loss < 0.5", "-loss", None), ("", "", None)])
    for version in ("0", "2", "not a number"):
        db = sqlite3.connect(catalog_files(tmp_path)[0])
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))
        db.execute("DELETE FROM checkpoints WHERE name = 's1'")  # what it holds no longer matters
        db.commit()
        db.close()
        with Catalog(tmp_path) as catalog:
            assert answers(catalog, [("loss < 0.5", "-loss", None), ("", "", None)]) == before
            assert catalog._db.execute("SELECT value FROM meta").fetchall() == [("1",)]
    db = sqlite3.connect(catalog_files(tmp_path)[0])
    db.execute("DROP TABLE meta")
    db.commit()
    db.close()
    assert find_paths(tmp_path, "loss < 0.5", sort="-loss") == ["run/s3", "run/s4", "run/s5"]


def test_a_damaged_catalog_file_is_rebuilt(tmp_path: Path) -> None:
    save(tmp_path / "run" / "s1", 1)
    Catalog(tmp_path).close()
    delete_catalog(tmp_path)
    catalog_files(tmp_path)[0].write_bytes(b"this is not an SQLite database " * 200)
    assert find_paths(tmp_path) == ["run/s1"]


@pytest.mark.parametrize("which", ["all files", "database only"])
def test_catalog_deleted_while_in_use_reopens(tmp_path: Path, which: str) -> None:
    for step in range(1, 4):
        save(tmp_path / "run" / f"s{step}", step)
    first = Catalog(tmp_path)
    try:
        assert first.count() == 3
        if which == "all files":
            delete_catalog(tmp_path)
        else:
            catalog_files(tmp_path)[0].unlink()
        with Catalog(tmp_path) as second:
            assert paths(second.find("")) == ["run/s1", "run/s2", "run/s3"]
            save(tmp_path / "run" / "s4", 4)
            second.sync()
            assert second.count() == 4
    finally:
        first.close()
    assert find_paths(tmp_path, "step > 2") == ["run/s3", "run/s4"]
    db = sqlite3.connect(catalog_files(tmp_path)[0])
    assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    db.close()


def test_catalog_of_a_missing_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(cv.CheckpointError):
        Catalog(tmp_path / "nope")
    with pytest.raises(QueryError), Catalog(tmp_path) as catalog:
        catalog.find("step >")


# --------------------------------------------------------------------------- the CLI

ACCS = [0.5, 0.93, 0.97, 0.91, 0.2, 0.99, 0.95, 0.92, 0.96, 0.1]


def _cli_tree(root: Path) -> None:
    for i, acc in enumerate(ACCS):
        run = root / ("x" if i % 2 else "y") / "run"
        save(run / f"step_{i:08d}", i, metrics={"val_acc": acc, "loss": 1 - acc})


def test_cli_find_returns_the_right_rows(tmp_path: Path) -> None:
    _cli_tree(tmp_path)
    runner = CliRunner()
    result = runner.invoke(
        app, ["find", str(tmp_path), "val_acc > 0.9", "--sort", "-val_acc", "--limit", "5", "--json"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["metrics"]["val_acc"] for r in rows] == [0.99, 0.97, 0.96, 0.95, 0.93]
    assert [r["path"] for r in rows] == [
        "x/run/step_00000005",
        "y/run/step_00000002",
        "y/run/step_00000008",
        "y/run/step_00000006",
        "x/run/step_00000001",
    ]
    assert {"checkpoint_id", "step", "run_dir", "created_at", "validation_passed"} <= set(rows[0])

    table = runner.invoke(app, ["find", str(tmp_path), "step < 2"], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    assert "x/run/step_00000001" in table.stdout and "y/run/step_00000000" in table.stdout
    none = runner.invoke(app, ["find", str(tmp_path), "val_acc > 5"])
    assert none.exit_code == 0 and "no checkpoint matches" in none.stdout
    every = runner.invoke(app, ["find", str(tmp_path), "--json"])
    assert len(json.loads(every.stdout)) == len(ACCS)
    synced = runner.invoke(app, ["catalog", "sync", str(tmp_path)])
    assert synced.exit_code == 0 and f"{len(ACCS)} checkpoints" in synced.stdout


@pytest.mark.parametrize(
    ("where", "sort", "expect"),
    [
        ("x > 1; drop table checkpoints", "", "';'"),
        ("1=1 --", "", "'--'"),
        ("' or ''='", "", "field name"),
        ("val_acc > 0 union select name from metrics", "", "union"),
        ("val_acc > 0 union select * from metrics", "", "'*'"),
        ("step = 1) or (1 = 1", "", "column"),
        ("", "-val_acc; drop table checkpoints", "';'"),
        ("", "step desc", "column"),
    ],
)
def test_cli_find_refuses_injection_and_the_catalog_still_works(
    tmp_path: Path, where: str, sort: str, expect: str
) -> None:
    _cli_tree(tmp_path)
    runner = CliRunner()
    args = ["find", str(tmp_path), where, *(["--sort", sort] if sort else [])]
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit)  # a clean exit, not a crash
    assert "Traceback" not in result.output
    message = " ".join(result.stderr.split())  # rich wraps long lines
    assert message.startswith("error: QueryError:") and expect in message
    assert find_paths(tmp_path, "val_acc > 0.95") == [
        "x/run/step_00000005",
        "y/run/step_00000002",
        "y/run/step_00000008",
    ]
    db = sqlite3.connect(catalog_files(tmp_path)[0])
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("SELECT count(*) FROM checkpoints").fetchone() == (len(ACCS),)
        assert db.execute("SELECT count(*) FROM metrics").fetchone() == (2 * len(ACCS),)
    finally:
        db.close()


def test_cli_find_on_a_missing_root_fails_cleanly(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["find", str(tmp_path / "missing"), "step > 1"])
    assert result.exit_code == 1
    assert "is not a directory" in " ".join(result.stderr.split())


def test_limited_metric_sort_equals_the_general_query(tmp_path: Path) -> None:
    """The index-driven path for 'sort by one metric, with a limit' returns exactly the first rows
    of the general query: same values, ties in the default order, missing and NaN metrics last."""
    import ckptvault as cv
    from ckptvault.catalog import Catalog

    for i in range(40):
        metrics: dict[str, float] = {"loss": float(i % 7)}
        if i % 5:
            metrics["val_acc"] = float("nan") if i % 11 == 0 else round((i * 37 % 13) / 13, 3)
        cv.save(
            tmp_path / f"run{i % 3}" / f"step_{i:05d}",
            {"w": [0.0]},
            metadata={
                "step": i,
                "metrics": metrics,
                "config": {"lr": 0.01 * (i % 4), "optimizer": {"name": "adam" if i % 2 else "sgd"}},
                "tags": {"stage": "main" if i >= 20 else "warmup"},
            },
        )
    with Catalog(tmp_path) as catalog:
        # metric, config and tag conditions (compiled as correlated EXISTS on this path), negated too
        for where in (
            "",
            "loss < 4",
            "step >= 10 and loss > 1",
            "run = 'run1'",
            "not loss < 4 or val_acc > 0.5",
            "config.optimizer.name = 'adam' and config.lr < 0.025",
            "tag.stage = 'main' and not val_acc is null",
        ):
            for sort in ("-val_acc", "val_acc", "+loss"):
                full = catalog.find(where, sort=sort)
                for limit in (0, 1, 5, 17, 100):
                    assert catalog.find(where, sort=sort, limit=limit) == full[:limit], (where, sort, limit)
