"""Hand-built hostile checkpoints: each must fail fast with a CheckpointError subclass from
``load`` and a not-ok report from ``verify`` (which never raises).

Most cases start from a valid checkpoint and rewrite one thing, recomputing every digest and size
the manifest records so that only the check aimed at that one thing can catch it."""

import json
import os
import shutil
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

import ckptvault
from ckptvault import (
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    UnsafeCheckpointError,
    UnsupportedStateError,
)
from ckptvault.format.digest import data_file_digest, digest_bytes

pytestmark = pytest.mark.faults

DATA = "data-00000.safetensors"
MANIFEST = "manifest.json"
ALGO = "blake3"
FAST = 2.0


def base_state():
    return {"a": np.arange(16, dtype=np.float32), "b": np.arange(8, dtype=np.int64), "n": 3}


class Ckpt:
    """A valid checkpoint plus tools to rewrite it consistently."""

    def __init__(self, path):
        self.path = path
        ckptvault.save(path, base_state(), metadata={"step": 1})
        assert ckptvault.verify(path).ok
        self.doc = json.loads((path / MANIFEST).read_bytes())
        raw = (path / DATA).read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        self.header = json.loads(raw[8 : 8 + length])
        self.data = raw[8 + length :]

    def write_manifest(self, doc=None, *, text=None):
        raw = text.encode() if text is not None else json.dumps(doc if doc is not None else self.doc).encode()
        (self.path / MANIFEST).write_bytes(raw)

    def manifest_text(self):
        return json.dumps(self.doc)

    def write_data(self, header=None, data=None, *, header_text=None, prefix=None, sync_tensors=True):
        """Writes the data file from a header and data bytes; the manifest is made to agree."""
        header = self.header if header is None else header
        data = self.data if data is None else data
        if header_text is None:
            body = json.dumps(header).encode()
        else:
            body = header_text if isinstance(header_text, bytes) else header_text.encode()
        body += b" " * ((-(8 + len(body))) % 64)
        declared = len(body) if prefix is None else prefix
        raw = struct.pack("<Q", declared) + body + data
        (self.path / DATA).write_bytes(raw)
        entry = self.doc["files"][DATA]
        entry.update(
            size=len(raw),
            digest=digest_bytes(ALGO, raw),
            header_size=len(body),
            header_digest=digest_bytes(ALGO, body),
        )
        if sync_tensors and header_text is None:
            for name, t in self.doc["tensors"].items():
                h = header.get(name)
                if h is None:
                    continue
                t.update(dtype=h["dtype"], shape=h["shape"], offsets=h["data_offsets"])
                lo, hi = h["data_offsets"]
                if 0 <= lo <= hi <= len(data):
                    t["digest"] = digest_bytes(ALGO, data[lo:hi])
        # A data file's digest combines its header and tensor digests (docs/format.md).
        parts = sorted(
            (t for t in self.doc["tensors"].values() if t["file"] == DATA), key=lambda t: t["offsets"]
        )
        entry["digest"] = data_file_digest(
            ALGO, len(raw), entry["header_digest"], [t["digest"] for t in parts]
        )
        self.write_manifest()


def nested_lists(depth):
    return "[" * depth + "]" * depth


def set_tree(ck, tree_text):
    doc = dict(ck.doc)
    doc["tree"] = "@@TREE@@"
    ck.write_manifest(text=json.dumps(doc).replace('"@@TREE@@"', tree_text))


# -- each case: mutate(ck, tmp_path) -> expected exception class ------------------------------
def header_length_2_63(ck, tmp):
    ck.write_data(prefix=2**63)


def header_length_max_u64(ck, tmp):
    ck.write_data(prefix=2**64 - 1)


def header_length_past_eof(ck, tmp):
    ck.write_data(prefix=len(json.dumps(ck.header)) + 64 + len(ck.data) + 1000)


def manifest_header_size_2_63(ck, tmp):
    ck.doc["files"][DATA]["header_size"] = 2**63
    ck.write_manifest()


def overlapping_offsets(ck, tmp):
    h = dict(ck.header)
    h["b"] = dict(h["b"], data_offsets=[0, 64])
    h["a"] = dict(h["a"], data_offsets=[32, 96])
    ck.write_data(h, ck.data[:96])


def out_of_range_offsets(ck, tmp):
    h = dict(ck.header)
    h["a"] = dict(h["a"], data_offsets=[2**40, 2**40 + 64])
    ck.write_data(h)


