"""Safetensors-compatible tensor files: header writing and paranoid header reading.

The layout is exactly safetensors': an 8-byte little-endian header length N, N bytes of JSON, then
the tensors' bytes packed densely in offset order. We pad the header with spaces (as the spec
allows) so that tensor data starts 64-byte aligned, and we put the checkpoint id into
``__metadata__`` so a data file copied from another checkpoint is recognised as foreign.

Reading validates everything against the file's real size *before* any allocation: header length,
dtypes, shapes (products computed with an early bound, never trusted), offsets in range, dense and
non-overlapping — the same rules as the reference ``tensor.rs`` validator, so every file we accept
the safetensors library accepts too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ..config import MAX_HEADER_BYTES, MAX_NAME_BYTES, MAX_NDIM
from .dtypes import SAFETENSORS_ITEMSIZE
from .strictjson import StrictJSONError, dumps, gc_paused, loads

DATA_ALIGNMENT = 64
METADATA_KEY = "__metadata__"


class HeaderError(ValueError):
    """A tensor file header breaks the format; the message says what and where."""


@dataclass(frozen=True)
class HeaderEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]


@dataclass(frozen=True)
class ParsedHeader:
    header_size: int
    entries: dict[str, HeaderEntry]
    metadata: dict[str, str]

    @property
    def data_start(self) -> int:
        return 8 + self.header_size


def build_header(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """Length prefix + padded JSON header; tensors get dense offsets in the order given.

    ``entries`` holds (name, safetensors dtype, stored shape, nbytes).
    """
    table: dict[str, Any] = {METADATA_KEY: metadata}
    cursor = 0
    for name, dtype, shape, nbytes in entries:
        table[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + nbytes]}
        cursor += nbytes
    body = dumps(table)
    body += b" " * ((-(8 + len(body))) % DATA_ALIGNMENT)
    return struct.pack("<Q", len(body)) + body


def header_length(prefix: bytes, file_size: int) -> int:
    """The declared header length, refused when it cannot fit in the file or exceeds the limit."""
    if len(prefix) != 8:
        raise HeaderError(f"file too short for a header length ({file_size} bytes)")
    size: int = struct.unpack("<Q", prefix)[0]
    if size > MAX_HEADER_BYTES:
        raise HeaderError(f"declared header length {size} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + size > file_size:
        raise HeaderError(f"declared header length {size} runs past the end of the {file_size}-byte file")
    return size


_MAX_DIM = 2**63 - 1  # a dimension numpy (intp) and torch (int64) can hold
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
_INT_TYPE = {int}


def _checked_shape(name: str, raw: Any, limit: int) -> tuple[int, ...]:
    if type(raw) is not list or len(raw) > MAX_NDIM:
        raise HeaderError(f"tensor {name!r}: shape must be a list of at most {MAX_NDIM} integers")
    if raw and not ({*map(type, raw)} <= _INT_TYPE and min(raw) >= 0):  # type() is int: bools refused
        raise HeaderError(f"tensor {name!r}: shape has a non-integer or negative dimension")
    if raw and max(raw) > _MAX_DIM:  # even beside a 0: numpy, torch and safetensors refuse it
        raise HeaderError(f"tensor {name!r}: a shape dimension exceeds 2**63 - 1")
    if 0 in raw:
        return tuple(raw)  # empty tensor: any other dimensions are harmless
    elements = 1
    for dim in raw:
        elements *= dim
        if elements > limit:  # early bound: a product beyond the file size can never be valid
            raise HeaderError(f"tensor {name!r}: shape {raw[:8]} implies more bytes than the file holds")
    return tuple(raw)


def parse_header(header: bytes, file_size: int) -> ParsedHeader:
    """Validates a header's JSON against the file size; ``header`` excludes the 8-byte prefix."""
    try:
        with gc_paused():
            return _parse_header(header, file_size)
    except HeaderError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # incl. UnicodeError
        raise HeaderError(f"malformed header ({type(exc).__name__}: {str(exc)[:120]})") from exc


def _parse_header(header: bytes, file_size: int) -> ParsedHeader:
    data_size = file_size - 8 - len(header)
    try:
        table = loads(header)
    except StrictJSONError as exc:
        raise HeaderError(f"header is not valid JSON: {exc}") from exc
    if not isinstance(table, dict):
        raise HeaderError("header must be a JSON object")
    metadata = table.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise HeaderError("__metadata__ must map strings to strings")
    # One pass per tensor (50,000 in an optimizer state): inline tests whose messages are built only
    # on failure; shapes go to the careful _checked_shape only when the cheap C-level test is unsure.
    entries: dict[str, HeaderEntry] = {}
    spans: list[tuple[int, int, str]] = []
    itemsizes = SAFETENSORS_ITEMSIZE
    usable = max(data_size, 0)
    cheap_name = MAX_NAME_BYTES // 4  # a name of this many characters fits in any UTF-8 encoding
    for name, raw in table.items():
        if not name or (len(name) > cheap_name and len(name.encode()) > MAX_NAME_BYTES):
            raise HeaderError(f"tensor name of {len(name)} characters is empty or too long")
        if type(raw) is not dict or raw.keys() != _ENTRY_KEYS:
            raise HeaderError(f"tensor {name[:80]!r}: entry must have exactly dtype, shape, data_offsets")
        dtype = raw["dtype"]
        itemsize = itemsizes.get(dtype) if type(dtype) is str else None
        if itemsize is None:
            raise HeaderError(f"tensor {name[:80]!r}: unsupported dtype {str(dtype)[:20]!r}")
        shape = _checked_shape(name[:80], raw["shape"], usable // itemsize + 1)
        offsets = raw["data_offsets"]
        if (
            type(offsets) is not list
            or len(offsets) != 2
            or type(offsets[0]) is not int
            or type(offsets[1]) is not int
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise HeaderError(
                f"tensor {name[:80]!r}: data_offsets {str(offsets)[:60]} out of range 0..{data_size}"
            )
        nbytes = itemsize
        for dim in shape:
            nbytes *= dim
        start, end = offsets
        if end - start != nbytes:
            raise HeaderError(
                f"tensor {name[:80]!r}: {end - start} bytes in data_offsets but dtype and shape need {nbytes}"
            )
        entries[name] = HeaderEntry(name, dtype, shape, (start, end))
        spans.append((start, end, name))
    cursor = 0
    spans.sort()
    for start, end, name in spans:
        if start != cursor:
            word = "overlaps the previous tensor" if start < cursor else "leaves a gap"
            raise HeaderError(f"tensor {name[:80]!r} {word} (offset {start}, expected {cursor})")
        cursor = end
    if cursor != data_size:
        raise HeaderError(
            f"tensors cover {cursor} data bytes but the file holds {data_size} (trailing bytes?)"
        )
    return ParsedHeader(len(header), entries, metadata)
