#!/usr/bin/env python3
"""atheris harness: the tensor-file header parser (``ckptvault.format.tensorfile``).

Input: a whole data file (8-byte length prefix, header JSON, tensor bytes). A crash is any
exception but ``HeaderError``, or an accepted header that breaks what the parser promises (tensors
dense from 0 to the end of the file, each the size its dtype and shape need) or that the
safetensors library refuses. Run as ``python fuzz/fuzz_header.py [libFuzzer flags] CORPUS_DIR``.
"""

from __future__ import annotations

import math
import struct

import atheris
from safetensors import _safetensors_rust as safetensors_rust

import _common

with atheris.instrument_imports(include=["ckptvault"]):
    from ckptvault.format.dtypes import SAFETENSORS_ITEMSIZE
    from ckptvault.format.tensorfile import HeaderError, header_length, parse_header


def test_one_input(data: bytes) -> None:
    try:
        length = header_length(data[:8], len(data))
        parsed = parse_header(data[8 : 8 + length], len(data))
    except HeaderError:
        return
    cursor = 0
    for entry in sorted(parsed.entries.values(), key=lambda e: e.offsets):
        assert entry.offsets[0] == cursor, entry
        assert entry.offsets[1] - entry.offsets[0] == SAFETENSORS_ITEMSIZE[entry.dtype] * math.prod(
            entry.shape
        )
        cursor = entry.offsets[1]
    assert cursor == len(data) - 8 - length
    try:
        tensors = safetensors_rust.deserialize(struct.pack("<Q", length) + data[8:])
    except Exception as exc:
        raise AssertionError(f"accepted a header the safetensors library refuses: {exc}") from exc
    assert {name for name, _ in tensors} == set(parsed.entries)


if __name__ == "__main__":
    _common.run("header", test_one_input)
