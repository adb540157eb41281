"""The catalog and the registry over an object-store root, against a real S3-compatible server.

A tree of runs in a bucket (``s3://bucket/runs``) is found by ``Catalog(url)`` with the same rows a
local catalog of the same content gives; later commits, overwrites and deletions reach it through
the change tokens; its SQLite database lives in the user's cache directory, never in the bucket.
The registry keeps its documents in the bucket, registers and pins checkpoints there, resolves
``registry://`` references to URLs that ``ckptvault.load`` reads, and two writers racing on one
model never lose an update (compare-and-swap on ETags).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptvault as cv
from ckptvault.catalog import Catalog
from ckptvault.catalog.files import CACHED_CATALOGS, CATALOG_NAME, cached_catalog_name
from ckptvault.catalog.registry import Registry, RegistryError, ReplacedCheckpointError, registered_in
from ckptvault.engine.rundir import RunDirectory
from ckptvault.errors import DocumentConflictError
from ckptvault.storage.base import ReadHandle, Storage
from ckptvault.storage.resolve import storage_for
from ckptvault.testing.s3server import MotoServer

# Fields that name one particular save (a fresh id, a wall-clock time, the manager's run id, and the
# size, which counts the manager's sidecar holding those): two trees of the same content differ there
# and nowhere else. Each is checked against the checkpoint's own manifest instead.
_PER_SAVE = ("checkpoint_id", "created_at", "run_id", "size_bytes")


@pytest.fixture
def cache(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Points every client at the moto server and the catalog cache into the test's directory."""
    for key, value in moto_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CKPTVAULT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def root(cache: Path, s3_bucket: str) -> str:
    return f"s3://{s3_bucket}/runs"


def state(seed: float) -> dict[str, np.ndarray]:
    return {"w": np.full((3, 2), seed, dtype=np.float32), "b": np.arange(4, dtype=np.int64)}


def save(location: str | Path, step: int, val_acc: float, **extra: Any) -> cv.CheckpointInfo:
    metadata = {"step": step, "metrics": {"val_acc": val_acc, "loss": 1.0 - val_acc}, **extra}
    return cv.save(location, state(step), metadata=metadata, overwrite=True)


