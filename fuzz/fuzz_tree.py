#!/usr/bin/env python3
"""atheris harness: the state-tree decoder (``ckptvault.format.tree``) and its leaf codecs.

Input: JSON text of a tree node (what a manifest's ``tree`` or ``metadata`` holds). It is parsed
with the format's strict JSON, then decoded as verify (``LeafChecker``), load (``BlobReader``
over zero-filled tensors named ``a``, ``b`` and ``empty``) and metadata (no leaves) decode it, and
walked as ``open`` walks it (``iter_leaves``, ``shared_leaves``), the leaf codecs also under a
32-byte cap on a tensor's logical size. A crash is any exception but ``TreeDecodeError`` and
``ResourceLimitError`` (``StrictJSONError`` for text that is not strict JSON); a hash-flooding
dict or set that decodes slowly shows up as a libFuzzer timeout. Run as
``python fuzz/fuzz_tree.py [libFuzzer flags] CORPUS_DIR``.
"""

from __future__ import annotations

import contextlib

import atheris
import numpy as np
import torch  # noqa: F401 -- torch leaves import it on first use; here, before fuzzing starts

import _common

with atheris.instrument_imports(include=["ckptvault"]):
    from ckptvault.engine.arrays import BlobReader, LeafChecker
    from ckptvault.engine.writer import NO_LEAVES
    from ckptvault.errors import ResourceLimitError
    from ckptvault.format.strictjson import StrictJSONError, loads
    from ckptvault.format.tree import TreeDecodeError, TreeDecoder, iter_leaves, shared_leaves

STORED = {"a": 64, "b": 16, "empty": 0}


def _stored(name: str) -> int:
    if name not in STORED:
        raise TreeDecodeError("unknown tensor")
    return STORED[name]


def _fetch(name: str) -> np.ndarray:
    return np.zeros(_stored(name), dtype=np.uint8)


def test_one_input(data: bytes) -> None:
    try:
        node = loads(data)
    except StrictJSONError:
        return
    for decoder in (
        TreeDecoder(LeafChecker(_stored)),
        TreeDecoder(LeafChecker(_stored, 32)),
        TreeDecoder(BlobReader(_fetch)),
        TreeDecoder(BlobReader(_fetch, max_leaf_bytes=32)),
        TreeDecoder(NO_LEAVES),
    ):
        with contextlib.suppress(TreeDecodeError, ResourceLimitError):
            decoder.decode(node)
    with contextlib.suppress(TreeDecodeError):
        list(iter_leaves(node))
        shared_leaves(node)


if __name__ == "__main__":
    _common.run("tree", test_one_input)
