#!/usr/bin/env python3
"""atheris harness: the chunk-frame decoder (``ckptvault.format.codec.decode_into``).

Input: a little-endian u32 (the output size the manifest would promise, taken modulo 1 MiB + 1)
followed by the bytes of a chunk file. A crash is any exception but ``CodecError``; a decode must
also never allocate beyond the promised size (libFuzzer's -rss_limit_mb catches that). Run as
``python fuzz/fuzz_codec.py [libFuzzer flags] CORPUS_DIR``.
"""

from __future__ import annotations

import struct

import atheris
import numpy as np

import _common

with atheris.instrument_imports(include=["ckptvault"]):
    from ckptvault.format.codec import CodecError, decode_into


def test_one_input(data: bytes) -> None:
    if len(data) < 4:
        return
    size = struct.unpack_from("<I", data)[0] % (_common.MAX_FRAME_OUTPUT + 1)
    out = np.empty(size, dtype=np.uint8)
    try:
        decode_into(data[4:], out)
    except CodecError:
        return


if __name__ == "__main__":
    _common.run("codec", test_one_input)