def offsets_past_end_by_one(ck, tmp):
    h = dict(ck.header)
    h["a"] = dict(h["a"], data_offsets=[68, 132])
    ck.write_data(h, ck.data[:64] + b"\0" * 4 + ck.data[64:124])


def manifest_offsets_out_of_range(ck, tmp):
    ck.doc["tensors"]["a"]["offsets"] = [64, 2**62]
    ck.write_manifest()


def gap_between_tensors(ck, tmp):
    h = dict(ck.header)
    h["a"] = dict(h["a"], data_offsets=[72, 136])
    ck.write_data(h, ck.data[:64] + b"\0" * 8 + ck.data[64:])


def trailing_bytes_after_tensors(ck, tmp):
    ck.write_data(data=ck.data + b"\0" * 64)


def shape_product_overflow(ck, tmp):
    h = dict(ck.header)
    h["a"] = dict(h["a"], shape=[2**62, 2**62])
    ck.write_data(h)


def shape_product_wraps_to_zero(ck, tmp):
    h = dict(ck.header)
    h["a"] = dict(h["a"], shape=[2**32, 2**32, 2**32, 2**32, 0, 2**62])
    ck.write_data(h)


def negative_dimension(ck, tmp):
    h = dict(ck.header)
    h["a"] = dict(h["a"], shape=[-16])
    ck.write_data(h, sync_tensors=False)


def unknown_dtype_in_header(ck, tmp):
    h = dict(ck.header)
    h["a"] = dict(h["a"], dtype="F128")
    ck.write_data(h, sync_tensors=False)


def duplicate_key_in_header(ck, tmp):
    text = json.dumps(ck.header)
    entry = json.dumps(ck.header["a"])
    ck.write_data(header_text=text[:-1] + f', "a": {entry}}}')


def deeply_nested_header(ck, tmp):
    ck.write_data(header_text=nested_lists(100_000))


def header_not_an_object(ck, tmp):
    ck.write_data(header_text="[1, 2, 3]")


def header_invalid_utf8(ck, tmp):
    ck.write_data(header_text=json.dumps(ck.header).encode().replace(b"ckptvault", b"ckpt\xc3vault", 1))


def header_without_checkpoint_id(ck, tmp):
    h = dict(ck.header)
    h["__metadata__"] = {"format": "ckptvault"}
    ck.write_data(h)


def header_lists_extra_tensor(ck, tmp):
    h = dict(ck.header)
    h["c"] = {"dtype": "U8", "shape": [0], "data_offsets": [128, 128]}
    ck.write_data(h)


def duplicate_key_in_manifest(ck, tmp):
    ck.write_manifest(text=ck.manifest_text().replace('"step": 1', '"step": 1, "step": 2'))


def duplicate_tensor_key_in_manifest(ck, tmp):
    text = ck.manifest_text()
    a = json.dumps(ck.doc["tensors"]["a"])
    ck.write_manifest(text=text.replace('"tensors": {', f'"tensors": {{"a": {a}, ', 1))


def nan_in_manifest(ck, tmp):
    ck.write_manifest(text=ck.manifest_text().replace('"step": 1', '"step": NaN'))


def nan_in_tree(ck, tmp):
    set_tree(ck, '{"t": "dict", "v": {"x": NaN}}')


def infinity_in_tree(ck, tmp):
    set_tree(ck, '{"t": "dict", "v": {"x": -Infinity}}')


def manifest_invalid_utf8(ck, tmp):
    raw = json.dumps(ck.doc).encode().replace(b'"ckptvault"', b'"ckpt\xc3vault"')
    (ck.path / MANIFEST).write_bytes(raw)


def manifest_not_an_object(ck, tmp):
    ck.write_manifest(text="[]")


def manifest_empty(ck, tmp):
    ck.write_manifest(text="")


def _escape_copy(ck, tmp):
    outside = tmp / "outside"
    outside.mkdir(exist_ok=True)
    shutil.copy(ck.path / DATA, outside / DATA)
    return outside / DATA


def _rename_data(ck, new_name):
    doc = ck.doc
    doc["files"][new_name] = doc["files"].pop(DATA)
    for t in doc["tensors"].values():
        t["file"] = new_name
    ck.write_manifest()


