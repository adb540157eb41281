#!/usr/bin/env python3
"""atheris harness: the manifest decoder (``ckptvault.format.manifest.parse_manifest``).

Input: the bytes of a manifest.json. A crash is any exception but ``CheckpointError`` (the typed
errors a hostile manifest must give), or a manifest that is accepted -- with a tree and metadata
the reader's decoders accept too -- but does not re-serialise to itself. Run as
``python fuzz/fuzz_manifest.py [libFuzzer flags] CORPUS_DIR`` (fuzz/README.md).
"""

from __future__ import annotations

import atheris

import _common

with atheris.instrument_imports(include=["ckptvault"]):
    from ckptvault.engine.arrays import LeafChecker
    from ckptvault.engine.writer import NO_LEAVES
    from ckptvault.errors import CheckpointError
    from ckptvault.format.manifest import parse_manifest
    from ckptvault.format.tree import TreeDecodeError, TreeDecoder


def test_one_input(data: bytes) -> None:
    try:
        manifest = parse_manifest(data, path="fuzz")
    except CheckpointError:
        return
    for tensor in manifest.tensors.values():
        if tensor.chunks is None:
            entry = manifest.files[tensor.file]
            assert entry.header_size is not None and entry.header_size + 8 <= entry.size
        else:
            assert sum(c.raw_len for c in tensor.chunks) == tensor.nbytes
    sizes = {name: t.nbytes for name, t in manifest.tensors.items()}

    def stored(name: str) -> int:
        if name not in sizes:
            raise TreeDecodeError("unknown tensor")
        return sizes[name]

    try:
        TreeDecoder(LeafChecker(stored)).decode(manifest.tree)
        TreeDecoder(NO_LEAVES).decode(manifest.metadata, "metadata")
    except TreeDecodeError:
        return
    assert parse_manifest(manifest.to_json(), path="fuzz") == manifest


if __name__ == "__main__":
    _common.run("manifest", test_one_input)
