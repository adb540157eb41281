"""Lazy reads of single tensors: the data file's header is proven by size, length and digest but not
decoded, so every byte range read must be bounded by the manifest's own checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptvault as cv
from ckptvault.engine import reader as reader_module
from ckptvault.format import manifest as manifest_module


def _rewrite(path: Path, change: Any) -> None:
    doc = json.loads((path / "manifest.json").read_text())
    change(doc)
    (path / "manifest.json").write_text(json.dumps(doc))


def _save(ckpt_dir: Path) -> Path:
    path = ckpt_dir / "lazy"
    cv.save(path, {"a": np.arange(6, dtype=np.float32), "b": {"c": np.ones((2, 3))}})
    return path


def test_a_lazy_read_decodes_each_header_once(ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lazy reader refuses what ``load`` refuses: a data file's header is decoded and
    cross-checked on its first read -- and only then, not again per tensor."""
    path = _save(ckpt_dir)
    calls: list[int] = []
    real = reader_module.parse_header

    def counting(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(reader_module, "parse_header", counting)
    with cv.open(path) as ck:
        assert (ck["a"] == np.arange(6, dtype=np.float32)).all()
        assert (ck["b"]["c"] == 1).all()
        assert (ck["a"] == np.arange(6, dtype=np.float32)).all()
    files = len(list(path.glob("data-*.safetensors")))
    assert len(calls) == files


def test_a_lazy_read_still_proves_the_header_bytes(ckpt_dir: Path) -> None:
    path = _save(ckpt_dir)
    data = next(path.glob("data-*.safetensors"))
    raw = bytearray(data.read_bytes())
    raw[10] ^= 0x20  # inside the header JSON: same length, different bytes
    data.write_bytes(bytes(raw))
    for verify in (True, False):
        with cv.open(path, verify=verify) as ck, pytest.raises(cv.CorruptCheckpointError) as err:
            ck["a"]
        assert err.value.kind == "digest-mismatch"


def test_a_range_past_the_end_of_its_file_is_refused(ckpt_dir: Path) -> None:
    path = _save(ckpt_dir)

    def stretch(doc: dict[str, Any]) -> None:
        size = doc["files"][doc["tensors"]["a"]["file"]]["size"]
        doc["tensors"]["a"]["shape"] = [size]
        doc["tensors"]["a"]["offsets"] = [0, size * 4]
        doc["tree"]["v"]["a"]["shape"] = [size]

    _rewrite(path, stretch)
    for mmap in (False, True):
        with cv.open(path, verify=False, mmap=mmap) as ck, pytest.raises(cv.CorruptCheckpointError) as err:
            ck["a"]
        assert "past the end" in str(err.value) or "disagrees with the manifest" in str(err.value)
    with pytest.raises(cv.CheckpointError):
        cv.load(path)


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t.update(offsets=[t["offsets"][0], t["offsets"][1] - 4]),  # fewer bytes than the shape
        lambda t: t.update(shape=[7]),
        lambda t: t.update(shape=[2**63, 0]),  # beyond int64, beside a zero
        lambda t: t.update(shape=[True, 6]),
        lambda t: t.update(offsets=[4, 0]),
        lambda t: t.update(digest="A" * 64),
    ],
)
def test_manifest_tensor_entries_must_fit_dtype_and_shape(ckpt_dir: Path, change: Any) -> None:
    path = _save(ckpt_dir)
    _rewrite(path, lambda doc: change(doc["tensors"]["a"]))
    with pytest.raises(cv.CorruptCheckpointError) as err:
        cv.open(path)
    assert err.value.kind == "bad-manifest"


def test_fast_tensor_table_matches_a_plain_reading(ckpt_dir: Path) -> None:
    """The inline checks of the tensor table build exactly the entries a plain reading would."""
    path = ckpt_dir / "many"
    cv.save(path, {f"t{i}": np.full(i % 5 + 1, i, dtype=np.int16) for i in range(300)})
    doc = json.loads((path / "manifest.json").read_text())
    parsed = manifest_module.parse_manifest((path / "manifest.json").read_bytes())
    assert list(parsed.tensors) == list(doc["tensors"])
    for name, raw in doc["tensors"].items():
        entry = parsed.tensors[name]
        assert (entry.file, entry.dtype, list(entry.shape), list(entry.offsets), entry.digest) == (
            raw["file"],
            raw["dtype"],
            raw["shape"],
            raw["offsets"],
            raw["digest"],
        )


def test_lazy_dict_lookup_keeps_key_types(ckpt_dir: Path) -> None:
    path = ckpt_dir / "keys"
    cv.save(path, {"plain": {"1": np.zeros(1)}, "mixed": {1: np.ones(1), "1": np.zeros(1)}})
    with cv.open(path) as ck:
        assert (ck["plain"]["1"] == 0).all()
        with pytest.raises(KeyError):
            ck["plain"][1]
        with pytest.raises(KeyError):
            ck["plain"]["missing"]
        assert (ck["mixed"][1] == 1).all() and (ck["mixed"]["1"] == 0).all()


def test_overlapped_read_hashes_exactly_what_it_filled() -> None:
    import blake3

    from ckptvault.engine.overlap import PIECE, read_and_hash

    source = np.random.default_rng(0).integers(0, 256, size=3 * PIECE + 123, dtype=np.uint8)
    out = np.zeros_like(source)

    def read_into(offset: int, piece: memoryview) -> None:
        piece[:] = source[offset : offset + len(piece)].data

    digest = read_and_hash(read_into, memoryview(out.data), blake3.blake3())
    assert (out == source).all() and digest == blake3.blake3(source.data).hexdigest()

    def failing(offset: int, piece: memoryview) -> None:
        if offset >= PIECE:
            raise OSError("gone")
        read_into(offset, piece)

    with pytest.raises(OSError, match="gone"):
        read_and_hash(failing, memoryview(out.data), blake3.blake3())


def test_a_big_tensor_read_alone_is_verified(ckpt_dir: Path) -> None:
    path = ckpt_dir / "big"
    big = np.arange(3 << 20, dtype=np.float32)  # 12 MiB: past the size read and hashed side by side
    cv.save(path, {"big": big, "small": np.ones(3)})
    with cv.open(path) as ck:
        assert (ck["big"] == big).all()
    data = next(path.glob("data-*.safetensors"))
    with open(data, "r+b") as fh:
        fh.seek(-4096, 2)
        fh.write(b"\x01" * 16)  # inside the big tensor, past its first pieces
    with cv.open(path) as ck, pytest.raises(cv.CorruptCheckpointError) as err:
        ck["big"]
    assert err.value.kind == "digest-mismatch"
