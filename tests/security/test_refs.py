"""Caches and references never override the truth (issue 13, class 5): registry references pin the
checkpoint id and stay inside the root; a chunk found bad is never referenced again by a save."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import ckptvault as cv
from ckptvault.catalog.registry import Registry, RegistryError, ReplacedCheckpointError
from ckptvault.catalog.store import CATALOG_DIR
from ckptvault.engine.gc import collect_garbage
from ckptvault.errors import CorruptCheckpointError
from ckptvault.storage.chunkstore import STORE_NAME, ChunkStore

pytestmark = pytest.mark.timeout(60)


def state(seed: int = 0) -> dict[str, np.ndarray]:
    return {"w": np.arange(40000, dtype=np.float32) + seed, "b": np.full(8, seed, dtype=np.int64)}


# -- registry references -----------------------------------------------------------------------------
def test_reference_to_a_replaced_checkpoint_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``registry://m@production`` resolved to whatever the path held now: an overwrite of the
    registered checkpoint silently served different weights under the production alias."""
    root = tmp_path / "root"
    checkpoint = root / "run" / "step_1"
    cv.save(checkpoint, state(1))
    Registry(root).register("m", checkpoint, alias="production")
    monkeypatch.setenv("CKPTVAULT_ROOT", str(root))
    assert np.array_equal(cv.load("registry://m@production")["w"], state(1)["w"])
    cv.save(checkpoint, state(2), overwrite=True)
    with pytest.raises(ReplacedCheckpointError, match="registered"):
        Registry(root).resolve("m", "production")
    with pytest.raises(ReplacedCheckpointError):
        cv.load("registry://m@production")


@pytest.mark.parametrize("where", ["../outside/step_1", "/abs/step_1", "link/step_1"])
def test_entry_outside_the_root_is_refused(tmp_path: Path, where: str) -> None:
    """A hand-edited entry pointed anywhere (``..``, an absolute path, a symlink out of the root)."""
    root = tmp_path / "root"
    checkpoint = root / "run" / "step_1"
    cv.save(checkpoint, state(1))
    outside = tmp_path / "outside" / "step_1"
    cv.save(outside, state(9))
    (root / "link").symlink_to(tmp_path / "outside")
    registry = Registry(root)
    registry.register("m", checkpoint)
    entry_file = root / CATALOG_DIR / "registry" / "m.json"
    doc = json.loads(entry_file.read_text())
    doc["versions"][0]["checkpoint"] = where.replace("/abs", str(tmp_path / "outside"))
    doc["versions"][0]["checkpoint_id"] = cv.info(outside).checkpoint_id
    entry_file.write_text(json.dumps(doc))
    with pytest.raises(RegistryError, match="root"):
        registry.resolve("m")


def test_entry_without_checkpoint_id_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    checkpoint = root / "run" / "step_1"
    cv.save(checkpoint, state(1))
    Registry(root).register("m", checkpoint)
    entry_file = root / CATALOG_DIR / "registry" / "m.json"
    doc = json.loads(entry_file.read_text())
    del doc["versions"][0]["checkpoint_id"]
    entry_file.write_text(json.dumps(doc))
    with pytest.raises(RegistryError, match="checkpoint id"):
        Registry(root).resolve("m")


def test_unchanged_reference_still_resolves(tmp_path: Path) -> None:
    root = tmp_path / "root"
    checkpoint = root / "run" / "step_1"
    cv.save(checkpoint, state(1))
    Registry(root).register("m", checkpoint, alias="production")
    assert Registry(root).resolve("m", "production") == root / "run" / "step_1"


# -- chunks found bad ---------------------------------------------------------------------------------
def rot_one_chunk(run: Path) -> Path:
    """Flips one byte of the largest chunk in place (same size, same inode): bit rot."""
    chunks = [p for p, digest in ChunkStore(run / STORE_NAME).iter_files() if digest is not None]
    victim = max(chunks, key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    return victim


@pytest.mark.parametrize("found_by", ["load", "verify"])
def test_bad_chunk_is_rewritten_by_the_next_save(tmp_path: Path, found_by: str) -> None:
    """Dedup referenced a chunk whose bytes a load had just found bad: the next incremental save
    "succeeded" and produced a checkpoint that could not be loaded."""
    run = tmp_path / "run"
    cv.save(run / "step_1", state(), incremental=True, chunk_bytes=16384)
    rot_one_chunk(run)
    if found_by == "load":
        with pytest.raises(CorruptCheckpointError):
            cv.load(run / "step_1")
    else:
        assert not cv.verify(run / "step_1").ok
    cv.save(run / "step_2", state(), incremental=True, chunk_bytes=16384)
    loaded = cv.load(run / "step_2")
    assert np.array_equal(loaded["w"], state()["w"])
    assert cv.verify(run / "step_2").ok
    collect_garbage(run)  # prunes nothing still in use, and the new checkpoint stays whole
    assert cv.verify(run / "step_2").ok


def test_bad_chunk_is_rewritten_by_a_manager_trusting_version_counters(tmp_path: Path) -> None:
    """The manager's hint cache skipped even the store lookup for unchanged tensors: a chunk found
    bad by ``restore``'s load was referenced again by every later save."""
    torch = pytest.importorskip("torch")
    run = tmp_path / "run"
    model = torch.nn.Linear(128, 128)
    train = cv.TrainState(model)
    with cv.CheckpointManager(
        run, every_n_steps=1, incremental=True, chunk_bytes=16384, validate="checksum"
    ) as m:
        train.step = 1
        m.step(train)
        rot_one_chunk(run)
        first = m.checkpoints()[-1].name
        with pytest.raises(CorruptCheckpointError):
            cv.load(run / first)
        train.step = 2
        m.step(train)  # the weights did not change: the hint says "reuse every chunk"
        newest = m.checkpoints()[-1].name
    assert newest != first
    cv.load(run / newest)
    assert cv.verify(run / newest).ok
