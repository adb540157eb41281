"""Acceptance matrix: every kind of damage to every file of a checkpoint is caught by ``load``
(typed error naming the file) and by ``verify`` (not ok, a problem naming the file)."""

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import ckptvault
from ckptvault import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError

pytestmark = pytest.mark.faults

DATA = "data-00000.safetensors"
MANIFEST = "manifest.json"
STEP = 7
SIDECAR = f"checkpoint_{STEP:08d}.meta.json"
KINDS = {
    "missing-file",
    "extra-file",
    "truncated",
    "size-mismatch",
    "digest-mismatch",
    "bad-header",
    "foreign-file",
    "bad-manifest",
    "unsafe",
}
JUNK = b"\x00\xffjunk\x7f"


def make_state(seed):
    rng = np.random.default_rng(seed)
    return {
        "model": {
            "w64": rng.standard_normal((16, 16)),
            "w32": rng.standard_normal((32, 24)).astype(np.float32),
            "b32": rng.standard_normal(24).astype(np.float32),
            "h16": rng.standard_normal((8, 8)).astype(np.float16),
            "i8": rng.integers(-100, 100, 50, dtype=np.int8),
            "mask": rng.random(13) > 0.5,
        },
        "step": STEP,
        "name": "matrix",
    }


def make_other_state(seed):
    rng = np.random.default_rng(seed)
    return {"weights": rng.standard_normal(100).astype(np.float32), "bias": np.zeros(3)}


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    meta = {"step": STEP, "run_id": "matrix", "metrics": {"loss": 0.5}}
    ckptvault.save(root / "base", make_state(0), metadata=meta)
    ckptvault.save(root / "same_shape", make_state(1), metadata=meta)
    ckptvault.save(root / "other", make_other_state(2), metadata={"step": 3})
    base = root / "base"
    assert sorted(os.listdir(base)) == sorted([DATA, MANIFEST, SIDECAR])
    assert ckptvault.verify(base).ok
    return root