def populate(base: str | Path) -> None:
    """The same tree wherever ``base`` is: a managed run and two runs of plain saves."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    run = f"{base}/managed"
    with cv.CheckpointManager(run, every_n_steps=1, validate="checksum", config={"lr": 0.1}) as manager:
        train = cv.TrainState(model)
        for acc in (0.3, 0.8):
            with torch.no_grad():
                model.weight += 1.0
            manager.step(train, metrics={"val_acc": acc})
    save(f"{base}/plain/step_00000010", 10, 0.4, tags={"team": "x"}, config={"depth": 3})
    save(f"{base}/plain/step_00000020", 20, 0.7, tags={"team": "y"}, config={"depth": 3})
    save(f"{base}/deep/er/step_00000005", 5, 0.95, epoch=2)


def comparable(rows: list[cv.CatalogRow] | list[Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.as_dict().items() if k not in _PER_SAVE} for row in rows]


def bucket_keys(server: MotoServer, bucket: str) -> list[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


class Counting:
    """A storage that records the calls that read the tree (everything else is the inner one's)."""

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


# -- the catalog ------------------------------------------------------------------------------------


def test_a_bucket_tree_gives_the_rows_a_local_tree_of_the_same_content_gives(
    root: str, tmp_path: Path
) -> None:
    populate(root)
    populate(tmp_path / "local")
    query, sort = "val_acc > 0.5", "-val_acc"
    with Catalog(root) as remote, Catalog(tmp_path / "local") as local:
        assert remote.root == root  # kept a URL, never a Path
        found = remote.find(query, sort=sort)
        assert [r.path for r in found] == [
            "deep/er/step_00000005",
            "managed/step_00000002",
            "plain/step_00000020",
        ]
        assert comparable(found) == comparable(local.find(query, sort=sort))
        assert comparable(remote.find()) == comparable(local.find())
        assert remote.find("tags.team = 'y' and config.depth = 3")[0].step == 20
        assert [r["run_dir"] for r in remote.runs()] == [r["run_dir"] for r in local.runs()]
        assert next(r for r in remote.runs() if r["run_dir"] == "managed")["config"] == {"lr": 0.1}
        for row in found:  # each row is the checkpoint at its URL, by id
            where = remote.absolute(row)
            assert where == f"{root}/{row.path}"
            info = cv.info(where)
            assert (row.checkpoint_id, row.created_at, row.size_bytes) == (
                info.checkpoint_id,
                info.created_at,
                info.size_bytes,
            )


def test_a_commit_after_a_sync_is_found_by_the_next_one_reading_only_what_changed(root: str) -> None:
    save(f"{root}/a/step_00000001", 1, 0.2)
    save(f"{root}/b/step_00000001", 1, 0.3)
    with Catalog(root) as catalog:
        assert catalog.count() == 2
        counting = Counting(catalog.storage)
        catalog.storage = counting  # type: ignore[assignment]
        catalog.sync()
        assert counting.opened == [] and counting.listed == []  # no token changed: nothing read

        save(f"{root}/a/step_00000002", 2, 0.9)
        catalog.sync()
        assert f"{root}/a/step_00000002" in counting.opened
        assert not [k for k in counting.opened + counting.listed if k.startswith(f"{root}/b")]
        assert [r.path for r in catalog.find("val_acc > 0.5")] == ["a/step_00000002"]
    with Catalog(root) as reopened:  # another process: the cached database, synced on open
        assert reopened.count() == 3


def test_an_overwrite_and_a_deletion_are_reflected(root: str) -> None:
    save(f"{root}/r/step_00000001", 1, 0.2)
    save(f"{root}/r/step_00000002", 2, 0.6)
    with Catalog(root) as catalog:
        first = {r.path: r for r in catalog.find()}
        assert first["r/step_00000001"].metrics["val_acc"] == pytest.approx(0.2)

        info = save(f"{root}/r/step_00000001", 1, 0.99)  # overwrite: a new manifest, a new ETag
        storage, key = storage_for(f"{root}/r/step_00000002")
        assert storage.delete(key)
        catalog.sync()
        rows = catalog.find()
        assert [r.path for r in rows] == ["r/step_00000001"]
        assert rows[0].metrics["val_acc"] == pytest.approx(0.99)
        assert rows[0].checkpoint_id == info.checkpoint_id != first["r/step_00000001"].checkpoint_id


def test_rebuild_gives_the_same_rows(root: str) -> None:
    populate(root)
    with Catalog(root) as catalog:
        before = [r.as_dict() for r in catalog.find(sort="run_dir,step")]
        assert catalog.rebuild() == len(before) == 5
        assert [r.as_dict() for r in catalog.find(sort="run_dir,step")] == before


def test_the_database_lives_in_the_cache_and_never_in_the_bucket(
    root: str,
    cache: Path,
    moto_server: MotoServer,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    save(f"{root}/r/step_00000001", 1, 0.5)
    monkeypatch.chdir(tmp_path)
    with Catalog(root + "/") as catalog:  # a trailing "/" names the same root, the same database
        assert catalog.count() == 1
        folder = catalog.path.parent
        assert catalog.path == cache / CACHED_CATALOGS / cached_catalog_name(root) / CATALOG_NAME
        assert folder.name.startswith(f"s3-{s3_bucket}-")
    assert catalog.path.is_file()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700  # it lists the user's buckets and runs
    assert not [k for k in bucket_keys(moto_server, s3_bucket) if ".ckptvault/" in k or "sqlite" in k]
    assert not (tmp_path / "s3:").exists()  # the old bug: the URL taken for a path under the cwd
    with Catalog(f"{root}/r") as narrower:  # another root in the same bucket: a database of its own
        assert narrower.path.parent != folder and narrower.count() == 1


def test_without_an_explicit_cache_dir_xdg_cache_home_is_used(
    root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CKPTVAULT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    save(f"{root}/r/step_00000001", 1, 0.5)
    with Catalog(root) as catalog:
        assert catalog.path.is_relative_to(tmp_path / "xdg" / "ckptvault" / CACHED_CATALOGS)
        assert catalog.count() == 1


def test_a_cache_folder_that_is_a_symlink_is_refused(root: str, cache: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (cache / CACHED_CATALOGS).mkdir(parents=True)
    (cache / CACHED_CATALOGS / cached_catalog_name(root)).symlink_to(elsewhere)
    with pytest.raises(cv.CheckpointError, match="symbolic link"):
        Catalog(root)
    assert list(elsewhere.iterdir()) == []


# -- the command line --------------------------------------------------------------------------------


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it (the moto server's settings come through the environment)."""
    done = subprocess.run(
        [sys.executable, "-m", "ckptvault.cli.main", *args], capture_output=True, text=True, cwd=cwd, env=env
    )
    assert done.returncode == 0, done.stderr + done.stdout
    return done


def test_cli_find_and_catalog_rebuild_on_a_bucket_root(root: str, cache: Path, tmp_path: Path) -> None:
    populate(root)
    rows = json.loads(cli("find", root, "val_acc > 0.5", "--sort", "step", "--json", cwd=tmp_path).stdout)
    assert [(r["path"], r["step"]) for r in rows] == [
        ("managed/step_00000002", 2),
        ("deep/er/step_00000005", 5),
        ("plain/step_00000020", 20),
    ]
    assert rows[2]["metrics"]["val_acc"] == pytest.approx(0.7)
    rebuilt = cli("catalog", "rebuild", root, cwd=tmp_path).stdout
    assert "indexed 5 checkpoints" in rebuilt and root in rebuilt
    assert "5 checkpoints" in cli("catalog", "sync", root, cwd=tmp_path).stdout
    assert list((cache / CACHED_CATALOGS).iterdir())  # the subprocesses used the cache
    assert not (tmp_path / "s3:").exists() and not (tmp_path / ".ckptvault").exists()


def test_cli_registry_on_a_bucket_root(root: str, tmp_path: Path) -> None:
    save(f"{root}/r/step_00000001", 1, 0.5)
    said = cli(
        "registry",
        "register",
        "net",
        f"{root}/r/step_00000001",
        "--root",
        root,
        "--alias",
        "prod",
        cwd=tmp_path,
    )
    assert "net version 1 -> r/step_00000001" in said.stdout
    shown = json.loads(cli("registry", "show", "net", "--root", root, "--json", cwd=tmp_path).stdout)
    assert [v["checkpoint"] for v in shown["versions"]] == ["r/step_00000001"] and shown["aliases"] == {
        "prod": 1
    }
    cli("registry", "alias", "net", "1", "canary", "--root", root, "--why", "try it", cwd=tmp_path)
    history = json.loads(cli("registry", "history", "net", "--root", root, "--json", cwd=tmp_path).stdout)
    assert [(h["alias"], h["why"]) for h in history] == [
        ("prod", "registered version 1"),
        ("canary", "try it"),
    ]
    # No --root: $CKPTVAULT_ROOT names the bucket root (a URL there stays a URL).
    listed = cli("registry", "ls", "--json", cwd=tmp_path, env={**os.environ, "CKPTVAULT_ROOT": root})
    assert json.loads(listed.stdout) == [{"name": "net", "aliases": {"prod": 1, "canary": 1}, "versions": 1}]


# -- the registry ------------------------------------------------------------------------------------


def test_register_alias_resolve_and_load_under_a_bucket_root(
    root: str, moto_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    save(f"{root}/run/step_00000001", 1, 0.5)
    save(f"{root}/run/step_00000002", 2, 0.8)
    registry = Registry(root)
    assert registry.root == root
    first = registry.register("net", f"{root}/run/step_00000001", alias="staging", note="baseline")
    assert first["checkpoint"] == "run/step_00000001" and first["version"] == 1
    registry.register("net", f"{root}/run//step_00000002/")  # spelled loosely: the same key
    registry.alias("net", 2, "production", why="better val_acc")
    assert registry.names() == ["net"]
    assert registry.resolve("net", "production") == f"{root}/run/step_00000002"
    assert registry.resolve("net", "staging") == f"{root}/run/step_00000001"
    assert registry.resolve("net") == f"{root}/run/step_00000002"
    assert [(h["alias"], h["to"], h["why"]) for h in registry.history("net")] == [
        ("staging", 1, "registered version 1"),
        ("production", 2, "better val_acc"),
    ]
    # Pinned in the run (retention reads this), and every document is in the bucket.
    assert registered_in(RunDirectory(f"{root}/run")) == {"step_00000001", "step_00000002"}
    keys = bucket_keys(moto_server, s3_bucket)
    assert "runs/.ckptvault/registry/net.json" in keys and "runs/run/.ckptvault-registered.json" in keys

    monkeypatch.setenv("CKPTVAULT_ROOT", root + "/")
    loaded = cv.load("registry://net@production")
    np.testing.assert_array_equal(loaded["w"], state(2)["w"])
    np.testing.assert_array_equal(cv.load("registry://net@1")["w"], state(1)["w"])


def test_a_checkpoint_outside_a_bucket_root_is_refused(root: str, s3_bucket: str, tmp_path: Path) -> None:
    save(f"s3://{s3_bucket}/elsewhere/step_00000001", 1, 0.5)
    save(tmp_path / "step_00000001", 1, 0.5)
    registry = Registry(root)
    for outside in (
        f"s3://{s3_bucket}/elsewhere/step_00000001",
        f"s3://{s3_bucket}/runs-and-more/step_00000001",  # a prefix of the name is not a parent
        f"s3://other-{s3_bucket}/runs/step_00000001",
        f"{root}/../elsewhere/step_00000001",
        str(tmp_path / "step_00000001"),
        root,
    ):
        with pytest.raises(RegistryError, match="not under the registry's root"):
            registry.register("net", outside)
    assert registry.names() == []


def test_a_tampered_or_replaced_version_is_refused_on_resolve(root: str) -> None:
    save(f"{root}/run/step_00000001", 1, 0.5)
    registry = Registry(root)
    registry.register("net", f"{root}/run/step_00000001")
    save(f"{root}/run/step_00000001", 1, 0.6)  # overwritten since it was registered
    with pytest.raises(ReplacedCheckpointError):
        registry.resolve("net")
    key = f"{root}/.ckptvault/registry/net.json"
    found = registry.storage.get(key, max_bytes=1 << 20)
    assert found is not None
    doc = json.loads(found.data)
    doc["versions"][0]["checkpoint"] = "../outside/step_00000001"
    registry.storage.put(key, json.dumps(doc).encode(), if_version=found.version)
    with pytest.raises(RegistryError, match="not inside the root"):
        registry.resolve("net")


class Interleaving:
    """A storage whose first write of ``key`` lets another writer's whole change happen first: the
    race a compare-and-swap must survive, made certain instead of likely."""

    def __init__(self, inner: Storage, key: str, meanwhile: Callable[[], None]) -> None:
        self.inner, self.key, self.meanwhile = inner, key, meanwhile
        self.conflicts = 0
        self._done = False

    def put(self, key: str, data: bytes, **options: Any) -> str:
        if key == self.key and not self._done:
            self._done = True
            self.meanwhile()
        try:
            return self.inner.put(key, data, **options)
        except DocumentConflictError:
            self.conflicts += 1
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_two_writers_racing_an_alias_move_lose_no_update(root: str) -> None:
    for step in (1, 2):
        save(f"{root}/run/step_{step:08d}", step, 0.5)
    setup = Registry(root)
    for step in (1, 2):
        setup.register("net", f"{root}/run/step_{step:08d}")
    a, b = Registry(root), Registry(root)
    spy = Interleaving(
        a.storage, f"{root}/.ckptvault/registry/net.json", lambda: b.alias("net", 1, "prod", why="b")
    )
    a.storage = spy  # type: ignore[assignment]
    a.alias("net", 2, "prod", why="a")
    assert spy.conflicts == 1  # a's first write lost the race to b's ...
    doc = Registry(root).show("net")  # ... and a redid its move on top of b's, which is kept
    assert [(h["why"], h["from"], h["to"]) for h in doc["history"]] == [("b", None, 1), ("a", 1, 2)]
    assert doc["aliases"] == {"prod": 2} and len(doc["versions"]) == 2


def test_concurrent_writers_on_one_model_keep_every_change(root: str) -> None:
    for step in (1, 2, 3):
        save(f"{root}/run/step_{step:08d}", step, 0.5)
    Registry(root).register("net", f"{root}/run/step_00000001")
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        registry = Registry(root)
        try:
            barrier.wait()
            if index < 2:  # two registrations racing: two versions, never one number twice
                registry.register("net", f"{root}/run/step_{index + 2:08d}")
            for move in range(3):
                registry.alias("net", 1, f"w{index}", why=f"{index}-{move}")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    doc = Registry(root).show("net")
    assert sorted(h["why"] for h in doc["history"]) == sorted(f"{i}-{m}" for i in range(4) for m in range(3))
    assert [v["version"] for v in doc["versions"]] == [1, 2, 3]
    assert sorted(v["checkpoint"] for v in doc["versions"]) == [f"run/step_{s:08d}" for s in (1, 2, 3)]
    assert registered_in(RunDirectory(f"{root}/run")) == {f"step_{s:08d}" for s in (1, 2, 3)}


def test_a_registered_checkpoint_in_a_bucket_run_survives_retention(
    root: str, moto_server: MotoServer
) -> None:
    torch.manual_seed(0)
    train = cv.TrainState(torch.nn.Linear(2, 2))
    run = f"{root}/managed"
    with cv.CheckpointManager(run, every_n_steps=1, keep_last=1, validate="checksum") as manager:
        manager.step(train)
        Registry(root).register("net", f"{run}/step_00000001")  # pinned in the run, in the bucket
        for _ in range(3):
            manager.step(train)
    with Catalog(root) as catalog:  # retention kept the newest and the registered one only
        assert [r.name for r in catalog.find(sort="step")] == ["step_00000001", "step_00000004"]
    assert Registry(root).resolve("net") == f"{run}/step_00000001"


def test_a_bucket_root_itself_is_a_root(cache: Path, s3_bucket: str) -> None:
    bucket = f"s3://{s3_bucket}"
    save(f"{bucket}/step_00000001", 1, 0.4)
    save(f"{bucket}/run/step_00000002", 2, 0.6)
    with Catalog(bucket) as catalog:
        assert [r.path for r in catalog.find(sort="step")] == ["step_00000001", "run/step_00000002"]
        save(f"{bucket}/run/step_00000003", 3, 0.9)
        catalog.sync()
        assert [r.path for r in catalog.find("val_acc > 0.5", sort="step")] == [
            "run/step_00000002",
            "run/step_00000003",
        ]
    registry = Registry(bucket + "/")
    registry.register("net", f"{bucket}/run/step_00000003", alias="prod")
    assert registry.resolve("net", "prod") == f"{bucket}/run/step_00000003"
    assert registered_in(RunDirectory(f"{bucket}/run")) == {"step_00000003"}
