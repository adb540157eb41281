"""Chunked tensors: incremental (deduplicated) and compressed saves, their corruption, the hint cache."""

from __future__ import annotations

import copy
import json
import shutil
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file as load_safetensors
from tests.helpers import assert_exact
from typer.testing import CliRunner

import ckptvault as cv
from ckptvault.api import storage_for
from ckptvault.cli.main import app
from ckptvault.engine import chunks
from ckptvault.engine.chunks import ChunkOptions, HintCache
from ckptvault.engine.writer import write_checkpoint
from ckptvault.storage.chunkstore import STORE_NAME

CHUNK = 4096


# -- helpers ------------------------------------------------------------------------------------
def chunk_files(run: Path) -> list[Path]:
    """Every committed chunk file of a run's store (temporary files excluded)."""
    root = run / STORE_NAME / "chunks"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("*/*") if not p.name.startswith("."))


def manifest_of(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / "manifest.json").read_text())


def write_manifest(checkpoint: Path, doc: dict[str, Any]) -> None:
    (checkpoint / "manifest.json").write_text(json.dumps(doc, indent=1))


def chunk_lists(checkpoint: Path) -> dict[str, list[list[Any]]]:
    """Tensor name -> its chunk references, for the chunked tensors of a checkpoint."""
    return {n: t["chunks"] for n, t in manifest_of(checkpoint)["tensors"].items() if "chunks" in t}


def chunk_path(run: Path, ref: list[Any]) -> Path:
    digest, _, _, codec = ref
    return run / STORE_NAME / "chunks" / digest[:2] / f"{digest}.{codec}"


def snapshot(value: Any) -> Any:
    """A deep copy of a state with every tensor/array cloned (what a save must have captured)."""
    if isinstance(value, torch.Tensor):
        out = value.detach().clone()
        if isinstance(value, torch.nn.Parameter):
            return torch.nn.Parameter(out, requires_grad=value.requires_grad)
        return out
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, dict):
        out = copy.copy(value)  # keeps OrderedDict and its _metadata
        for key, item in value.items():
            out[key] = snapshot(item)
        return out
    return value


def rich_state() -> dict[str, Any]:
    """Every dtype family, tied weights, non-contiguous views and small tensors beside big ones."""
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    base = torch.randn(64, 64, generator=g)
    emb = torch.randn(128, 32, generator=g)
    return {
        "f32": torch.randn(64, 64, generator=g),
        "bf16": torch.randn(96, 64, generator=g).to(torch.bfloat16),
        "f16_odd": torch.randn(2047, generator=g).half(),  # not a whole number of chunks
        "i64": torch.arange(3000, dtype=torch.int64) * 7 - 5000,
        "bool": torch.rand(9000, generator=g) > 0.5,
        "f8": torch.randn(5000, generator=g).to(torch.float8_e4m3fn),
        "np_f64": rng.standard_normal(1500),
        "np_u8": rng.integers(0, 256, 10000, dtype=np.uint8),
        "np_strided": np.arange(8192, dtype=np.int32).reshape(64, 128)[:, ::2],
        "emb": emb,
        "head": emb,  # tied: one stored tensor, one storage after loading
        "tview": base.t(),  # two different views of one storage: stored as its byte span
        "odd_rows": base[1::2],
        "alone_strided": torch.randn(128, 64, generator=g)[:, ::2],
        "param": torch.nn.Parameter(torch.randn(64, 32, generator=g)),
        "small": torch.ones(3),
        "meta": {"step": 3, "lr": 0.1, "name": "run"},
    }


def raises_checkpoint_error(action: Callable[[], Any]) -> cv.CheckpointError:
    """Runs ``action``; it must raise, and only a ckptvault error."""
    try:
        action()
    except cv.CheckpointError as exc:
        return exc
    except BaseException as exc:  # the point of the check: nothing else may escape
        raise AssertionError(f"raised {type(exc).__name__}, not a CheckpointError: {exc}") from exc
    raise AssertionError("did not raise")


def lazy_get(checkpoint: Path, key: str) -> Any:
    with cv.open(checkpoint) as view:
        return view[key]


