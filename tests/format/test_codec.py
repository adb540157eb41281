"""The chunk codec: byte-plane frames round-trip, weights compress, and hostile frames only raise CodecError.

Frames are built here from the layout in ``codec``'s docstring with this file's own struct formats,
so the tests also pin the documented format.
"""

from __future__ import annotations

import itertools
import struct
import tracemalloc

import lz4.block
import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptvault.format.codec import (
    METHOD_LZ4,
    METHOD_STORED,
    METHOD_ZSTD,
    CodecError,
    choose_methods,
    codec_name,
    decode_into,
    encode,
)

HEAD = struct.Struct("<4sBBBBQ")  # magic, version, itemsize, nplanes, reserved, raw_len
PLANE = struct.Struct("<BQ")  # method, stored_len
METHODS = (METHOD_STORED, METHOD_ZSTD, METHOD_LZ4)


def _frame(
    planes: list[tuple[int, bytes]],
    raw_len: int,
    *,
    itemsize: int | None = None,
    magic: bytes = b"CKVC",
    version: int = 1,
    reserved: int = 0,
    nplanes: int | None = None,
    stored_lens: list[int] | None = None,
) -> bytes:
    """A frame by hand; every header field can be overridden to make it lie."""
    nplanes = len(planes) if nplanes is None else nplanes
    itemsize = len(planes) if itemsize is None else itemsize
    lens = [len(p) for _, p in planes] if stored_lens is None else stored_lens
    head = HEAD.pack(magic, version, itemsize, nplanes, reserved, raw_len)
    table = b"".join(PLANE.pack(m, n) for (m, _), n in zip(planes, lens, strict=True))
    return head + table + b"".join(p for _, p in planes)


def _decode(frame: bytes, raw_len: int) -> np.ndarray:
    out = np.full(raw_len, 0xA5, dtype=np.uint8)
    decode_into(frame, out)
    return out


def _weights(dtype: torch.dtype, numel: int, seed: int = 0) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    t = (torch.randn(numel, generator=gen) * 0.02).to(dtype)
    return t.view(torch.uint8).numpy().copy()


def _random_bytes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def _valid_frames() -> list[tuple[str, bytes, np.ndarray]]:
    """Small valid frames of every plane kind: (label, frame, the bytes it decodes to)."""
    bf16 = _weights(torch.bfloat16, 256)
    odd = _weights(torch.bfloat16, 128)[:255]
    fp32 = _weights(torch.float32, 64, seed=1)
    out = [
        ("bf16 zstd", encode(bf16, 2, choose_methods(bf16, 2, "auto")), bf16),
        ("bf16 lz4", encode(bf16, 2, choose_methods(bf16, 2, "lz4")), bf16),
        ("fp32 zstd all planes", encode(fp32, 4, (METHOD_ZSTD,) * 4), fp32),
        ("odd length, one plane", encode(odd, 2, (METHOD_STORED, METHOD_ZSTD)), odd),
        ("stored", encode(bf16[:64], 2, (METHOD_STORED, METHOD_STORED)), bf16[:64]),
    ]
    for label, frame, data in out:  # the fixtures must be what they claim to be
        assert np.array_equal(_decode(frame, data.size), data), label
    return out


VALID = _valid_frames()


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("compression", ["auto", "lz4"])
@pytest.mark.parametrize(
    ("itemsize", "dtype"),
    [(1, torch.int8), (2, torch.bfloat16), (2, torch.float16), (4, torch.float32), (8, torch.float64)],
)
@pytest.mark.parametrize("extra", [0, 1, -1])
def test_round_trip_by_itemsize(itemsize: int, dtype: torch.dtype, compression: str, extra: int) -> None:
    if dtype == torch.int8:
        data = (torch.randn(70_000, generator=torch.Generator().manual_seed(3)) * 4).to(torch.int8)
        data = data.view(torch.uint8).numpy().copy()
    else:
        data = _weights(dtype, 70_000 // itemsize)
    if extra:  # a length that is not a multiple of the element size (for itemsize > 1)
        data = data[:-1] if extra < 0 else np.concatenate([data, np.array([7], dtype=np.uint8)])
    whole = data[: data.size - data.size % itemsize]  # the library samples a tensor's whole elements
    methods = choose_methods(whole, itemsize, compression)
    assert len(methods) == itemsize
    frame = encode(data, itemsize, methods)
    magic, version, f_itemsize, nplanes, reserved, raw_len = HEAD.unpack_from(frame)
    assert (magic, version, reserved, raw_len) == (b"CKVC", 1, 0, data.size)
    split = itemsize > 1 and data.size % itemsize == 0
    assert (f_itemsize, nplanes) == ((itemsize, itemsize) if split else (1, 1))
    assert np.array_equal(_decode(frame, data.size), data)


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=3000),
    itemsize=st.sampled_from([1, 2, 4, 8]),
    choice=st.data(),
)
def test_round_trip_any_bytes_any_methods(data: bytes, itemsize: int, choice: st.DataObject) -> None:
    methods = tuple(choice.draw(st.lists(st.sampled_from(METHODS), min_size=itemsize, max_size=itemsize)))
    arr = np.frombuffer(data, dtype=np.uint8)
    frame = encode(arr, itemsize, methods)
    assert np.array_equal(_decode(frame, arr.size), arr)


