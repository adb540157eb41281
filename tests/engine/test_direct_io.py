"""O_DIRECT data files: the same bytes as buffered writes, exact length, fallback where unsupported."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import ckptvault as cv
from ckptvault.storage import local_write as local


def _state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    # ~20 MiB, more than two 8 MiB bounce buffers, and a tail that is not a multiple of 4096.
    return {"a": rng.standard_normal(5_000_003).astype(np.float32), "b": np.arange(7, dtype=np.int16)}


def test_direct_and_buffered_writes_give_identical_files(
    ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    real = local.open_writable

    def spy(path: Path, *, direct: bool) -> object:
        handle = real(path, direct=direct)
        opened.append(type(handle).__name__)
        return handle

    monkeypatch.setattr(local, "open_writable", spy)
    state = _state()
    monkeypatch.setenv("CKPTVAULT_DIRECT_IO", "1")
    cv.save(ckpt_dir / "direct", state)
    monkeypatch.setenv("CKPTVAULT_DIRECT_IO", "0")
    cv.save(ckpt_dir / "buffered", state)
    assert "DirectWritableFile" in opened, "the O_DIRECT path was not taken"
    data = "data-00000.safetensors"
    direct, buffered = (ckpt_dir / "direct" / data).read_bytes(), (ckpt_dir / "buffered" / data).read_bytes()
    assert len(direct) % 4096 != 0  # the padding was truncated away
    # Same layout; only the checkpoint id in the header differs.
    assert len(direct) == len(buffered)
    header = 8 + int.from_bytes(direct[:8], "little")
    assert direct[header:] == buffered[header:]
    assert cv.verify(ckpt_dir / "direct").ok
    back = cv.load(ckpt_dir / "direct")
    assert np.array_equal(back["a"], state["a"]) and np.array_equal(back["b"], state["b"])


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no tmpfs at /dev/shm on this machine")
def test_filesystem_without_o_direct_falls_back_to_buffered(tmp_path: Path) -> None:
    # tmpfs refuses O_DIRECT with EINVAL; the save must still succeed.
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        target = Path(shm) / "ckpt"
        cv.save(target, _state())
        assert cv.verify(target).ok


def test_a_failed_direct_write_fails_the_save_and_leaves_nothing(
    ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: object, view: memoryview) -> None:
        raise OSError(5, "Input/output error (injected)")

    monkeypatch.setattr(local.DirectWritableFile, "_write_all", broken)
    with pytest.raises(cv.StorageError, match="injected"):
        cv.save(ckpt_dir / "x", _state())
    assert [p for p in os.listdir(ckpt_dir) if not p.startswith(".")] == []
