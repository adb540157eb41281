"""copy_checkpoint: a committed checkpoint copied between storages -- verified, incremental, committed
last, nothing visible on failure, and a no-op when the destination already holds it.

Destinations: the in-memory backend (object-store semantics) and the local backend in another
directory; the source is always a run on local disk (what the manager's mirror uploads)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import ckptvault as cv
from ckptvault.engine.loading import read_checkpoint
from ckptvault.engine.transfer import CopyReport, copy_checkpoint
from ckptvault.engine.verify import verify_checkpoint
from ckptvault.storage.base import Storage
from ckptvault.storage.local import LocalStorage
from ckptvault.storage.memory import MemoryStorage
from ckptvault.testing.fault_storage import FaultyStorage, SimulatedCrash

CHUNK = 64 * 1024  # 16 rows of a 1024-column float32 matrix


def make_state(seed: int = 0) -> dict[str, object]:
    torch.manual_seed(seed)
    return {
        "big": torch.randn(1024, 1024),  # 4 MiB: 64 chunks
        "small": {"b": torch.randn(16), "empty": torch.zeros(0)},
        "step": 7,
        "note": "hello",
    }


def same(a: dict[str, object], b: dict[str, object]) -> bool:
    big_a, big_b = a["big"], b["big"]
    assert isinstance(big_a, torch.Tensor) and isinstance(big_b, torch.Tensor)
    small_a, small_b = a["small"], b["small"]
    assert isinstance(small_a, dict) and isinstance(small_b, dict)
    return (
        torch.equal(big_a, big_b)
        and all(torch.equal(small_a[k], small_b[k]) for k in ("b", "empty"))
        and a["step"] == b["step"]
        and a["note"] == b["note"]
    )


def load(storage: Storage, key: str) -> dict[str, object]:
    tree = read_checkpoint(storage, key, map_location="cpu", verify=True, threads=2, mapped=False)
    assert isinstance(tree, dict)
    return tree


def memory_dst(tmp_path: Path) -> tuple[Storage, str]:
    return MemoryStorage(), "bucket/mirror"


def local_dst(tmp_path: Path) -> tuple[Storage, str]:
    root = tmp_path / "mirror"
    root.mkdir(parents=True)
    return LocalStorage(root), str(root)


DESTINATIONS: dict[str, Callable[[Path], tuple[Storage, str]]] = {"memory": memory_dst, "local": local_dst}


@pytest.fixture(params=sorted(DESTINATIONS))
def dst(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Storage, str]:
    return DESTINATIONS[request.param](tmp_path)


@pytest.fixture
def run(tmp_path: Path) -> tuple[LocalStorage, Path]:
    root = tmp_path / "run"
    root.mkdir()
    return LocalStorage(root), root


def test_full_copy_round_trips_and_verifies(run: tuple[LocalStorage, Path], dst: tuple[Storage, str]) -> None:
    src, root = run
    storage, base = dst
    state = make_state()
    cv.save(root / "step_1", state, incremental=True, chunk_bytes=CHUNK)
    target = storage.join(base, "step_1")
    seen: list[int] = []
    report = copy_checkpoint(
        src, str(root / "step_1"), storage, target, part_bytes=4096, threads=3, progress=seen.append
    )
    assert not report.already_present and report.files == 2  # data file and sidecar
    assert report.chunks_copied == 64 and report.chunks_skipped == 0
    assert report.bytes_copied >= 4 * 1024 * 1024 and sum(seen) == report.bytes_copied
    assert verify_checkpoint(storage, target).ok
    assert same(load(storage, target), state)
    src_manifest = src.open(str(root / "step_1")).read_manifest()
    assert storage.open(target).read_manifest() == src_manifest  # committed unchanged


def test_plain_compressed_and_sha256_checkpoints_copy(
    run: tuple[LocalStorage, Path], dst: tuple[Storage, str]
) -> None:
    src, root = run
    storage, base = dst
    state = make_state(1)
    cv.save(root / "plain", state, digest="sha256")
    cv.save(root / "zstd", state, compression="zstd", chunk_bytes=CHUNK)
    for name in ("plain", "zstd"):
        target = storage.join(base, name)
        copy_checkpoint(src, str(root / name), storage, target, part_bytes=8192)
        assert verify_checkpoint(storage, target).ok, name
        assert same(load(storage, target), state)


def test_incremental_copy_sends_only_changed_chunks(
    run: tuple[LocalStorage, Path], dst: tuple[Storage, str]
) -> None:
    src, root = run
    storage, base = dst
    state = make_state()
    cv.save(root / "step_1", state, incremental=True, chunk_bytes=CHUNK)
    full = copy_checkpoint(src, str(root / "step_1"), storage, storage.join(base, "step_1"))
    big = state["big"]
    assert isinstance(big, torch.Tensor)
    big[:96] += 1.0  # 96 of 1024 rows: 6 of 64 chunks, about 10% of the bytes
    cv.save(root / "step_2", state, incremental=True, chunk_bytes=CHUNK)
    second = copy_checkpoint(src, str(root / "step_2"), storage, storage.join(base, "step_2"))
    assert second.chunks_copied == 6 and second.chunks_skipped == 58
    assert second.bytes_copied <= 0.12 * full.bytes_copied, (second, full)
    assert second.bytes_skipped == 58 * CHUNK
    assert same(load(storage, storage.join(base, "step_2")), state)
    assert verify_checkpoint(storage, storage.join(base, "step_1")).ok  # the shared chunks serve both


def test_identical_copy_is_a_no_op(run: tuple[LocalStorage, Path], dst: tuple[Storage, str]) -> None:
    src, root = run
    storage, base = dst
    cv.save(root / "step_1", make_state(), incremental=True, chunk_bytes=CHUNK)
    target = storage.join(base, "step_1")
    copy_checkpoint(src, str(root / "step_1"), storage, target)
    token = storage.change_token(base)
    again = copy_checkpoint(src, str(root / "step_1"), storage, target)
    assert again.already_present
    assert (again.files, again.bytes_copied, again.chunks_copied) == (0, 0, 0)
    assert storage.change_token(base) == token  # nothing was rewritten


def test_a_different_checkpoint_needs_overwrite(
    run: tuple[LocalStorage, Path], dst: tuple[Storage, str]
) -> None:
    src, root = run
    storage, base = dst
    cv.save(root / "a", make_state(1))
    cv.save(root / "b", make_state(2))
    target = storage.join(base, "x")
    copy_checkpoint(src, str(root / "a"), storage, target)
    with pytest.raises(cv.CheckpointExistsError):
        copy_checkpoint(src, str(root / "b"), storage, target)
    assert same(load(storage, target), make_state(1))
    copy_checkpoint(src, str(root / "b"), storage, target, overwrite=True)
    assert same(load(storage, target), make_state(2))
    with pytest.raises(cv.CheckpointNotFoundError):
        copy_checkpoint(src, str(root / "missing"), storage, storage.join(base, "y"))


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _nothing_at(storage: Storage, key: str) -> None:
    with pytest.raises(cv.CheckpointNotFoundError):
        storage.open(key)


@pytest.mark.parametrize("where", ["tensor", "header", "sidecar"])
def test_a_corrupt_source_file_fails_the_copy_and_commits_nothing(
    run: tuple[LocalStorage, Path], dst: tuple[Storage, str], where: str
) -> None:
    src, root = run
    storage, base = dst
    cv.save(root / "step_1", make_state())
    data = root / "step_1" / "data-00000.safetensors"
    if where == "tensor":
        _flip(data, data.stat().st_size - 100)
    elif where == "header":
        _flip(data, 20)
    else:
        (sidecar,) = (root / "step_1").glob("*.meta.json")
        _flip(sidecar, 5)
    target = storage.join(base, "step_1")
    with pytest.raises(cv.CorruptCheckpointError):
        copy_checkpoint(src, str(root / "step_1"), storage, target)
    _nothing_at(storage, target)


def test_a_corrupt_source_chunk_fails_the_copy_and_commits_nothing(
    run: tuple[LocalStorage, Path], dst: tuple[Storage, str]
) -> None:
    src, root = run
    storage, base = dst
    cv.save(root / "step_1", make_state(), incremental=True, chunk_bytes=CHUNK)
    chunks = sorted(p for p in (root / ".ckptvault-store").rglob("*.raw") if p.is_file())
    assert len(chunks) == 64
    _flip(chunks[10], 1000)
    target = storage.join(base, "step_1")
    with pytest.raises(cv.CorruptCheckpointError) as caught:
        copy_checkpoint(src, str(root / "step_1"), storage, target)
    assert caught.value.kind == "digest-mismatch"
    _nothing_at(storage, target)


@pytest.mark.parametrize("kind", sorted(DESTINATIONS))
def test_a_crash_at_any_point_leaves_nothing_visible_and_a_retry_succeeds(
    run: tuple[LocalStorage, Path], tmp_path: Path, kind: str
) -> None:
    src, root = run
    state = make_state()
    big = state["big"]
    assert isinstance(big, torch.Tensor)
    big.zero_()  # one distinct chunk (64 references): every call of the copy is a crash point below
    cv.save(root / "step_1", state, incremental=True, chunk_bytes=CHUNK)
    probe = FaultyStorage(MemoryStorage())
    copy_checkpoint(src, str(root / "step_1"), probe, "probe/step_1", part_bytes=4096)
    total = probe.calls
    assert total > 5
    for point in range(1, total + 1):
        storage, base = DESTINATIONS[kind](tmp_path / f"crash_{point}")  # fresh: the same calls again
        target = storage.join(base, "step_1")
        with pytest.raises(SimulatedCrash):
            copy_checkpoint(
                src, str(root / "step_1"), FaultyStorage(storage, fail_at=point), target, part_bytes=4096
            )
        _nothing_at(storage, target)
        report: CopyReport = copy_checkpoint(src, str(root / "step_1"), storage, target, part_bytes=4096)
        assert not report.already_present
        assert verify_checkpoint(storage, target).ok
        assert same(load(storage, target), state)
