"""A sharded checkpoint on disk, single process (docs/format.md §15): read whole, and damaged.

Why single process: ``ckptvault.distributed.save`` outside a process group is DCP's no-dist mode,
and with ``piece_bytes=4096`` every tensor over 4 KiB is stored as row blocks -- a real sharded
checkpoint, written by the real writer, without starting ranks. Every reader must give back the
saved bytes exactly, and every damage must end in a typed error (or a not-ok verify report), never
in a wrong tensor or in memory no verified piece wrote. The one damage the format cannot see -- a
hand-edited manifest that moves pieces while keeping a valid tiling -- is pinned down here as what
it is (docs/security.md, Known limits).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptvault
from ckptvault.distributed import StorageReader
from ckptvault.distributed import save as dist_save
from ckptvault.errors import CorruptCheckpointError
from ckptvault.format.digest import digest_bytes

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def make_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(40, 64, generator=g),  # F32, 3 row blocks (16 + 16 + 8 rows)
        "h": torch.randn(48, 64, generator=g).to(torch.bfloat16),  # BF16, 6 KiB: 2 row blocks
        "b": torch.arange(3000, dtype=torch.int64) * 7 - 5,  # 1-D I64, 6 blocks
        "c": torch.randn(5, 7, 40, generator=g),  # 3-D: blocks of whole [7, 40] slices
        "small": torch.ones(3),  # stored whole, under its own name
        "step": 7,
    }


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "sharded"
    dist_save(make_state(), path, piece_bytes=4096)
    return path


def assert_same(got: Any, want: dict[str, Any]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
            assert torch.equal(got[key].view(torch.uint8), value.view(torch.uint8)), key  # bitwise
        else:
            assert got[key] == value


def manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text())


def write_manifest(path: Path, doc: dict[str, Any]) -> None:
    (path / "manifest.json").write_text(json.dumps(doc, indent=1) + "\n")


def test_the_writer_stores_big_tensors_sharded(ckpt: Path) -> None:
    sharded = manifest(ckpt)["sharded"]
    assert set(sharded) == {"w", "h", "b", "c"}
    assert [o for o, _ in sharded["w"]["shards"]] == [[0, 0], [16, 0], [32, 0]]
    assert [n for _, n in sharded["c"]["shards"]] == ["c#0_0_0", "c#3_0_0"]  # <fqn>#<offsets by _>
    assert "small" in manifest(ckpt)["tensors"]


@pytest.mark.parametrize("options", [{}, {"mmap": True}, {"verify": False}, {"mmap": True, "verify": False}])
def test_load_gives_back_the_state_bitwise(ckpt: Path, options: dict[str, Any]) -> None:
    assert_same(ckptvault.load(ckpt, **options), make_state())


def test_open_reads_sharded_tensors_lazily(ckpt: Path) -> None:
    want = make_state()
    with ckptvault.open(ckpt) as view:
        assert torch.equal(view["c"], want["c"])
        assert torch.equal(view["h"].view(torch.uint8), want["h"].view(torch.uint8))
        assert "w#0_0" in view.tensor_names()  # documented: the stored names (the pieces)
        assert_same(view.load(), want)


def test_verify_is_ok(ckpt: Path) -> None:
    assert ckptvault.verify(ckpt).ok


def test_dcp_metadata_comes_back(ckpt: Path) -> None:
    reader = StorageReader(ckpt)
    try:
        meta = reader.read_metadata()
    finally:
        reader.close()
    assert list(meta.state_dict_metadata["w"].size) == [40, 64]
    assert meta.state_dict_metadata["h"].properties.dtype == torch.bfloat16


# -- damage ----------------------------------------------------------------------------------------
def data_file(path: Path) -> Path:
    (found,) = path.glob("data-*.safetensors")
    return found


def test_flipped_byte_in_a_piece_names_the_piece(ckpt: Path) -> None:
    doc = manifest(ckpt)
    entry = doc["tensors"]["w#16_0"]
    header = int.from_bytes(data_file(ckpt).read_bytes()[:8], "little")
    at = 8 + header + entry["offsets"][0] + 100
    raw = bytearray(data_file(ckpt).read_bytes())
    raw[at] ^= 0x01
    data_file(ckpt).write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError) as caught:
        ckptvault.load(ckpt)
    assert caught.value.kind == "digest-mismatch" and caught.value.tensor == "w#16_0"
    with pytest.raises(CorruptCheckpointError), ckptvault.open(ckpt) as view:
        view["w"]
    report = ckptvault.verify(ckpt)
    assert not report.ok
    assert any(p.kind == "digest-mismatch" and p.tensor == "w#16_0" for p in report.problems), report


def test_truncated_data_file(ckpt: Path) -> None:
    raw = data_file(ckpt).read_bytes()
    data_file(ckpt).write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(CorruptCheckpointError):
        ckptvault.load(ckpt)
    assert not ckptvault.verify(ckpt).ok


@pytest.mark.parametrize("damage", ["overlap", "gap", "out-of-bounds", "piece-twice", "no-feature"])
def test_hand_edited_sharded_is_refused(ckpt: Path, damage: str) -> None:
    """Edits that break the tiling: refused at the manifest's parse, by every reader."""
    doc = manifest(ckpt)
    shards = doc["sharded"]["w"]["shards"]
    if damage == "overlap":
        shards[2][0] = [24, 0]  # rows 24..32 written twice, rows 32..40 by no one
    elif damage == "gap":
        del shards[2]
    elif damage == "out-of-bounds":
        shards[2][0] = [33, 0]
    elif damage == "piece-twice":
        shards[2][1] = "w#16_0"
    else:
        doc["required_features"].remove("sharded-tensors")
    write_manifest(ckpt, doc)
    for read in (ckptvault.load, ckptvault.info):
        with pytest.raises(CorruptCheckpointError) as caught:
            read(ckpt)
        assert caught.value.kind == "bad-manifest"
    with pytest.raises(CorruptCheckpointError):
        ckptvault.open(ckpt)
    assert not ckptvault.verify(ckpt).ok


