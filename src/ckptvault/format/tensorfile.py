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
from .strictjson import StrictJSONError, dumps, loads

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


def _checked_shape(name: str, raw: Any, limit: int) -> tuple[int, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_NDIM:
        raise HeaderError(f"tensor {name!r}: shape must be a list of at most {MAX_NDIM} integers")
    if any(type(dim) is not int or dim < 0 for dim in raw):
        raise HeaderError(f"tensor {name!r}: shape has a non-integer or negative dimension")
    if any(dim > _MAX_DIM for dim in raw):  # even beside a 0: numpy, torch and safetensors refuse it
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
    entries: dict[str, HeaderEntry] = {}
    for name, raw in table.items():
        if not name or len(name.encode()) > MAX_NAME_BYTES:
            raise HeaderError(f"tensor name of {len(name)} characters is empty or too long")
        if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
            raise HeaderError(f"tensor {name[:80]!r}: entry must have exactly dtype, shape, data_offsets")
        dtype = raw["dtype"]
        itemsize = SAFETENSORS_ITEMSIZE.get(dtype) if isinstance(dtype, str) else None
        if itemsize is None:
            raise HeaderError(f"tensor {name[:80]!r}: unsupported dtype {str(dtype)[:20]!r}")
        shape = _checked_shape(name[:80], raw["shape"], max(data_size, 0) // itemsize + 1)
        offsets = raw["data_offsets"]
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or any(type(o) is not int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise HeaderError(
                f"tensor {name[:80]!r}: data_offsets {str(offsets)[:60]} out of range 0..{data_size}"
            )
        nbytes = itemsize
        for dim in shape:
            nbytes *= dim
        if offsets[1] - offsets[0] != nbytes:
            raise HeaderError(
                f"tensor {name[:80]!r}: {offsets[1] - offsets[0]} bytes in data_offsets but dtype and shape "
                f"need {nbytes}"
            )
        entries[name] = HeaderEntry(name, dtype, shape, (offsets[0], offsets[1]))
    cursor = 0
    for entry in sorted(entries.values(), key=lambda e: e.offsets):
        if entry.offsets[0] != cursor:
            word = "overlaps the previous tensor" if entry.offsets[0] < cursor else "leaves a gap"
            raise HeaderError(
                f"tensor {entry.name[:80]!r} {word} (offset {entry.offsets[0]}, expected {cursor})"
            )
        cursor = entry.offsets[1]
    if cursor != data_size:
        raise HeaderError(
            f"tensors cover {cursor} data bytes but the file holds {data_size} (trailing bytes?)"
        )
    return ParsedHeader(len(header), entries, metadata)