def dotdot_file_name(ck, tmp):
    _escape_copy(ck, tmp)
    (ck.path / DATA).unlink()
    _rename_data(ck, f"../outside/{DATA}")


def bare_dotdot_file_name(ck, tmp):
    _rename_data(ck, "..")


def absolute_file_name(ck, tmp):
    outside = _escape_copy(ck, tmp)
    (ck.path / DATA).unlink()
    _rename_data(ck, str(outside))


def file_in_subdirectory(ck, tmp):
    (ck.path / "sub").mkdir()
    (ck.path / DATA).rename(ck.path / "sub" / DATA)
    _rename_data(ck, f"sub/{DATA}")


def hidden_file_name(ck, tmp):
    (ck.path / DATA).rename(ck.path / f".{DATA}")
    _rename_data(ck, f".{DATA}")


def symlink_data_file(ck, tmp):
    outside = _escape_copy(ck, tmp)
    (ck.path / DATA).unlink()
    os.symlink(outside, ck.path / DATA)


def symlink_manifest(ck, tmp):
    outside = tmp / "outside_manifest.json"
    shutil.copy(ck.path / MANIFEST, outside)
    (ck.path / MANIFEST).unlink()
    os.symlink(outside, ck.path / MANIFEST)


def symlink_to_dev_zero(ck, tmp):
    (ck.path / DATA).unlink()
    os.symlink("/dev/zero", ck.path / DATA)


def data_file_is_a_directory(ck, tmp):
    (ck.path / DATA).unlink()
    (ck.path / DATA).mkdir()


def tree_nested_10000_lists(ck, tmp):
    set_tree(ck, nested_lists(10_000))


def tree_nested_300_lists(ck, tmp):
    set_tree(ck, nested_lists(300))


def tree_nested_300_dicts(ck, tmp):
    set_tree(ck, '{"t": "dict", "v": {"x": ' * 300 + "1" + "}}" * 300)


def gigantic_int_node(ck, tmp):
    set_tree(ck, json.dumps({"t": "int", "hex": "0x" + "f" * (2**20 + 16)}))


def gigantic_int_literal_in_tree(ck, tmp):
    set_tree(ck, "9" * 200_000)


def gigantic_step_literal(ck, tmp):
    ck.write_manifest(text=ck.manifest_text().replace('"step": 1', '"step": ' + "9" * 200_000))


def unknown_tree_tag(ck, tmp):
    set_tree(ck, '{"t": "pickle", "data": "gASVAAAAAAAAAACMBXBvc2l4lIwGc3lzdGVtlJOUjAJpZJSFlFKULg=="}')


def tree_tag_not_a_string(ck, tmp):
    set_tree(ck, '{"t": ["dict"], "v": {}}')


def tree_references_missing_tensor(ck, tmp):
    set_tree(
        ck, '{"t": "dict", "v": {"a": {"t": "ndarray", "tensor": "nope", "dtype": "<f4", "shape": [16]}}}'
    )


def tree_reference_to_unknown_shared_id(ck, tmp):
    set_tree(ck, '{"t": "dict", "v": {"a": {"t": "ref", "id": 12345}}}')


def tree_leaf_shape_wraps_int64(ck, tmp):
    # 7 * 0x6DB6DB6DB6DB6DB7 * 16 == 16 (mod 2**64): a product that wraps to the stored element count.
    a = ck.doc["tensors"]["a"]
    tree = {
        "t": "dict",
        "v": {"a": {"t": "ndarray", "tensor": "a", "dtype": "<f4", "shape": [7, 0x6DB6DB6DB6DB6DB7, 16]}},
    }
    assert a["offsets"][1] - a["offsets"][0] == 64
    set_tree(ck, json.dumps(tree).replace("0x", ""))


def tree_leaf_object_dtype(ck, tmp):
    set_tree(ck, '{"t": "dict", "v": {"a": {"t": "ndarray", "tensor": "a", "dtype": "|O", "shape": [8]}}}')


def tree_np_scalar_object_dtype(ck, tmp):
    set_tree(ck, '{"t": "np.scalar", "dtype": "|O", "b64": "AAAAAAAAAAA="}')


def tensor_dtype_not_a_string(ck, tmp):
    ck.doc["tensors"]["a"]["dtype"] = ["F32"]
    ck.write_manifest()


def tensor_file_not_a_string(ck, tmp):
    ck.doc["tensors"]["a"]["file"] = {"name": DATA}
    ck.write_manifest()