@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_a_sample_of_partial_elements_still_gets_one_method_per_plane(itemsize: int) -> None:
    # choose_methods cuts its sample to whole elements; a short sample must be cut too, not judged as
    # one plane (which would make encode fall back to a single plane for every chunk of the tensor).
    sample = _weights(torch.float32, 1000)[: 4000 - 1]
    methods = choose_methods(sample, itemsize, "auto")
    assert len(methods) == itemsize


def test_empty_chunk_round_trips() -> None:
    empty = np.empty(0, dtype=np.uint8)
    for itemsize in (1, 2, 4, 8):
        frame = encode(empty, itemsize, (METHOD_ZSTD,) * itemsize)
        assert _decode(frame, 0).size == 0


def test_decode_reads_a_memoryview_of_a_larger_buffer() -> None:
    label, frame, data = VALID[0]
    padded = b"xx" + frame + b"yy"
    out = np.empty(data.size, dtype=np.uint8)
    decode_into(memoryview(padded)[2:-2], out)
    assert np.array_equal(out, data), label


# --------------------------------------------------------------------------- what pays off


@pytest.mark.parametrize(
    ("dtype", "itemsize", "max_ratio"), [(torch.bfloat16, 2, 0.75), (torch.float32, 4, 0.9)]
)
def test_float_weights_compress_with_auto(dtype: torch.dtype, itemsize: int, max_ratio: float) -> None:
    data = _weights(dtype, (1 << 20) // itemsize)  # 1 MiB
    methods = choose_methods(data, itemsize, "auto")
    assert codec_name(methods) == "zstd"
    assert methods[-1] == METHOD_ZSTD  # sign + exponent: the plane that pays off
    assert methods[0] == METHOD_STORED  # the lowest mantissa byte is noise
    frame = encode(data, itemsize, methods)
    assert len(frame) < max_ratio * data.size
    assert np.array_equal(_decode(frame, data.size), data)


def test_lz4_compresses_and_round_trips() -> None:
    data = _weights(torch.bfloat16, 1 << 19)
    methods = choose_methods(data, 2, "lz4")
    assert codec_name(methods) == "lz4" and METHOD_ZSTD not in methods
    frame = encode(data, 2, methods)
    assert len(frame) < 0.9 * data.size
    assert {PLANE.unpack_from(frame, HEAD.size + i * PLANE.size)[0] for i in range(2)} <= {
        METHOD_STORED,
        METHOD_LZ4,
    }
    assert np.array_equal(_decode(frame, data.size), data)


@pytest.mark.parametrize("compression", ["auto", "zstd", "lz4"])
@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
def test_random_bytes_are_stored(compression: str, itemsize: int) -> None:
    methods = choose_methods(_random_bytes(1 << 18), itemsize, compression)
    assert methods == (METHOD_STORED,) * itemsize
    assert codec_name(methods) == "raw"


def test_a_chunk_that_does_not_compress_falls_back_to_stored_planes() -> None:
    data = _random_bytes(4096, seed=5)
    frame = encode(data, 2, (METHOD_ZSTD, METHOD_ZSTD))
    table = [PLANE.unpack_from(frame, HEAD.size + i * PLANE.size) for i in range(2)]
    assert table == [(METHOD_STORED, 2048), (METHOD_STORED, 2048)]
    assert np.array_equal(_decode(frame, data.size), data)


def test_codec_names() -> None:
    assert codec_name((METHOD_STORED,) * 4) == "raw"
    assert codec_name((METHOD_STORED, METHOD_ZSTD)) == "zstd"
    assert codec_name((METHOD_LZ4, METHOD_LZ4)) == "lz4"
    assert codec_name((METHOD_LZ4, METHOD_ZSTD)) == "zstd"


def test_unknown_compression_is_refused() -> None:
    with pytest.raises(ValueError, match="compression must be one of"):
        choose_methods(_random_bytes(64), 2, "gzip")


# --------------------------------------------------------------------------- hostile frames

_ZSTD_ABCD = zstandard.ZstdCompressor(level=1).compress(b"abcdabcd")
_SHORT = bytes(8)


def _hostile() -> list[tuple[str, bytes, int]]:
    stored2 = [(METHOD_STORED, b"\1" * 4), (METHOD_STORED, b"\2" * 4)]  # a valid 2-plane frame, 8 bytes
    assert np.array_equal(_decode(_frame(stored2, 8), 8), [1, 2, 1, 2, 1, 2, 1, 2])
    return [
        ("empty", b"", 8),
        ("header only", HEAD.pack(b"CKVC", 1, 1, 1, 0, 8), 8),
        ("wrong magic", _frame(stored2, 8, magic=b"CKVD"), 8),
        ("safetensors bytes", b"\x08" + bytes(7) + b'{"a": 1}', 8),
        ("version 0", _frame(stored2, 8, version=0), 8),
        ("version 2", _frame(stored2, 8, version=2), 8),
        ("reserved set", _frame(stored2, 8, reserved=1), 8),
        ("raw_len above the promised size", _frame(stored2, 8), 6),
        ("raw_len below the promised size", _frame(stored2, 8), 10),
        ("raw_len 2**64-1", _frame(stored2, 2**64 - 1), 8),
        ("itemsize 3", _frame([(METHOD_STORED, b"\1" * 3)] * 3, 9), 9),
        ("itemsize 0", _frame([(METHOD_STORED, _SHORT)], 8, itemsize=0), 8),
        ("itemsize 16", _frame([(METHOD_STORED, b"\1" * 1)] * 16, 16), 16),
        ("zero planes", _frame([], 0, itemsize=1), 0),
        ("zero planes, itemsize 2", _frame([], 0, itemsize=2), 0),
        ("2 planes for itemsize 4", _frame(stored2, 8, itemsize=4), 8),
        ("4 planes for itemsize 2", _frame([(METHOD_STORED, b"\1" * 2)] * 4, 8, itemsize=2), 8),
        ("raw_len not divisible by nplanes", _frame([(METHOD_STORED, b"\1" * 4)] * 2, 9), 9),
        ("plane table cut short", _frame(stored2, 8)[: HEAD.size + PLANE.size + 3], 8),
        ("plane lengths too short", _frame(stored2, 8, stored_lens=[4, 3]), 8),
        ("plane lengths too long", _frame(stored2, 8, stored_lens=[4, 5]), 8),
        ("plane length 2**64-1", _frame(stored2, 8, stored_lens=[4, 2**64 - 1]), 8),
        ("lengths add up, stored plane too big", _frame(stored2, 8, stored_lens=[5, 3]), 8),
        ("lengths add up, stored plane too small", _frame(stored2, 8, stored_lens=[3, 5]), 8),
        ("one trailing byte", _frame(stored2, 8) + b"\0", 8),
        ("unknown method 3", _frame([(3, b"\1" * 4), (METHOD_STORED, b"\2" * 4)], 8), 8),
        ("unknown method 255", _frame([(METHOD_STORED, b"\1" * 4), (255, b"\2" * 4)], 8), 8),
        ("zstd garbage", _frame([(METHOD_ZSTD, b"not zstd at all")], 8), 8),
        ("zstd empty payload", _frame([(METHOD_ZSTD, b"")], 8), 8),
        ("zstd payload cut short", _frame([(METHOD_ZSTD, _ZSTD_ABCD[:-2])], 8), 8),
        ("zstd decodes short", _frame([(METHOD_ZSTD, zstandard.ZstdCompressor().compress(b"abc"))], 8), 8),
        ("zstd decodes long", _frame([(METHOD_ZSTD, _ZSTD_ABCD)], 4), 4),
        (
            "zstd decodes long, no content size",
            _frame(
                [(METHOD_ZSTD, zstandard.ZstdCompressor(write_content_size=False).compress(bytes(99)))], 8
            ),
            8,
        ),
        ("lz4 garbage", _frame([(METHOD_LZ4, b"\xff" * 12)], 8), 8),
        ("lz4 empty payload", _frame([(METHOD_LZ4, b"")], 8), 8),
        ("lz4 decodes short", _frame([(METHOD_LZ4, lz4.block.compress(b"abc", store_size=False))], 8), 8),
        ("lz4 decodes long", _frame([(METHOD_LZ4, lz4.block.compress(bytes(99), store_size=False))], 8), 8),
        (
            "lz4 with its size prefix",
            _frame([(METHOD_LZ4, lz4.block.compress(b"abcdabcd", store_size=True))], 8),
            8,
        ),
    ]


HOSTILE = _hostile()


@pytest.mark.parametrize(("frame", "raw_len"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_frames_raise_codec_error(frame: bytes, raw_len: int) -> None:
    with pytest.raises(CodecError):
        decode_into(frame, np.zeros(raw_len, dtype=np.uint8))


def test_codec_error_is_a_value_error() -> None:
    assert issubclass(CodecError, ValueError)


@pytest.mark.parametrize(("frame", "data"), [v[1:] for v in VALID], ids=[v[0] for v in VALID])
def test_every_truncation_raises_codec_error(frame: bytes, data: np.ndarray) -> None:
    for cut in range(len(frame)):
        with pytest.raises(CodecError):
            decode_into(frame[:cut], np.zeros(data.size, dtype=np.uint8))
    assert np.array_equal(_decode(frame, data.size), data)  # and the whole frame still decodes


def _zstd_lying_header(content_size: int) -> bytes:
    """A zstd frame whose header claims ``content_size`` bytes but holds one 4-byte raw block."""
    fhd = 0b11_1_0_0_0_00  # 8-byte frame content size, single segment, no checksum, no dictionary
    block = (1 | (0 << 1) | (4 << 3)).to_bytes(3, "little")  # last block, raw, 4 bytes
    return b"\x28\xb5\x2f\xfd" + bytes([fhd]) + content_size.to_bytes(8, "little") + block + b"abcd"


@pytest.mark.parametrize(
    "payload",
    [
        zstandard.ZstdCompressor(level=1).compress(bytes(64 << 20)),  # 64 MiB of zeros in ~2 KiB
        _zstd_lying_header(1 << 30),
    ],
    ids=["zeros bomb", "header claims 1 GiB"],
)
def test_zstd_bomb_raises_without_allocating_its_size(payload: bytes) -> None:
    assert len(payload) < 64 << 10
    frame = _frame([(METHOD_ZSTD, payload)], 16)
    tracemalloc.start()
    try:
        with pytest.raises(CodecError):
            decode_into(frame, np.zeros(16, dtype=np.uint8))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"decoding a 16-byte chunk allocated {peak / 2**20:.0f} MiB"


# --------------------------------------------------------------------------- fuzz


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.integers(0, len(VALID) - 1),
    edits=st.lists(
        st.tuples(st.booleans(), st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6
    ),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
    tail=st.binary(max_size=4),
    out_delta=st.sampled_from([0, 0, 0, -1, 1]),
)
def test_mutated_frames_decode_or_raise_codec_error(
    which: int, edits: list[tuple[bool, int, int]], cut: int | None, tail: bytes, out_delta: int
) -> None:
    _, frame, data = VALID[which]
    mutated = bytearray(frame)
    for in_head, pos, value in edits:
        # Many edits land in the header and plane table, where the lengths live.
        mutated[pos % min(len(mutated), HEAD.size + 4 * PLANE.size) if in_head else pos % len(mutated)] = (
            value
        )
    if cut is not None:
        del mutated[cut % (len(mutated) + 1) :]
    mutated += tail
    out = np.zeros(max(0, data.size + out_delta), dtype=np.uint8)
    try:
        decode_into(bytes(mutated), out)
    except CodecError:
        return
    if bytes(mutated) == frame:
        assert out_delta == 0 and np.array_equal(out, data)


@settings(max_examples=300, deadline=None)
@given(frame=st.binary(max_size=200), raw_len=st.integers(0, 64))
def test_arbitrary_bytes_decode_or_raise_codec_error(frame: bytes, raw_len: int) -> None:
    head = HEAD.pack(b"CKVC", 1, 2, 2, 0, raw_len)
    for candidate in (frame, head + frame):
        out = np.zeros(raw_len, dtype=np.uint8)
        try:
            decode_into(candidate, out)
        except CodecError:
            continue
        assert candidate[:4] == b"CKVC"  # only a frame with the magic can decode


def test_all_header_fields_small_values() -> None:
    """Every small combination of itemsize/nplanes/method over a valid body: decoded or CodecError."""
    decoded = 0
    body = [b"\1" * 4, b"\2" * 4]
    for itemsize, nplanes, m0, m1 in itertools.product(range(10), range(4), range(4), range(4)):
        planes = [(m0, body[0]), (m1, body[1])][:nplanes] + [(METHOD_STORED, b"")] * max(0, nplanes - 2)
        frame = _frame(planes, 8, itemsize=itemsize)
        try:
            out = _decode(frame, 8)
        except CodecError:
            continue
        decoded += 1
        assert (itemsize, nplanes, m0, m1) in {(2, 2, 0, 0)} and list(out) == [1, 2, 1, 2, 1, 2, 1, 2]
    assert decoded == 1