def test_swapped_offsets_are_a_valid_tiling_the_format_cannot_catch(ckpt: Path) -> None:
    """Two equal-shaped pieces' offsets swapped in a hand-edited manifest: the tiling is still
    exact, every piece still matches its digest, so the checkpoint loads and verifies -- with the two
    row blocks exchanged. The manifest is the root of trust (nothing signs it); what this pins down
    is that the result is exactly the permuted bytes, never memory no piece wrote."""
    doc = manifest(ckpt)
    shards = doc["sharded"]["w"]["shards"]
    shards[0][0], shards[1][0] = shards[1][0], shards[0][0]
    write_manifest(ckpt, doc)
    want = make_state()["w"]
    got = ckptvault.load(ckpt)["w"]
    assert torch.equal(got[:16], want[16:32]) and torch.equal(got[16:32], want[:16])
    assert torch.equal(got[32:], want[32:])
    assert ckptvault.verify(ckpt).ok


def read_metadata(path: Path) -> Any:
    reader = StorageReader(path)
    try:
        return reader.read_metadata()
    finally:
        reader.close()


def resign(path: Path, name: str, data: bytes) -> None:
    """Writes ``data`` as file ``name`` and records its size and digest in the manifest: the damage
    then reaches the parser instead of stopping at the digest check."""
    (path / name).write_bytes(data)
    doc = manifest(path)
    doc["files"][name] = {"size": len(data), "digest": digest_bytes(doc["digest_algorithm"], data)}
    write_manifest(path, doc)


def test_dcp_json_deleted(ckpt: Path) -> None:
    (ckpt / "dcp.json").unlink()
    with pytest.raises(CorruptCheckpointError):
        read_metadata(ckpt)
    assert ckptvault.verify(ckpt).problems[0].file == "dcp.json"


def test_dcp_json_deleted_and_unlisted(ckpt: Path) -> None:
    (ckpt / "dcp.json").unlink()
    doc = manifest(ckpt)
    del doc["files"]["dcp.json"]
    write_manifest(ckpt, doc)
    with pytest.raises(CorruptCheckpointError, match="not a distributed checkpoint"):
        read_metadata(ckpt)
    assert_same(ckptvault.load(ckpt), make_state())  # still an ordinary checkpoint


@pytest.mark.parametrize("text", [b'{"format": NaN}', b"{", b'{"a": 1, "a": 1}', b"\xff\xfe"])
def test_dcp_json_not_strict_json(ckpt: Path, text: bytes) -> None:
    resign(ckpt, "dcp.json", text)
    with pytest.raises(CorruptCheckpointError) as caught:
        read_metadata(ckpt)
    assert caught.value.kind == "bad-manifest"


def test_dcp_json_changed_without_resigning(ckpt: Path) -> None:
    original = (ckpt / "dcp.json").read_bytes()
    data = original.replace(b'"requires_grad":false', b'"requires_grad":true ')  # same length
    assert data != original
    (ckpt / "dcp.json").write_bytes(data)
    with pytest.raises(CorruptCheckpointError) as caught:
        read_metadata(ckpt)
    assert caught.value.kind == "digest-mismatch"


@pytest.mark.parametrize("field", ["size", "dtype"])
def test_dcp_json_disagreeing_with_the_manifest(ckpt: Path, field: str) -> None:
    doc = json.loads((ckpt / "dcp.json").read_bytes())
    doc["tensors"]["w"][field] = [80, 64] if field == "size" else "int32"
    resign(ckpt, "dcp.json", json.dumps(doc).encode())
    with pytest.raises(CorruptCheckpointError):
        read_metadata(ckpt)
