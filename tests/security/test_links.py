"""Symlinks and special files planted in run directories, chunk stores and registries (issue 13,
class 2): every bookkeeping file is opened without following links and without blocking on a FIFO,
and nothing outside the run or root is ever written, truncated or deleted through a link.

Each case plants the hostile entry, runs the operation that reads or writes it, and checks that the
victim outside is unchanged and that the outcome is a typed error or a safe skip -- never a hang
(pytest-timeout ends a test that blocks on a FIFO) and never a raw ``OSError``/``ValueError``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import ckptvault as cv
from ckptvault import validation
from ckptvault.catalog.registry import REGISTERED_NAME, Registry, registered_in
from ckptvault.catalog.store import CATALOG_DIR, Catalog
from ckptvault.engine.gc import collect_garbage
from ckptvault.errors import CheckpointError
from ckptvault.manager import EVENTS_NAME, INDEX_NAME, LOCK_NAME, kept_reasons, read_events
from ckptvault.storage.chunkstore import STORE_NAME, ChunkStore

pytestmark = pytest.mark.timeout(20)

VICTIM_TEXT = "precious: must never change\n"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    path = outside / "victim"
    path.write_text(VICTIM_TEXT)
    return path


def untouched(victim: Path) -> bool:
    outside = victim.parent
    return victim.read_text() == VICTIM_TEXT and sorted(p.name for p in outside.iterdir()) == ["victim"]


def plant(path: Path, kind: str, victim: Path) -> None:
    """Replaces ``path`` by a symlink to the victim, or by a FIFO."""
    if path.exists() or path.is_symlink():
        path.unlink()
    if kind == "link":
        path.symlink_to(victim)
    else:
        os.mkfifo(path)


def state(seed: int = 0) -> dict[str, np.ndarray]:
    return {"w": np.arange(20000, dtype=np.float32) + seed}


def manager(run: Path, **kwargs: object) -> cv.CheckpointManager:
    return cv.CheckpointManager(run, every_n_steps=1, validate="checksum", **kwargs)  # type: ignore[arg-type]


class Box:
    """A stateful object for ``TrainState(extras=...)``."""

    def __init__(self, value: dict[str, np.ndarray]) -> None:
        self.value = value

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.value

    def load_state_dict(self, value: dict[str, np.ndarray]) -> None:
        self.value = value


def save_step(m: cv.CheckpointManager, step: int) -> None:
    train = cv.TrainState(extras={"s": Box(state(step))})
    train.step = step
    m.save(train)


def made_run(run: Path) -> None:
    with manager(run) as m:
        save_step(m, 1)


# -- the run directory -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["link", "fifo"])
def test_lock_file_never_followed(tmp_path: Path, victim: Path, kind: str) -> None:
    """The run lock was opened O_RDWR|O_CREAT and truncated: a symlinked lock truncated the victim."""
    run = tmp_path / "run"
    run.mkdir()
    plant(run / LOCK_NAME, kind, victim)
    with pytest.raises(CheckpointError, match=r"symbolic link|not a regular file"):
        manager(run)
    assert untouched(victim)


@pytest.mark.parametrize("kind", ["link", "fifo"])
def test_run_json_never_followed(tmp_path: Path, victim: Path, kind: str) -> None:
    run = tmp_path / "run"
    made_run(run)
    plant(run / "run.json", kind, victim)
    with pytest.raises(CheckpointError, match=r"symbolic link|not a regular file"):
        manager(run)
    assert untouched(victim)
    with pytest.raises(CheckpointError):
        kept_reasons(run)


@pytest.mark.parametrize("kind", ["link", "fifo"])
def test_pins_never_followed(tmp_path: Path, victim: Path, kind: str) -> None:
    run = tmp_path / "run"
    made_run(run)
    plant(run / "pins.json", kind, victim)
    with pytest.raises(CheckpointError, match=r"symbolic link|not a regular file"):
        manager(run)
    assert untouched(victim)


def test_fifo_index_is_rebuilt_not_waited_on(tmp_path: Path, victim: Path) -> None:
    """The index is derived: a hostile one is ignored (rebuilt from the manifests) and replaced by a
    real file. A FIFO hung the manager's construction. (A symlinked index was already replaced, not
    written through: os.replace renames over the link.)"""
    run = tmp_path / "run"
    made_run(run)
    plant(run / INDEX_NAME, "fifo", victim)
    with manager(run) as m:
        assert [r.step for r in m.checkpoints()] == [1]
        save_step(m, 2)
    assert untouched(victim)
    assert not (run / INDEX_NAME).is_symlink() and (run / INDEX_NAME).is_file()


@pytest.mark.parametrize("kind", ["link", "fifo"])
def test_events_never_followed(tmp_path: Path, victim: Path, kind: str) -> None:
    """The event log was appended with open(path, 'a'): through a link into the victim, and a FIFO
    blocked the training step (and ``read_events``) forever."""
    run = tmp_path / "run"
    made_run(run)
    plant(run / EVENTS_NAME, kind, victim)
    with manager(run) as m:
        save_step(m, 2)  # the lost log line is no failure
    assert untouched(victim)
    assert read_events(run) == []


def test_fifo_validation_result_never_waited_on(tmp_path: Path, victim: Path) -> None:
    """Reading a result that is a FIFO hung retention and ``ls``; it reads as "no result" now and
    the next result replaces it."""
    run = tmp_path / "run"
    made_run(run)
    checkpoint = run / "step_00000001"
    results = validation.results_path(checkpoint)
    results.parent.mkdir(exist_ok=True)
    plant(results, "fifo", victim)
    assert validation.read_result(checkpoint) is None
    validation.record_result(validation.readback(str(checkpoint)))
    assert untouched(victim)
    assert not results.is_symlink() and validation.read_result(checkpoint) is not None


def test_symlinked_validation_directory_refused(tmp_path: Path, victim: Path) -> None:
    """Results were written into whatever directory ``.ckptvault-validation`` pointed at."""
    run = tmp_path / "run"
    made_run(run)
    checkpoint = run / "step_00000001"
    validation.results_path(checkpoint).parent.symlink_to(victim.parent)
    with pytest.raises(CheckpointError, match="symbolic link"):
        validation.record_result(validation.readback(str(checkpoint)))
    assert untouched(victim)


# -- retention ---------------------------------------------------------------------------------------
def test_retention_never_deletes_through_a_symlinked_checkpoint(tmp_path: Path, victim: Path) -> None:
    """A checkpoint directory that is a symlink to the outside is not the run's: retention neither
    counts it nor deletes what it points at. (A guard: this already held -- the scan skips symlinks
    and rmtree refuses one -- and must keep holding as deletion moves to descriptor-relative calls.)"""
    run = tmp_path / "run"
    (victim.parent / "manifest.json").write_text("{}")
    (run).mkdir()
    (run / "step_00000000").symlink_to(victim.parent)
    with manager(run, keep_last=1) as m:
        for step in (1, 2, 3):
            save_step(m, step)
    assert victim.read_text() == VICTIM_TEXT and (victim.parent / "manifest.json").read_text() == "{}"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step_")) == [
        "step_00000000",
        "step_00000003",
    ]


# -- the chunk store ---------------------------------------------------------------------------------
def test_symlinked_chunk_store_refused_by_save(tmp_path: Path, victim: Path) -> None:
    """An incremental save wrote its chunks into whatever directory ``.ckptvault-store`` named."""
    run = tmp_path / "run"
    run.mkdir()
    (run / STORE_NAME).symlink_to(victim.parent)
    with pytest.raises(CheckpointError, match="symbolic link"):
        cv.save(run / "step_1", state(), incremental=True, chunk_bytes=16384)
    assert untouched(victim)
    assert not (run / "step_1").exists()


@pytest.mark.parametrize("inner", ["", "chunks"])
def test_gc_never_sweeps_a_store_reached_through_a_symlink(tmp_path: Path, victim: Path, inner: str) -> None:
    """GC deleted every chunk-named file of a symlinked store (or ``chunks`` directory) that no
    manifest of the run referenced: files of someone else's directory."""
    run = tmp_path / "run"
    cv.save(run / "step_1", state(), incremental=True, chunk_bytes=16384)
    fake = victim.parent / "chunks" / "ab" if not inner else victim.parent / "ab"
    fake.mkdir(parents=True)
    (fake / ("ab" * 32 + ".raw")).write_text("someone else's file")
    target = run / STORE_NAME / inner if inner else run / STORE_NAME
    os.rename(target, tmp_path / "moved")
    target.symlink_to(victim.parent)
    with pytest.raises(CheckpointError, match="symbolic link"):
        collect_garbage(run)
    assert (fake / ("ab" * 32 + ".raw")).read_text() == "someone else's file"