def tensor_shape_too_many_dims(ck, tmp):
    ck.doc["tensors"]["a"]["shape"] = [1] * 100_000
    ck.write_manifest()


def files_not_an_object(ck, tmp):
    ck.doc["files"] = [DATA]
    ck.write_manifest()


def file_size_negative(ck, tmp):
    ck.doc["files"][DATA]["size"] = -1
    ck.write_manifest()


def file_size_bool(ck, tmp):
    ck.doc["files"][DATA]["size"] = True
    ck.write_manifest()


def unknown_manifest_field(ck, tmp):
    ck.doc["pickle"] = "gASV"
    ck.write_manifest()


def unknown_digest_algorithm(ck, tmp):
    ck.doc["digest_algorithm"] = "md5"
    ck.write_manifest()


def schema_version_999(ck, tmp):
    ck.doc["schema_version"] = 999
    ck.write_manifest()
    return IncompatibleCheckpointError


def unknown_required_feature(ck, tmp):
    ck.doc["required_features"] = ["time-travel"]
    ck.write_manifest()
    return IncompatibleCheckpointError


def unsafe(fn):
    def wrapped(ck, tmp):
        fn(ck, tmp)
        return UnsafeCheckpointError

    wrapped.__name__ = fn.__name__
    return wrapped


CASES = [
    header_length_2_63,
    header_length_max_u64,
    header_length_past_eof,
    manifest_header_size_2_63,
    overlapping_offsets,
    out_of_range_offsets,
    offsets_past_end_by_one,
    manifest_offsets_out_of_range,
    gap_between_tensors,
    trailing_bytes_after_tensors,
    shape_product_overflow,
    shape_product_wraps_to_zero,
    negative_dimension,
    unknown_dtype_in_header,
    duplicate_key_in_header,
    deeply_nested_header,
    header_not_an_object,
    header_invalid_utf8,
    header_without_checkpoint_id,
    header_lists_extra_tensor,
    duplicate_key_in_manifest,
    duplicate_tensor_key_in_manifest,
    nan_in_manifest,
    nan_in_tree,
    infinity_in_tree,
    manifest_invalid_utf8,
    manifest_not_an_object,
    manifest_empty,
    unsafe(dotdot_file_name),
    unsafe(bare_dotdot_file_name),
    unsafe(absolute_file_name),
    unsafe(file_in_subdirectory),
    unsafe(hidden_file_name),
    unsafe(symlink_data_file),
    unsafe(symlink_manifest),
    unsafe(symlink_to_dev_zero),
    unsafe(data_file_is_a_directory),
    tree_nested_10000_lists,
    tree_nested_300_lists,
    tree_nested_300_dicts,
    gigantic_int_node,
    gigantic_int_literal_in_tree,
    gigantic_step_literal,
    unknown_tree_tag,
    tree_tag_not_a_string,
    tree_references_missing_tensor,
    tree_reference_to_unknown_shared_id,
    tree_leaf_shape_wraps_int64,
    tree_leaf_object_dtype,
    tree_np_scalar_object_dtype,
    tensor_dtype_not_a_string,
    tensor_file_not_a_string,
    tensor_shape_too_many_dims,
    files_not_an_object,
    file_size_negative,
    file_size_bool,
    unknown_manifest_field,
    unknown_digest_algorithm,
    schema_version_999,
    unknown_required_feature,
]


def test_rewrite_harness_control(tmp_path):
    # Rewriting without a change must give a valid checkpoint, or the cases above prove nothing.
    ck = Ckpt(tmp_path / "ckpt")
    ck.write_data(dict(ck.header), ck.data)
    set_tree(ck, json.dumps(ck.doc["tree"]))
    assert ckptvault.verify(ck.path).ok
    loaded = ckptvault.load(ck.path)
    np.testing.assert_array_equal(loaded["a"], base_state()["a"])
    assert loaded["n"] == 3