def new_chunk_puts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the digest of every chunk a save hashes and offers to the store."""
    calls: list[str] = []
    lock = threading.Lock()
    original = chunks._put_chunk

    def counting(store: Any, algorithm: str, piece: np.ndarray, *args: Any) -> Any:
        ref, written = original(store, algorithm, piece, *args)
        with lock:
            calls.append(ref.digest)
        return ref, written

    monkeypatch.setattr(chunks, "_put_chunk", counting)
    return calls


# -- round trip ---------------------------------------------------------------------------------
MODES = {
    "incremental": {"incremental": True},
    "auto": {"compression": "auto"},
    "zstd": {"compression": "zstd"},
    "lz4": {"compression": "lz4"},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_round_trip_is_bit_exact_in_every_mode(tmp_path: Path, mode: str) -> None:
    run = tmp_path / "run"
    state = rich_state()
    expected = snapshot(state)
    info = cv.save(run / "ck", state, chunk_bytes=CHUNK, **MODES[mode])
    doc = manifest_of(run / "ck")
    assert doc["required_features"] == ["chunked-tensors"]
    lists = chunk_lists(run / "ck")
    assert {"f32", "bf16", "i64", "bool", "f8", "np_f64", "np_u8", "emb", "param"} <= set(lists)
    assert "small" not in lists and doc["tensors"]["small"]["file"] == "data-00000.safetensors"
    assert "emb" in lists and "head" not in doc["tensors"]  # tied weights stored once
    codecs = {ref[3] for refs in lists.values() for ref in refs}
    for refs in lists.values():
        assert [r[1] for r in refs[:-1]] == [CHUNK] * (len(refs) - 1) and 0 < refs[-1][1] <= CHUNK
        for ref in refs:
            path = chunk_path(run, ref)
            assert path.is_file() and path.stat().st_size == ref[2]
    expected_codecs = {"incremental": {"raw"}, "lz4": {"raw", "lz4"}}.get(mode, {"raw", "zstd"})
    assert "raw" in codecs and codecs <= expected_codecs and len(codecs) == 2 - (mode == "incremental")
    assert info.size_bytes >= sum(ref[2] for refs in lists.values() for ref in refs)

    back = cv.load(run / "ck")
    assert_exact(expected, back)
    assert back["emb"].untyped_storage().data_ptr() == back["head"].untyped_storage().data_ptr()
    assert back["tview"].untyped_storage().data_ptr() == back["odd_rows"].untyped_storage().data_ptr()
    assert_exact(expected, cv.load(run / "ck", mmap=False))
    report = cv.verify(run / "ck")
    assert report.ok, report.problems
    assert report.tensors_checked == len(doc["tensors"])

    with cv.open(run / "ck") as view:
        assert_exact(expected["bf16"], view["bf16"])
        assert_exact(expected["np_strided"], view["np_strided"])
        assert_exact(expected["meta"], view["meta"].load())

    out = tmp_path / "export.safetensors"
    result = CliRunner().invoke(app, ["export", str(run / "ck"), str(out)])
    assert result.exit_code == 0, result.output
    exported = load_safetensors(str(out))
    assert set(exported) == set(doc["tensors"])
    for name in ("f32", "bf16", "f16_odd", "i64", "bool", "f8", "emb", "param", "small"):
        assert_exact(expected[name].detach(), exported[name])
    assert np.array_equal(exported["np_f64"].numpy(), expected["np_f64"])
    assert np.array_equal(exported["np_u8"].numpy(), expected["np_u8"])
    assert np.array_equal(exported["np_strided"].numpy(), expected["np_strided"])
    span = next(n for n in exported if n.endswith("#storage"))
    assert torch.equal(exported[span], expected["tview"].t().contiguous().view(torch.uint8).reshape(-1))


def test_export_of_chunked_checkpoint_loads_with_numpy_safetensors(tmp_path: Path) -> None:
    from safetensors.numpy import load_file as load_numpy

    from ckptvault.engine.inspect import export_safetensors

    rng = np.random.default_rng(1)
    state = {"a": rng.standard_normal((64, 80)).astype(np.float32), "b": np.arange(5000, dtype=np.int64)}
    cv.save(tmp_path / "run" / "ck", state, compression="zstd", chunk_bytes=CHUNK)
    out = tmp_path / "plain.safetensors"
    storage, target = storage_for(tmp_path / "run" / "ck")
    size = export_safetensors(storage, target, str(out))
    assert size == out.stat().st_size
    loaded = load_numpy(str(out))
    assert set(loaded) == {"a", "b"}
    assert np.array_equal(loaded["a"], state["a"]) and np.array_equal(loaded["b"], state["b"])


# -- dedup ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("compression", [None, "zstd"])
def test_unchanged_data_writes_no_chunk_and_one_changed_row_writes_one(
    tmp_path: Path, compression: str | None
) -> None:
    run = tmp_path / "run"
    torch.manual_seed(0)
    table = torch.randn(256, 64)  # a row is 256 bytes: 16 rows per 4096-byte chunk
    state = {"table": table, "other": torch.randn(4096)}
    original = snapshot(state)
    cv.save(run / "a", state, incremental=True, compression=compression, chunk_bytes=CHUNK)
    first = chunk_files(run)
    assert len(first) == 16 + 4
    inodes = {p: p.stat().st_ino for p in first}
    cv.save(run / "b", state, incremental=True, compression=compression, chunk_bytes=CHUNK)
    assert chunk_files(run) == first
    assert {p: p.stat().st_ino for p in first} == inodes  # referenced, not rewritten
    assert chunk_lists(run / "a") == chunk_lists(run / "b")

    with torch.no_grad():
        table[37] += 1.0
    changed = snapshot(state)
    cv.save(run / "c", state, incremental=True, compression=compression, chunk_bytes=CHUNK)
    new = sorted(set(chunk_files(run)) - set(first))
    assert len(new) == 1 and len(chunk_files(run)) == len(first) + 1
    before, after = chunk_lists(run / "b")["table"], chunk_lists(run / "c")["table"]
    assert [i for i, (x, y) in enumerate(zip(before, after, strict=True)) if x != y] == [37 * 256 // CHUNK]
    assert chunk_path(run, after[37 * 256 // CHUNK]) == new[0]
    assert chunk_lists(run / "b")["other"] == chunk_lists(run / "c")["other"]
    for name, want in (("a", original), ("b", original), ("c", changed)):
        assert cv.verify(run / name).ok
        assert_exact(want, cv.load(run / name))


def test_a_chunk_stored_with_another_codec_is_referenced_not_rewritten(tmp_path: Path) -> None:
    run = tmp_path / "run"
    state = {"w": torch.arange(8192, dtype=torch.int64)}  # compresses well
    cv.save(run / "z", state, compression="zstd", chunk_bytes=CHUNK)
    stored = chunk_files(run)
    assert stored and {p.suffix for p in stored} == {".zstd"}
    cv.save(run / "plain", state, incremental=True, chunk_bytes=CHUNK)  # would be raw if written
    assert chunk_files(run) == stored
    assert {ref[3] for ref in chunk_lists(run / "plain")["w"]} == {"zstd"}
    assert_exact(state, cv.load(run / "plain"))


def test_incremental_save_of_a_small_state_stays_self_contained(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cv.save(run / "ck", {"w": torch.ones(100)}, incremental=True, chunk_bytes=CHUNK)  # < chunk/4
    assert manifest_of(run / "ck")["required_features"] == []
    assert chunk_files(run) == []
    assert torch.equal(cv.load(run / "ck")["w"], torch.ones(100))


def test_default_chunking_takes_every_tensor_of_64_kib_and_up(tmp_path: Path) -> None:
    """With the default 4 MiB chunks a 64 KiB tensor is its own chunk (a mirror then re-sends only
    what changed), while a bias-sized one stays in the data file."""
    run = tmp_path / "run"
    state = {"w": torch.randn(16384), "bias": torch.randn(16383), "big": torch.randn(1 << 20)}
    cv.save(run / "ck", state, incremental=True)
    lists = chunk_lists(run / "ck")
    assert set(lists) == {"w", "big"}
    assert [r[1] for r in lists["w"]] == [64 * 1024]
    assert [r[1] for r in lists["big"]] == [4 << 20]
    assert_exact(state, cv.load(run / "ck"))
    assert ChunkOptions().min_bytes == chunks.MIN_CHUNKED_BYTES == 64 * 1024


# -- compression ----------------------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["auto", "zstd"])
def test_compression_shrinks_bf16_and_stores_random_bytes_raw(tmp_path: Path, compression: str) -> None:
    run = tmp_path / "run"
    torch.manual_seed(0)
    noise = np.random.default_rng(0).integers(0, 256, 64 * 1024, dtype=np.uint8)
    state = {"bf16": torch.randn(256, 256).to(torch.bfloat16), "noise": noise}
    cv.save(run / "ck", state, compression=compression, chunk_bytes=16384)
    lists = chunk_lists(run / "ck")
    bf16 = lists["bf16"]
    assert sum(r[1] for r in bf16) == 256 * 256 * 2
    assert sum(r[2] for r in bf16) < 0.95 * 256 * 256 * 2
    assert {r[3] for r in bf16} == {"zstd"}
    assert {r[3] for r in lists["noise"]} == {"raw"}
    assert all(r[1] == r[2] for r in lists["noise"])
    assert_exact(state, cv.load(run / "ck"))


def test_lz4_compresses_low_entropy_planes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    state = {"ids": torch.arange(16384, dtype=torch.int64)}
    cv.save(run / "ck", state, compression="lz4", chunk_bytes=16384)
    refs = chunk_lists(run / "ck")["ids"]
    assert {r[3] for r in refs} == {"lz4"}
    assert sum(r[2] for r in refs) < 0.5 * 16384 * 8
    assert_exact(state, cv.load(run / "ck"))


def test_bad_chunk_options_are_refused() -> None:
    for bad in (4000, 100, 4096 + 32):
        with pytest.raises(ValueError):
            ChunkOptions(chunk_bytes=bad)
    with pytest.raises(ValueError):
        ChunkOptions(compression="gzip")


# -- corruption -----------------------------------------------------------------------------------
@pytest.fixture
def damaged_run(tmp_path: Path) -> Path:
    """A checkpoint with raw chunks (random bytes) and zstd chunks (bf16 weights)."""
    run = tmp_path / "run"
    torch.manual_seed(0)
    state = {
        "noise": np.random.default_rng(0).integers(0, 256, 4 * CHUNK, dtype=np.uint8),
        "bf16": torch.randn(64, 128).to(torch.bfloat16),
        "small": torch.ones(4),
    }
    cv.save(run / "ck", state, compression="zstd", chunk_bytes=CHUNK)
    lists = chunk_lists(run / "ck")
    assert {r[3] for r in lists["noise"]} == {"raw"} and {r[3] for r in lists["bf16"]} == {"zstd"}
    return run


def assert_corrupt(
    checkpoint: Path, kinds: set[str], tensor: str | None = None, *, named: bool = True
) -> None:
    """load() and lazy access of ``tensor`` fail with a typed error of one of ``kinds`` (naming the
    tensor if ``named``); verify() reports it."""
    err = raises_checkpoint_error(lambda: cv.load(checkpoint))
    assert isinstance(err, cv.CorruptCheckpointError) and err.kind in kinds, (type(err), err)
    if tensor is not None:
        assert err.tensor == tensor or not named, err
        lazy = raises_checkpoint_error(lambda: lazy_get(checkpoint, tensor))
        assert isinstance(lazy, cv.CorruptCheckpointError) and lazy.kind in kinds
    report = cv.verify(checkpoint)
    assert not report.ok
    assert {p.kind for p in report.problems} & kinds, report.problems


def test_missing_chunk(damaged_run: Path) -> None:
    ref = chunk_lists(damaged_run / "ck")["noise"][1]
    chunk_path(damaged_run, ref).unlink()
    assert_corrupt(damaged_run / "ck", {"missing-chunk"}, tensor="noise", named=False)
    err = raises_checkpoint_error(lambda: cv.load(damaged_run / "ck"))
    assert ref[0][:16] in str(err) and str(damaged_run / STORE_NAME) in str(err)


def test_truncated_chunk(damaged_run: Path) -> None:
    ref = chunk_lists(damaged_run / "ck")["bf16"][0]
    path = chunk_path(damaged_run, ref)
    with open(path, "r+b") as handle:
        handle.truncate(ref[2] - 1)
    assert_corrupt(damaged_run / "ck", {"truncated"}, tensor="bf16", named=False)


def test_chunk_with_extra_bytes(damaged_run: Path) -> None:
    ref = chunk_lists(damaged_run / "ck")["noise"][0]
    with open(chunk_path(damaged_run, ref), "ab") as handle:
        handle.write(b"\0")
    assert_corrupt(damaged_run / "ck", {"size-mismatch"}, tensor="noise", named=False)


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_store_level_chunk_errors_name_their_tensor(damaged_run: Path, damage: str) -> None:
    ref = chunk_lists(damaged_run / "ck")["noise"][1]
    path = chunk_path(damaged_run, ref)
    if damage == "delete":
        path.unlink()
    else:
        with open(path, "r+b") as handle:
            handle.truncate(10)
    err = raises_checkpoint_error(lambda: cv.load(damaged_run / "ck"))
    assert isinstance(err, cv.CorruptCheckpointError) and err.tensor == "noise"
    assert [p.tensor for p in cv.verify(damaged_run / "ck").problems] == ["noise"]


def flip(path: Path, offset: int) -> bytes:
    data = bytearray(path.read_bytes())
    original = bytes(data)
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))
    return original


def test_flipped_byte_in_raw_chunk(damaged_run: Path) -> None:
    ref = chunk_lists(damaged_run / "ck")["noise"][2]
    flip(chunk_path(damaged_run, ref), 1234)
    assert_corrupt(damaged_run / "ck", {"digest-mismatch"}, tensor="noise")
    err = raises_checkpoint_error(lambda: cv.load(damaged_run / "ck"))
    assert ref[0][:16] in str(err)


def test_flipped_bytes_in_zstd_frame(damaged_run: Path) -> None:
    ref = chunk_lists(damaged_run / "ck")["bf16"][1]
    path = chunk_path(damaged_run, ref)
    size = ref[2]
    # magic, version, itemsize, plane count, raw length, plane table, plane payloads, last byte
    for offset in (0, 4, 5, 6, 8, 17, 26, 40, size // 2, size - 40, size - 1):
        original = flip(path, offset)
        try:
            assert_corrupt(damaged_run / "ck", {"bad-chunk", "digest-mismatch"}, tensor="bf16")
        finally:
            path.write_bytes(original)
    assert cv.verify(damaged_run / "ck").ok


def test_zstd_plane_declaring_a_huge_size_is_a_bad_chunk(damaged_run: Path) -> None:
    ref = chunk_lists(damaged_run / "ck")["bf16"][0]
    raw_len, stored = ref[1], ref[2]
    head = struct.pack("<4sBBBBQ", b"CKVC", 1, 1, 1, 0, raw_len)
    body = stored - len(head) - 9
    block = body - 4 - 1 - 8 - 3
    # A zstd frame whose header promises 1 TiB of content; one raw block of junk.
    frame = (
        struct.pack("<I", 0xFD2FB528)
        + bytes([0xE0])
        + struct.pack("<Q", 1 << 40)
        + ((block << 3) | 1).to_bytes(3, "little")
        + b"\x07" * block
    )
    data = head + struct.pack("<BQ", 1, len(frame)) + frame
    assert len(data) == stored
    chunk_path(damaged_run, ref).write_bytes(data)
    assert_corrupt(damaged_run / "ck", {"bad-chunk"}, tensor="bf16")


def test_chunk_replaced_by_symlink_is_unsafe(damaged_run: Path, tmp_path: Path) -> None:
    ref = chunk_lists(damaged_run / "ck")["noise"][0]
    path = chunk_path(damaged_run, ref)
    outside = tmp_path / "outside.bin"
    shutil.copyfile(path, outside)  # same bytes: only the link itself is wrong
    path.unlink()
    path.symlink_to(outside)
    err = raises_checkpoint_error(lambda: cv.load(damaged_run / "ck"))
    assert isinstance(err, cv.UnsafeCheckpointError)
    assert isinstance(
        raises_checkpoint_error(lambda: lazy_get(damaged_run / "ck", "noise")), cv.UnsafeCheckpointError
    )
    assert "unsafe" in {p.kind for p in cv.verify(damaged_run / "ck").problems}


def test_chunk_replaced_by_directory_is_unsafe(damaged_run: Path) -> None:
    ref = chunk_lists(damaged_run / "ck")["noise"][0]
    path = chunk_path(damaged_run, ref)
    path.unlink()
    path.mkdir()
    err = raises_checkpoint_error(lambda: cv.load(damaged_run / "ck"))
    assert isinstance(err, cv.CorruptCheckpointError)
    assert not cv.verify(damaged_run / "ck").ok


def _edit_refs(edit: Callable[[list[list[Any]]], Any]) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        result = edit(doc["tensors"]["noise"]["chunks"])
        if result is not None:
            doc["tensors"]["noise"]["chunks"] = result

    return apply


def _set(index: int, field: int, value: Any) -> Callable[[dict[str, Any]], None]:
    return _edit_refs(lambda refs: refs[index].__setitem__(field, value))


BAD_MANIFESTS: dict[str, Callable[[dict[str, Any]], None]] = {
    "digest-short": _set(0, 0, "ab" * 31),
    "digest-upper": _edit_refs(lambda refs: refs[0].__setitem__(0, refs[0][0].upper())),
    "digest-path": _set(0, 0, "../../../../etc/passwd" + "0" * 42),
    "digest-not-string": _set(0, 0, 12345),
    "codec-unknown": _set(0, 3, "gzip"),
    "codec-path": _set(0, 3, "raw/../../x"),
    "raw-len-zero": _set(0, 1, 0),
    "raw-len-negative": _set(0, 1, -4096),
    "raw-len-float": _set(0, 1, 4096.0),
    "raw-len-bool": _set(3, 1, True),
    "raw-len-huge": _set(0, 1, 1 << 31),
    "raw-stored-differ": _set(0, 2, CHUNK - 1),
    "zstd-stored-too-big": _edit_refs(
        lambda refs: refs[0].__setitem__(3, "zstd") or refs[0].__setitem__(2, CHUNK + 1)
    ),
    "zstd-stored-zero": _edit_refs(lambda refs: refs[0].__setitem__(3, "zstd") or refs[0].__setitem__(2, 0)),
    "ref-too-short": _edit_refs(lambda refs: refs[0].pop()),
    "ref-not-list": _edit_refs(lambda refs: [{"digest": refs[0][0]}, *refs[1:]]),
    "chunk-missing": _edit_refs(lambda refs: refs[:-1]),
    "chunk-extra": _edit_refs(lambda refs: [*refs, refs[0]]),
    "chunks-empty": _edit_refs(lambda refs: []),
    "chunks-not-list": _edit_refs(lambda refs: "chunks"),
    "shape-wrong": lambda doc: doc["tensors"]["noise"].__setitem__("shape", [4 * CHUNK + 1]),
    "shape-huge": lambda doc: doc["tensors"]["noise"].__setitem__("shape", [1 << 40, 1 << 40, 1 << 40]),
    "dtype-wrong": lambda doc: doc["tensors"]["noise"].__setitem__("dtype", "F32"),
    "extra-key": lambda doc: doc["tensors"]["noise"].__setitem__("file", "data-00000.safetensors"),
    "no-feature": lambda doc: doc.__setitem__("required_features", []),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_bad_chunk_references_in_the_manifest(damaged_run: Path, case: str) -> None:
    checkpoint = damaged_run / "ck"
    doc = manifest_of(checkpoint)
    BAD_MANIFESTS[case](doc)
    write_manifest(checkpoint, doc)
    err = raises_checkpoint_error(lambda: cv.load(checkpoint))
    assert isinstance(err, cv.CorruptCheckpointError), (type(err), err)
    assert err.kind == "bad-manifest", (err.kind, err)
    assert isinstance(raises_checkpoint_error(lambda: cv.open(checkpoint)), cv.CorruptCheckpointError)
    report = cv.verify(checkpoint)
    assert not report.ok and report.problems[0].kind == err.kind
    assert isinstance(raises_checkpoint_error(lambda: cv.info(checkpoint)), cv.CorruptCheckpointError)


def test_unknown_required_feature_is_incompatible(damaged_run: Path) -> None:
    checkpoint = damaged_run / "ck"
    doc = manifest_of(checkpoint)
    doc["required_features"] = ["chunked-tensors", "chunked-tensors-v9"]
    write_manifest(checkpoint, doc)
    err = raises_checkpoint_error(lambda: cv.load(checkpoint))
    assert isinstance(err, cv.IncompatibleCheckpointError)
    assert not cv.verify(checkpoint).ok


def test_reordered_or_swapped_chunks_fail_the_tensor_digest(damaged_run: Path) -> None:
    checkpoint = damaged_run / "ck"
    pristine = manifest_of(checkpoint)
    refs = pristine["tensors"]["noise"]["chunks"]
    other = chunk_lists(checkpoint)["bf16"][0]
    for variant in (
        [refs[1], refs[0], *refs[2:]],  # same chunks, other order
        [*refs[:3], [other[0], CHUNK, other[2], other[3]]],  # an existing chunk of another tensor
    ):
        doc = json.loads(json.dumps(pristine))
        doc["tensors"]["noise"]["chunks"] = variant
        write_manifest(checkpoint, doc)
        err = raises_checkpoint_error(lambda: cv.load(checkpoint))
        assert isinstance(err, cv.CorruptCheckpointError) and err.kind in ("digest-mismatch", "bad-chunk")
        assert not cv.verify(checkpoint).ok
    write_manifest(checkpoint, pristine)
    assert cv.verify(checkpoint).ok


def test_codec_relabelled_in_manifest_is_a_missing_chunk(damaged_run: Path) -> None:
    checkpoint = damaged_run / "ck"
    doc = manifest_of(checkpoint)
    doc["tensors"]["noise"]["chunks"][0][3] = "lz4"  # lz4 with stored == raw length is well formed
    write_manifest(checkpoint, doc)
    assert_corrupt(checkpoint, {"missing-chunk"}, tensor="noise", named=False)


def test_whole_store_missing(damaged_run: Path) -> None:
    shutil.rmtree(damaged_run / STORE_NAME)
    assert_corrupt(damaged_run / "ck", {"missing-chunk"}, tensor="noise", named=False)
    assert torch.equal(lazy_get(damaged_run / "ck", "small"), torch.ones(4))  # a file tensor still reads


# -- hint cache -----------------------------------------------------------------------------------
def hinted_save(run: Path, name: str, state: Any, hints: HintCache | None) -> None:
    storage, target = storage_for(run / name)
    write_checkpoint(
        storage, target, state, chunking=ChunkOptions(chunk_bytes=CHUNK, min_bytes=CHUNK // 4), hints=hints
    )


def test_hint_cache_skips_unchanged_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))  # weights chunked
    state = {"model": model.state_dict(), "extra": torch.randn(2048), "np": np.arange(2048.0)}
    hints = HintCache()
    puts = new_chunk_puts(monkeypatch)
    hinted_save(run, "s1", state, hints)
    chunked = chunk_lists(run / "s1")
    torch_chunked = [n for n in chunked if n != "np"]
    assert sorted(torch_chunked) == ["extra", "model.0.weight", "model.1.weight"]
    assert (hints.hits, hints.misses) == (0, 4)
    assert len(puts) == sum(len(refs) for refs in chunked.values())

    puts.clear()
    hinted_save(run, "s2", state, hints)
    assert hints.hits == len(torch_chunked)  # numpy arrays have no version counter: always hashed
    assert hints.misses == 4 + 1
    assert sorted(puts) == sorted(r[0] for r in chunked["np"])  # nothing else was hashed or offered
    assert chunk_lists(run / "s2") == chunked
    assert_exact(state, cv.load(run / "s2"))

    puts.clear()
    with torch.no_grad():
        model[0].weight[3, 5] += 1.0  # in place: bumps the version counter
    expected = snapshot(state)
    hinted_save(run, "s3", state, hints)
    assert hints.hits == 2 * len(torch_chunked) - 1
    assert set(puts) == {r[0] for n in ("model.0.weight", "np") for r in chunk_lists(run / "s3")[n]}
    assert chunk_lists(run / "s3")["model.1.weight"] == chunked["model.1.weight"]
    assert_exact(expected, cv.load(run / "s3"))
    assert cv.verify(run / "s3").ok


def test_hint_cache_catches_whole_tensor_writes_through_data(tmp_path: Path) -> None:
    run = tmp_path / "run"
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64)
    state = {"w": layer.weight, "v": torch.randn(64, 64)}
    hints = HintCache()
    hinted_save(run, "s1", state, hints)
    version = layer.weight._version
    layer.weight.data.copy_(torch.randn(64, 64))  # not seen by the version counter
    assert layer.weight._version == version
    state["v"].numpy()[:] = np.random.default_rng(0).standard_normal((64, 64))  # a raw-pointer write
    expected = snapshot(state)
    hits = hints.hits
    hinted_save(run, "s2", state, hints)
    assert hints.hits == hits  # both missed: their sampled bytes changed
    back = cv.load(run / "s2")
    assert torch.equal(back["w"], expected["w"]) and torch.equal(back["v"], expected["v"])
    assert not torch.equal(back["w"], cv.load(run / "s1")["w"])


def test_recreated_tensors_are_never_reused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    hints = HintCache()
    state: dict[str, Any] = {}
    memory = np.zeros(64 * 64, dtype=np.float32)
    for step in range(8):
        state.clear()  # the old storages die: their addresses may come back for the new ones
        memory[50] = step  # a new tensor object over the very same bytes each step
        state["alias"] = torch.from_numpy(memory).view(64, 64)
        state["w"] = torch.full((64, 64), float(step))
        state["b"] = torch.full((64, 64), float(step % 2))  # replaced by equal-valued tensors too
        sparse = torch.zeros(64, 64)
        sparse.view(-1)[50] = step  # bytes 200..203: outside every sampled window
        state["sparse"] = sparse
        hinted_save(run, f"s{step}", state, hints)
        assert hints.hits == 0
        back = cv.load(run / f"s{step}")
        assert torch.equal(back["w"], torch.full((64, 64), float(step)))
        assert torch.equal(back["b"], torch.full((64, 64), float(step % 2)))
        assert back["sparse"].view(-1)[50] == step and back["sparse"].count_nonzero() == (step > 0)
        assert torch.equal(back["alias"].view(-1), torch.from_numpy(memory))


def test_hint_cache_of_another_store_is_not_trusted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = {"w": torch.randn(64, 64)}
    hints = HintCache()
    hinted_save(tmp_path / "run1", "a", state, hints)
    hinted_save(tmp_path / "run2", "a", state, hints)  # same tensor, empty store
    assert hints.hits == 0
    assert len(chunk_files(tmp_path / "run2")) == 4
    assert cv.verify(tmp_path / "run2" / "a").ok


def test_hint_cache_after_chunks_vanished(tmp_path: Path) -> None:
    run = tmp_path / "run"
    torch.manual_seed(0)
    state = {"w": torch.randn(64, 64)}
    hints = HintCache()
    hinted_save(run, "a", state, hints)
    shutil.rmtree(run / STORE_NAME / "chunks")  # e.g. the checkpoint was deleted and collected
    hinted_save(run, "b", state, hints)
    assert hints.hits == 0
    assert cv.verify(run / "b").ok
    assert_exact(state, cv.load(run / "b"))


def test_failed_save_forgets_the_hints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    state = {"w": torch.randn(64, 64)}
    hints = HintCache()
    hinted_save(run, "a", state, hints)
    assert hints.records
    from ckptvault.storage.chunkstore import ChunkStore

    def broken_sync(self: ChunkStore) -> None:
        raise cv.StorageError(5, "injected sync failure")

    monkeypatch.setattr(ChunkStore, "sync", broken_sync)
    with pytest.raises(cv.StorageError, match="injected"):
        hinted_save(run, "b", state, hints)
    assert not (run / "b").exists()
    assert hints.records == {}


def test_hint_cache_across_digest_algorithms(tmp_path: Path) -> None:
    run = tmp_path / "run"
    state = {"w": torch.randn(64, 64)}
    hints = HintCache()
    cv.save(run / "a", state, incremental=True, chunk_bytes=CHUNK, hints=hints)
    cv.save(run / "b", state, incremental=True, chunk_bytes=CHUNK, hints=hints, digest="sha256")
    assert manifest_of(run / "b")["digest_algorithm"] == "sha256"
    assert cv.verify(run / "b").ok
    assert_exact(state, cv.load(run / "b"))


def test_save_over_a_truncated_chunk_still_commits_a_readable_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    state = {"w": np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)}
    cv.save(run / "a", state, incremental=True, chunk_bytes=CHUNK)
    victim = chunk_files(run)[0]
    with open(victim, "r+b") as handle:
        handle.truncate(100)
    try:
        cv.save(run / "b", state, incremental=True, chunk_bytes=CHUNK)
    except cv.CheckpointError:
        return  # refusing the save would be acceptable too
    assert cv.verify(run / "b").ok, cv.verify(run / "b").problems
    assert_exact(state, cv.load(run / "b"))


# -- the manager's hint cache -----------------------------------------------------------------------
def model_state(seed: int = 0) -> cv.TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    return cv.TrainState(model)


def model_chunked(checkpoint: Path) -> list[str]:
    return sorted(n for n in chunk_lists(checkpoint) if n.startswith("model."))


def weights(state: cv.TrainState) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.parts["model"]["model"].state_dict().items()}


def restored_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    fresh = model_state(seed=99)
    tree = cv.load(run / f"step_{step:08d}")
    fresh.restore(tree)
    return weights(fresh)


def assert_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_manager_hint_cache_hits_exactly_the_unchanged_parameters(tmp_path: Path) -> None:
    run = tmp_path / "run"
    state = model_state()
    model = state.parts["model"]["model"]
    with cv.CheckpointManager(
        run, every_n_steps=1, keep_last=3, incremental=True, chunk_bytes=CHUNK
    ) as manager:
        hints = manager._hints
        assert hints is not None
        manager.step(state)
        params = model_chunked(run / "step_00000001")
        assert params == ["model.model.0.weight", "model.model.1.weight"]
        assert hints.hits == 0
        expected = {1: weights(state)}

        manager.step(state)  # nothing changed
        assert hints.hits == len(params)
        expected[2] = weights(state)

        with torch.no_grad():
            model[0].weight.mul_(0.5)
        manager.step(state)
        assert hints.hits == len(params) + 1  # only the updated weight missed
        expected[3] = weights(state)

        version = model[1].weight._version
        model[1].weight.data.copy_(torch.randn(64, 64))  # does not bump the version counter
        assert model[1].weight._version == version
        manager.step(state)
        assert hints.hits == len(params) + 2  # the sample saw the rewrite of layer 1
        expected[4] = weights(state)
        assert not torch.equal(expected[4]["1.weight"], expected[3]["1.weight"])
    for step in (2, 3, 4):
        assert cv.verify(run / f"step_{step:08d}").ok
        assert_weights(restored_weights(run, step), expected[step])
    fresh = model_state(seed=7)
    with cv.CheckpointManager(run, incremental=True, chunk_bytes=CHUNK) as manager:
        assert manager.restore(fresh).step == 4
    assert_weights(weights(fresh), expected[4])


def test_manager_without_trusting_the_version_counter_hashes_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    state = model_state()
    model = state.parts["model"]["model"]
    puts = new_chunk_puts(monkeypatch)
    with cv.CheckpointManager(
        run, every_n_steps=1, keep_last=2, incremental=True, chunk_bytes=CHUNK, trust_version_counter=False
    ) as manager:
        assert manager._hints is None
        expected = {}
        for step in range(1, 5):
            puts.clear()
            if step == 3:
                with torch.no_grad():
                    model[0].bias.add_(1.0)
                    model[0].weight[0, 0] = 123.0
            if step == 4:
                model[1].weight.data[5, 7] = -7.0  # sparse write through .data: only hashing sees it
            manager.step(state)
            expected[step] = weights(state)
            everything = sum(len(refs) for refs in chunk_lists(run / f"step_{step:08d}").values())
            assert len(puts) == everything
    for step in (3, 4):
        assert_weights(restored_weights(run, step), expected[step])
    assert restored_weights(run, 4)["1.weight"][5, 7] == -7.0


# -- async --------------------------------------------------------------------------------------------
def test_save_async_incremental_round_trip(tmp_path: Path) -> None:
    run = tmp_path / "run"
    torch.manual_seed(0)
    state = {"w": torch.randn(128, 64), "b": torch.randn(8), "np": np.arange(4096, dtype=np.int32)}
    expected = snapshot(state)
    pending = cv.save_async(run / "a", state, incremental=True, chunk_bytes=CHUNK)
    with torch.no_grad():
        state["w"].zero_()  # training goes on while the save commits
    info = pending.wait()
    assert info.path.endswith("a")
    assert manifest_of(run / "a")["required_features"] == ["chunked-tensors"]
    assert_exact(expected, cv.load(run / "a"))
    assert cv.verify(run / "a").ok
    count = len(chunk_files(run))
    cv.save_async(run / "b", expected, compression="zstd", chunk_bytes=CHUNK).wait()
    assert len(chunk_files(run)) == count  # same bytes: all referenced
    assert_exact(expected, cv.load(run / "b"))


def train_step(state: cv.TrainState) -> None:
    model = state.parts["model"]["model"]
    optimizer = state.parts["optimizer"]["optimizer"]
    loss = model(torch.randn(16, 64)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("staging", [None, 8 * CHUNK])
def test_async_incremental_manager_restores_the_right_state(tmp_path: Path, staging: int | None) -> None:
    run = tmp_path / "run"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    frozen = torch.nn.Linear(64, 64)  # never trained: its chunks are shared by every checkpoint
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    state = cv.TrainState({"model": model, "frozen": frozen}, {"optimizer": optimizer})
    expected: dict[int, dict[str, torch.Tensor]] = {}
    with cv.CheckpointManager(
        run, every_n_steps=1, keep_last=3, async_save=True, incremental=True, chunk_bytes=CHUNK,
        max_staging_bytes=staging,
    ) as manager:  # fmt: skip
        for _ in range(6):
            train_step(state)
            manager.step(state)  # staged now, committed in the background
            expected[state.step] = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
            expected[state.step] |= {
                f"frozen.{k}": v.detach().clone() for k, v in frozen.state_dict().items()
            }
        manager.wait()
        assert [r.step for r in manager.checkpoints()] == [4, 5, 6]
    for step in (4, 5, 6):
        path = run / f"step_{step:08d}"
        assert cv.verify(path).ok
        tree = cv.load(path)
        for key, value in expected[step].items():
            part, name = key.split(".", 1)
            assert torch.equal(tree["model"][part][name], value), (step, key)
    frozen_chunks = {
        n: r for n, r in chunk_lists(run / "step_00000004").items() if n.startswith("model.frozen")
    }
    assert frozen_chunks and all(
        chunk_lists(run / f"step_{s:08d}")[n] == r for s in (5, 6) for n, r in frozen_chunks.items()
    )

    torch.manual_seed(1)
    model2 = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    frozen2 = torch.nn.Linear(64, 64)
    optimizer2 = torch.optim.Adam(model2.parameters(), lr=0.01)
    state2 = cv.TrainState({"model": model2, "frozen": frozen2}, {"optimizer": optimizer2})
    with cv.CheckpointManager(run, incremental=True, chunk_bytes=CHUNK) as manager:
        assert manager.restore(state2).step == 6
    for key, value in expected[6].items():
        part, name = key.split(".", 1)
        module = model2 if part == "model" else frozen2
        assert torch.equal(module.state_dict()[name], value), key
    assert optimizer2.state_dict()["state"][0]["step"] == 6


def test_manager_save_after_its_last_checkpoint_was_deleted_and_collected(tmp_path: Path) -> None:
    """The hint cache remembers the last save; if a user deletes that checkpoint and runs
    ``ckptvault gc`` meanwhile, the next save must write the chunks again, not reference them."""
    from ckptvault.engine.gc import collect_garbage

    run = tmp_path / "run"
    state = model_state()
    with cv.CheckpointManager(
        run, every_n_steps=1, keep_last=2, incremental=True, chunk_bytes=CHUNK
    ) as manager:
        manager.step(state)
        shutil.rmtree(run / "step_00000001")
        assert collect_garbage(run).live_chunks == 0
        assert chunk_files(run) == []
        manager.step(state)  # unchanged: the hints point at collected chunks
        assert manager._hints is not None and manager._hints.hits == 0
        expected = weights(state)
    assert cv.verify(run / "step_00000002").ok
    assert_weights(restored_weights(run, 2), expected)
