"""Regression tests for format strictness: each case once slipped through as an untyped error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import ckptvault as cv
from ckptvault.format.digest import digest_bytes
from ckptvault.format.strictjson import StrictJSONError, loads
from ckptvault.format.tensorfile import HeaderError, parse_header
from ckptvault.format.tree import TreeDecodeError, TreeDecoder


def test_utf16_json_is_refused() -> None:
    with pytest.raises(StrictJSONError):
        loads('{"a": 1}'.encode("utf-16"))


@pytest.mark.parametrize("text", ['{"a": NaN}', '{"a": Infinity}', '{"a": 1, "a": 2}', "[" * 100_000])
def test_strict_json_rejections(text: str) -> None:
    with pytest.raises(StrictJSONError):
        loads(text.encode())


def test_reserved_and_long_tensor_names_still_load(ckpt_dir: Path) -> None:
    state = {"__metadata__": np.ones(2), "€" * 400: np.zeros(1)}
    cv.save(ckpt_dir / "n", state)
    back = cv.load(ckpt_dir / "n")
    assert set(back) == set(state) and (back["__metadata__"] == 1).all()


@pytest.mark.parametrize(
    "header",
    [
        b'{"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}',
        b'{"\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
        b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"k": 1}}',
        b'{"a": {"dtype": "F32", "shape": [4611686018427387904, 4], "data_offsets": [0, 4]}}',
    ],
)
def test_malformed_headers_raise_header_error(header: bytes) -> None:
    with pytest.raises(HeaderError):
        parse_header(header, 8 + len(header) + 4)


class _NoLeaves:
    def decode_leaf(self, node: dict[str, object], path: str) -> object:
        raise AssertionError("not reached")


@pytest.mark.parametrize(
    "node",
    [
        2**64,  # plain ints must be int64; bigger ones are tagged
        {"t": "dict", "v": {}, "items": []},
        {"t": "tuple", "v": [], "extra": 1},
        {"t": "pickle", "v": "cos\nsystem"},
        {"t": "float", "bits": "zz"},
        {"t": "int", "hex": "0x" + "f" * (1 << 21)},
        {"t": "ref", "id": 3},
    ],
)
def test_tree_decoder_refuses_what_it_does_not_know(node: object) -> None:
    with pytest.raises(TreeDecodeError):
        TreeDecoder(_NoLeaves()).decode(node)


def _rewrite_manifest(path: Path, change: object) -> None:
    doc = json.loads((path / "manifest.json").read_text())
    change(doc)  # type: ignore[operator]
    (path / "manifest.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["tensors"]["a"].update(dtype=["F32"]),
        lambda d: d["files"]["data-00000.safetensors"].update(header_size=None),
        lambda d: d.update(surprise=True),
        lambda d: d.update(required_features=["feature-from-the-future"]),
        lambda d: d["tensors"]["a"].update(shape=[1] * 65),
    ],
)
def test_hostile_manifests_give_typed_errors(ckpt_dir: Path, change: object) -> None:
    cv.save(ckpt_dir / "h", {"a": np.ones(3)})
    _rewrite_manifest(ckpt_dir / "h", change)
    with pytest.raises(cv.CheckpointError):
        cv.load(ckpt_dir / "h")
    assert not cv.verify(ckpt_dir / "h").ok


def test_digest_of_known_vector() -> None:
    # BLAKE3 of the empty input (from the BLAKE3 specification's test vectors).
    assert digest_bytes("blake3", b"") == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"


def test_header_refuses_a_dimension_beyond_int64_beside_a_zero() -> None:
    """Found by the full fuzz run: shape [2**64, 0] has no bytes, so only a per-dimension bound
    catches it -- safetensors (usize), numpy (intp) and torch (int64) all refuse such a shape."""
    body = json.dumps({"t": {"dtype": "F32", "shape": [2**64, 0], "data_offsets": [0, 0]}}).encode()
    with pytest.raises(HeaderError, match="2\\*\\*63"):
        parse_header(body, 8 + len(body))
    body = json.dumps({"t": {"dtype": "F32", "shape": [2**63 - 1, 0], "data_offsets": [0, 0]}}).encode()
    assert parse_header(body, 8 + len(body)).entries["t"].shape == (2**63 - 1, 0)