def layout(ckpt):
    """Byte offsets of the regions of the data file, from the manifest."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    entry = manifest["files"][DATA]
    start = 8 + entry["header_size"]
    tensors = sorted(
        (
            (t["offsets"], name)
            for name, t in manifest["tensors"].items()
            if t["offsets"][1] > t["offsets"][0]
        ),
    )
    raw = (ckpt / DATA).read_bytes()
    header = raw[8:start]
    body = header.rstrip(b" ")
    assert len(body) < len(header), "header has no padding; change the state so it has some"
    first, middle, last = tensors[0], tensors[len(tensors) // 2], tensors[-1]
    return {
        "prefix": (3, None),
        "header": (8 + len(body) // 2, None),
        "padding": (8 + len(body) + (len(header) - len(body)) // 2, None),
        "first": (start + (first[0][0] + first[0][1]) // 2, first[1]),
        "middle": (start + (middle[0][0] + middle[0][1]) // 2, middle[1]),
        "lastbyte": (len(raw) - 1, last[1]),
    }


def json_regions(size):
    return {"start": 0, "middle": size // 2, "end": size - 1}


def flip(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def truncate(path, offset):
    with path.open("r+b") as handle:
        handle.truncate(offset)


def insert(path, offset):
    raw = path.read_bytes()
    path.write_bytes(raw[:offset] + JUNK + raw[offset:])


def append(path, _offset=None):
    with path.open("ab") as handle:
        handle.write(JUNK)


OPS = {"flip": flip, "truncate": truncate, "insert": insert}
DATA_REGIONS = ["prefix", "header", "padding", "first", "middle", "lastbyte"]
JSON_REGIONS = ["start", "middle", "end"]

CASES = (
    [(DATA, region, op) for region in DATA_REGIONS for op in OPS]
    + [(DATA, "eof", "append")]
    + [(name, region, op) for name in (MANIFEST, SIDECAR) for region in JSON_REGIONS for op in OPS]
    + [(name, "eof", "append") for name in (MANIFEST, SIDECAR)]
)


@pytest.fixture
def ckpt(templates, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(templates / "base", target)
    return target


def problems_naming(report, name):
    return [p for p in report.problems if p.file == name]


def expect_corrupt(ckpt, file, *, tensor=None, error=CorruptCheckpointError):
    with pytest.raises(CheckpointError) as info:
        ckptvault.load(ckpt)
    exc = info.value
    assert isinstance(exc, error), f"{type(exc).__name__}: {exc}"
    if file is not None:
        allowed = {file} if isinstance(file, str) else set(file)
        assert exc.file in allowed, f"error names file {exc.file!r}, expected {allowed}: {exc}"
    if tensor is not None:
        assert exc.tensor == tensor, f"error names tensor {exc.tensor!r}, expected {tensor!r}: {exc}"
    report = ckptvault.verify(ckpt)
    assert not report.ok
    if file is not None:
        assert any(p.file in allowed for p in report.problems), report.problems
    return exc, report


@pytest.mark.parametrize(("file", "region", "op"), CASES, ids=[f"{f}-{r}-{o}" for f, r, o in CASES])
def test_damage(ckpt, file, region, op):
    path = ckpt / file
    if file == DATA:
        offset, tensor = layout(ckpt)[region] if region != "eof" else (None, None)
    else:
        offset = json_regions(path.stat().st_size)[region] if region != "eof" else None
        tensor = None
    if op == "truncate" and file == MANIFEST and region == "end":
        offset = path.stat().st_size - 8  # dropping only the trailing newline leaves the same JSON
    before = path.read_bytes()
    (append if op == "append" else OPS[op])(path, offset)
    assert path.read_bytes() != before
    expect_corrupt(ckpt, file, tensor=tensor if op == "flip" else None)


@pytest.mark.parametrize("file", [DATA, SIDECAR])
def test_remove_file(ckpt, file):
    (ckpt / file).unlink()
    exc, report = expect_corrupt(ckpt, file)
    assert exc.kind == "missing-file"
    assert any(p.kind == "missing-file" for p in problems_naming(report, file))


def test_remove_manifest(ckpt):
    (ckpt / MANIFEST).unlink()
    with pytest.raises(CheckpointNotFoundError):
        ckptvault.load(ckpt)
    report = ckptvault.verify(ckpt)
    assert not report.ok
    assert any(MANIFEST in p.message or p.file == MANIFEST for p in report.problems), report.problems


@pytest.mark.parametrize("name", ["extra.bin", ".hidden", "data-00001.safetensors", "subdir"])
def test_extra_file(ckpt, name):
    if name == "subdir":
        (ckpt / name).mkdir()
        (ckpt / name / "x").write_bytes(b"x")
    else:
        (ckpt / name).write_bytes(b"not part of the checkpoint")
    exc, report = expect_corrupt(ckpt, name)
    assert exc.kind == "extra-file"
    assert any(p.kind == "extra-file" for p in problems_naming(report, name))


def test_manifest_from_same_shape_checkpoint(ckpt, templates):
    shutil.copy(templates / "same_shape" / MANIFEST, ckpt / MANIFEST)
    expect_corrupt(ckpt, (DATA, SIDECAR))


def test_manifest_from_different_state(ckpt, templates):
    shutil.copy(templates / "other" / MANIFEST, ckpt / MANIFEST)
    expect_corrupt(ckpt, (DATA, SIDECAR, "checkpoint_00000003.meta.json"))


def test_data_file_from_same_shape_checkpoint(ckpt, templates):
    shutil.copy(templates / "same_shape" / DATA, ckpt / DATA)
    exc, _ = expect_corrupt(ckpt, DATA)
    assert exc.kind in ("foreign-file", "digest-mismatch")


def test_sidecar_from_same_shape_checkpoint(ckpt, templates):
    shutil.copy(templates / "same_shape" / SIDECAR, ckpt / SIDECAR)
    expect_corrupt(ckpt, SIDECAR)


def test_header_length_prefix_points_inside_header(ckpt):
    # A prefix that still fits in the file but disagrees with the manifest's header size.
    raw = bytearray((ckpt / DATA).read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    raw[:8] = struct.pack("<Q", length - 8)
    (ckpt / DATA).write_bytes(bytes(raw))
    exc, _ = expect_corrupt(ckpt, DATA)
    assert exc.kind == "bad-header"


@pytest.mark.parametrize("op", ["flip", "truncate", "append"])
def test_damaged_manifest_kind_is_documented(ckpt, op):
    # CorruptCheckpointError.kind is documented as one of a fixed set of stable words.
    path = ckpt / MANIFEST
    size = path.stat().st_size
    {
        "flip": lambda: flip(path, size // 2),
        "truncate": lambda: truncate(path, size // 2),
        "append": lambda: append(path),
    }[op]()
    with pytest.raises(CorruptCheckpointError) as info:
        ckptvault.load(ckpt)
    assert info.value.kind in KINDS, f"undocumented kind {info.value.kind!r}: {info.value}"
    report = ckptvault.verify(ckpt)
    assert [p.kind for p in report.problems if p.kind not in KINDS] == [], report.problems


def test_undamaged_copy_loads(ckpt):
    # Control: the copy itself is fine, so every failure above comes from the damage.
    assert ckptvault.verify(ckpt).ok
    loaded = ckptvault.load(ckpt)
    expected = make_state(0)
    for key, value in expected["model"].items():
        np.testing.assert_array_equal(loaded["model"][key], value)
        assert loaded["model"][key].dtype == value.dtype
    assert Path(ckpt).is_dir()