@pytest.mark.parametrize("mutate", CASES, ids=[c.__name__ for c in CASES])
def test_hostile_checkpoint(tmp_path, mutate):
    ck = Ckpt(tmp_path / "ckpt")
    expected = mutate(ck, tmp_path) or CorruptCheckpointError

    started = time.perf_counter()
    try:
        ckptvault.load(ck.path)
    except CheckpointError as exc:
        error = exc
    except Exception as exc:  # the contract: never anything but a CheckpointError
        pytest.fail(f"load raised {type(exc).__name__} (not a CheckpointError): {exc!r}"[:500])
    else:
        pytest.fail("load accepted a hostile checkpoint")
    elapsed = time.perf_counter() - started
    assert isinstance(error, expected), f"expected {expected.__name__}, got {type(error).__name__}: {error}"
    assert elapsed < FAST, f"load took {elapsed:.2f} s"

    started = time.perf_counter()
    try:
        report = ckptvault.verify(ck.path)
    except Exception as exc:
        pytest.fail(f"verify raised {type(exc).__name__}: {exc!r}"[:500])
    elapsed = time.perf_counter() - started
    assert not report.ok, "verify passed a hostile checkpoint"
    assert elapsed < FAST, f"verify took {elapsed:.2f} s"


@pytest.mark.parametrize("mutate", CASES, ids=[c.__name__ for c in CASES])
def test_hostile_checkpoint_lazy_open(tmp_path, mutate):
    # ckptvault.open is the other reading entry point; the same contract holds for it.
    ck = Ckpt(tmp_path / "ckpt")
    mutate(ck, tmp_path)
    started = time.perf_counter()
    try:
        with ckptvault.open(ck.path) as view:
            view.load()
    except CheckpointError:
        pass
    except Exception as exc:
        pytest.fail(f"open raised {type(exc).__name__} (not a CheckpointError): {exc!r}"[:500])
    else:
        pytest.fail("open accepted a hostile checkpoint")
    assert time.perf_counter() - started < FAST


FIFO_SCRIPT = """
import sys, ckptvault
try:
    ckptvault.load(sys.argv[1])
    print("load: accepted")
except ckptvault.CheckpointError as exc:
    print("load:", type(exc).__name__)
except Exception as exc:
    print("load: other", type(exc).__name__)
sys.stdout.flush()
report = ckptvault.verify(sys.argv[1])
print("verify:", "ok" if report.ok else "not-ok")
"""


@pytest.mark.parametrize("name", [DATA, MANIFEST])
def test_fifo_in_place_of_a_file_does_not_hang(tmp_path, name):
    ck = Ckpt(tmp_path / "ckpt")
    (ck.path / name).unlink()
    os.mkfifo(ck.path / name)
    try:
        done = subprocess.run(
            [sys.executable, "-c", FIFO_SCRIPT, str(ck.path)],
            capture_output=True,
            text=True,
            timeout=6,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"load/verify blocked on a FIFO named {name} (output so far: {exc.stdout!r})")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.split("\n")
    assert lines[0] in ("load: UnsafeCheckpointError", "load: CorruptCheckpointError"), done.stdout
    assert lines[1] == "verify: not-ok", done.stdout


def test_lambda_in_state_names_its_path_and_leaves_nothing(tmp_path):
    run = tmp_path / "run"
    ckptvault.save(run / "step_1", base_state())
    before = sorted(os.listdir(run))
    state = {
        "model": {"w": np.ones(4, dtype=np.float32)},
        "scheduler": {"last_epoch": 3, "lr_lambdas": [lambda epoch: 0.95**epoch]},
    }
    with pytest.raises(UnsupportedStateError) as info:
        ckptvault.save(run / "step_2", state)
    assert "state['scheduler']['lr_lambdas'][0]" in str(info.value)
    assert info.value.state_path == "state['scheduler']['lr_lambdas'][0]"
    assert isinstance(info.value, TypeError)
    assert sorted(os.listdir(run)) == before, "a failed save left something behind"
    assert ckptvault.verify(run / "step_1").ok

    with pytest.raises(UnsupportedStateError):
        ckptvault.save(tmp_path / "fresh" / "step_1", state)
    assert not (tmp_path / "fresh" / "step_1").exists()
    assert not (tmp_path / "fresh").exists() or os.listdir(tmp_path / "fresh") == []


def test_unencodable_value_late_in_a_big_state_leaves_nothing(tmp_path):
    # The bad value comes after many tensors: still nothing may be left behind.
    run = tmp_path / "run"
    run.mkdir()
    state = {f"t{i}": np.full(1000, i, dtype=np.float32) for i in range(50)}
    state["zz"] = {"fn": print}
    with pytest.raises(UnsupportedStateError) as info:
        ckptvault.save(run / "step_1", state)
    assert "state['zz']['fn']" in str(info.value)
    assert os.listdir(run) == []