def test_symlinked_chunk_shard_refused(tmp_path: Path, victim: Path) -> None:
    run = tmp_path / "run"
    cv.save(run / "step_1", state(), incremental=True, chunk_bytes=16384)
    shard = next((run / STORE_NAME / "chunks").iterdir())
    os.rename(shard, tmp_path / "moved")
    shard.symlink_to(tmp_path / "moved")
    with pytest.raises(CheckpointError, match="symbolic link"):
        cv.load(run / "step_1")
    with pytest.raises(CheckpointError, match="symbolic link"):
        cv.save(run / "step_2", state(), incremental=True, chunk_bytes=16384)
    assert sorted(os.listdir(tmp_path / "moved")) == sorted(os.listdir(shard))


def test_chunk_fifo_never_blocks_a_load(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cv.save(run / "step_1", state(), incremental=True, chunk_bytes=16384)
    chunk = next(p for p, d in ChunkStore(run / STORE_NAME).iter_files() if d is not None)
    chunk.unlink()
    os.mkfifo(chunk)
    with pytest.raises(CheckpointError, match="not a regular file"):
        cv.load(run / "step_1")
    report = cv.verify(run / "step_1")
    assert not report.ok


def test_fifo_store_lock_refused(tmp_path: Path, victim: Path) -> None:
    """The store lock was opened O_NOFOLLOW already, but any file type would do: GC "locked" a FIFO
    planted in its place and swept on."""
    run = tmp_path / "run"
    cv.save(run / "step_1", state(), incremental=True, chunk_bytes=16384)
    plant(run / STORE_NAME / "lock", "fifo", victim)
    with pytest.raises(CheckpointError, match="not a regular file"):
        collect_garbage(run)
    assert untouched(victim)


# -- the registry and the catalog --------------------------------------------------------------------
def registered_root(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    checkpoint = root / "run" / "step_1"
    cv.save(checkpoint, state())
    Registry(root).register("m", checkpoint)
    return root, checkpoint


def test_symlinked_registry_directory_refused(tmp_path: Path, victim: Path) -> None:
    root = tmp_path / "root"
    checkpoint = root / "run" / "step_1"
    cv.save(checkpoint, state())
    (root / CATALOG_DIR).mkdir()
    (root / CATALOG_DIR / "registry").symlink_to(victim.parent)
    with pytest.raises(CheckpointError, match="symbolic link"):
        Registry(root).register("m", checkpoint)
    assert untouched(victim)


def test_symlinked_catalog_directory_refused(tmp_path: Path, victim: Path) -> None:
    root = tmp_path / "root"
    cv.save(root / "run" / "step_1", state())
    (root / CATALOG_DIR).symlink_to(victim.parent)
    with pytest.raises(CheckpointError, match="symbolic link"):
        Catalog(root)
    assert untouched(victim)


@pytest.mark.parametrize("kind", ["link", "fifo"])
def test_registry_entry_never_followed(tmp_path: Path, victim: Path, kind: str) -> None:
    root, checkpoint = registered_root(tmp_path)
    plant(root / CATALOG_DIR / "registry" / "m.json", kind, victim)
    with pytest.raises(CheckpointError, match=r"symbolic link|not a regular file"):
        Registry(root).show("m")
    with pytest.raises(CheckpointError, match=r"symbolic link|not a regular file"):
        Registry(root).register("m", checkpoint)
    assert untouched(victim)


@pytest.mark.parametrize("kind", ["link", "fifo"])
def test_registry_lock_never_followed(tmp_path: Path, victim: Path, kind: str) -> None:
    """The registry's ``.lock`` (an flock) went with issue 14: changes are compare-and-swaps of
    one document each. A link or FIFO planted where it was is neither opened nor followed."""
    root, checkpoint = registered_root(tmp_path)
    plant(root / CATALOG_DIR / "registry" / ".lock", kind, victim)
    assert Registry(root).register("m", checkpoint)["version"] == 2
    assert untouched(victim)


@pytest.mark.parametrize("kind", ["link", "fifo"])
def test_pin_marker_never_followed(tmp_path: Path, victim: Path, kind: str) -> None:
    """The registry's pin list is read by retention (a FIFO hung it) and rewritten by register."""
    root, checkpoint = registered_root(tmp_path)
    plant(checkpoint.parent / REGISTERED_NAME, kind, victim)
    with pytest.raises(CheckpointError, match=r"symbolic link|not a regular file"):
        registered_in(checkpoint.parent)
    with pytest.raises(CheckpointError, match=r"symbolic link|not a regular file"):
        Registry(root).register("m", checkpoint)
    assert untouched(victim)


def test_fifo_run_json_and_manifest_never_block_the_catalog(tmp_path: Path) -> None:
    root = tmp_path / "root"
    cv.save(root / "run" / "step_1", state())
    cv.save(root / "run" / "step_2", state(1))
    os.mkfifo(root / "run" / "run.json")
    manifest = root / "run" / "step_2" / "manifest.json"
    manifest.unlink()
    os.mkfifo(manifest)
    with Catalog(root) as catalog:
        assert [row.name for row in catalog.find("")] == ["step_1"]


def test_oversized_bookkeeping_file_refused_before_reading(tmp_path: Path) -> None:
    """Every read is size-checked before it allocates: a sparse 1 TiB pins.json is refused."""
    run = tmp_path / "run"
    made_run(run)
    with open(run / "pins.json", "wb") as handle:
        handle.truncate(1 << 40)
    with pytest.raises(CheckpointError, match="bytes"):
        manager(run)
