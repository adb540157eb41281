"""DCP's pickled ``.metadata``, read without running anything it asks for.

``FileSystemWriter`` pickles its global ``Metadata`` (dataclasses of
``torch.distributed.checkpoint``, ``torch.Size``, dtypes, a layout, a ``pathlib`` path) into
``<dir>/.metadata``. A plain ``pickle.load`` of a file someone handed us would call whatever the
file names, so :class:`MetadataUnpickler` admits an explicit allow-list of globals and refuses any
other with :class:`~ckptvault.errors.UnsafeLegacyFileError` naming it -- before it is imported.

Even allowed classes are not handed to the unpickler as themselves: pickle's BUILD opcode sets
attributes on whatever object is on its stack, including a class pushed by GLOBAL, so a file could
rewrite ``Metadata``'s or ``_get_layout``'s attributes process-wide. The Python-level classes and
functions are therefore *stand-ins* created afresh for each read (:class:`_Shadow` subclasses and
local functions); only immutable C objects (``torch.Size``, ``collections.OrderedDict``, the dtype
objects) are returned as themselves. :func:`parse_metadata` then checks the stand-ins' fields one
by one and builds a :class:`DcpCheckpoint` of plain values: every item range lies inside a regular
file of the directory, ranges do not overlap (so work is bounded by bytes stored), chunks lie inside
their tensor and cover its volume.
"""

from __future__ import annotations

import io
import itertools
import math
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import MAX_NDIM
from ..errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    UnsafeLegacyFileError,
    UnsupportedStateError,
)
from ..format.dtypes import TORCH_DTYPES
from ..storage.foreign import read_head, regular_size

METADATA_FILE = ".metadata"
MAX_METADATA_BYTES = 256 * 1024 * 1024
MAX_CHUNKS = 1 << 22  # chunk records walked in total (a shared list counts each time it is used)
MAX_PATH_LENGTH = 1000  # planner_data: keys on the way to one value
_DCP = "torch.distributed.checkpoint.metadata"
_FS = "torch.distributed.checkpoint.filesystem"
_SHADOWED = {
    (_DCP, "Metadata"),
    (_DCP, "TensorStorageMetadata"),
    (_DCP, "BytesStorageMetadata"),
    (_DCP, "ChunkStorageMetadata"),
    (_DCP, "TensorProperties"),
    (_DCP, "MetadataIndex"),
    (_DCP, "StorageMeta"),
    (_DCP, "_MEM_FORMAT_ENCODING"),
    (_FS, "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("pathlib", "Path"),
}
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}")


class _Shadow:
    """Stands for one allowed DCP class while unpickling: records the constructor arguments and
    the BUILD state, runs nothing. A fresh subclass per class per read (module docstring)."""

    __slots__ = ("args", "state")
    kind = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Shadow:
        obj = object.__new__(cls)
        _ARGS.__set__(obj, args)
        _STATE.__set__(obj, None)
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        _STATE.__set__(self, state)


_ARGS = _Shadow.__dict__["args"]
_STATE = _Shadow.__dict__["state"]


class MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` admits only DCP's metadata types (as stand-ins),
    ``torch.Size``, dtypes, layouts (via ``torch.serialization._get_layout``) and
    ``collections.OrderedDict``; anything else raises :class:`UnsafeLegacyFileError`."""

    def __init__(self, data: bytes, where: str) -> None:
        super().__init__(io.BytesIO(data))
        import torch

        self.where = where
        self.kinds: dict[type, str] = {}
        self._shadows: dict[tuple[str, str], type] = {}
        self._dtypes = {n: v for n, v in vars(torch).items() if isinstance(v, torch.dtype)}
        layouts = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}

        def get_layout(name: Any) -> Any:  # torch.serialization._get_layout, minus its shared cache
            if not isinstance(name, str) or name not in layouts:
                raise CorruptCheckpointError(f"unknown layout {str(name)[:40]!r}", path=where)
            return layouts[name]

        self._get_layout = get_layout

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in _SHADOWED:
            if key not in self._shadows:
                shadow = type(f"Shadow_{name}", (_Shadow,), {"__slots__": (), "kind": name})
                self._shadows[key] = shadow
                self.kinds[shadow] = "Path" if module == "pathlib" else name
            return self._shadows[key]
        if module == "torch" and name == "Size":
            import torch

            return torch.Size  # immutable C type: BUILD cannot change it
        if module == "torch" and name in self._dtypes:
            return self._dtypes[name]  # dtype objects have no settable attributes
        if key == ("torch.serialization", "_get_layout"):
            return self._get_layout
        if key == ("collections", "OrderedDict"):
            return OrderedDict  # immutable C type
        raise UnsafeLegacyFileError(
            f"{self.where}: the DCP metadata asks for the Python global {module[:100]}.{name[:100]}, "
            "which ckptvault refuses to load (only DCP's metadata types, torch.Size, dtypes and "
            "layouts are allowed); nothing was run"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise CorruptCheckpointError("persistent ids have no place in DCP metadata", path=self.where)


@dataclass(frozen=True)
class Location:
    """Where one DCP item's bytes are: a file of the directory, a byte range in it."""

    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class DcpChunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    location: Location | None  # None: an empty chunk (nothing to read)


@dataclass(frozen=True)
class DcpTensor:
    fqn: str
    dtype: Any  # torch.dtype
    requires_grad: bool
    size: tuple[int, ...]
    chunks: tuple[DcpChunk, ...]


@dataclass
class DcpCheckpoint:
    """A DCP checkpoint's metadata, checked: plain values only."""

    root: Path
    tensors: dict[str, DcpTensor] = field(default_factory=dict)
    values: dict[str, Location] = field(default_factory=dict)
    planner_data: dict[str, tuple[str | int, ...]] | None = None
    version: str | None = None
    file_sizes: dict[str, int] = field(default_factory=dict)


def read_metadata(root: Path) -> DcpCheckpoint:
    """The checked metadata of the DCP checkpoint directory ``root``."""
    path = root / METADATA_FILE
    where = str(path)
    try:
        size = regular_size(path)
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(f"{root}: no {METADATA_FILE} (not a DCP checkpoint directory)") from exc
    if size is None:
        raise UnsafeCheckpointError(f"{METADATA_FILE} is not a regular file", path=str(root))
    if size > MAX_METADATA_BYTES:
        raise CorruptCheckpointError(
            f"{METADATA_FILE} is {size} bytes, more than the {MAX_METADATA_BYTES} this importer reads",
            path=str(root),
            kind="size-mismatch",
        )
    data = read_head(path, MAX_METADATA_BYTES + 1)
    if len(data) > MAX_METADATA_BYTES:
        raise CorruptCheckpointError(f"{METADATA_FILE} grew past the limit while read", path=str(root))
    unpickler = MetadataUnpickler(data, where)
    try:
        loaded = unpickler.load()
    except (UnsafeLegacyFileError, CorruptCheckpointError):
        raise
    except Exception as exc:  # truncated, garbage, wrong arguments to a stand-in: all damage
        raise CorruptCheckpointError(
            f"{METADATA_FILE} is not DCP metadata: {type(exc).__name__}: {str(exc)[:200]}",
            path=str(root),
            kind="bad-manifest",
        ) from exc
    try:
        return _Parser(root, unpickler.kinds).checkpoint(loaded)
    except (CorruptCheckpointError, UnsupportedStateError):
        raise
    except Exception as exc:  # a stand-in graph of an unexpected shape
        raise _bad(root, f"unexpected structure ({type(exc).__name__}: {str(exc)[:200]})") from exc


def _bad(root: Path, message: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(message, path=str(root), file=METADATA_FILE, kind="bad-manifest")


class _Parser:
    """Turns the unpickled stand-in graph into a :class:`DcpCheckpoint`, checking every field."""

    def __init__(self, root: Path, kinds: dict[type, str]) -> None:
        self.root = root
        self.kinds = kinds
        self.chunks_seen = 0
        self.out = DcpCheckpoint(root)
        self.ranges: dict[str, list[tuple[int, int, str]]] = {}

    def fail(self, message: str) -> CorruptCheckpointError:
        return _bad(self.root, message)

    def fields(self, obj: Any, kind: str) -> dict[str, Any]:
        """The BUILD state of a stand-in of ``kind`` (a dataclass's ``__dict__``)."""
        if self.kinds.get(type(obj)) != kind:
            raise self.fail(f"expected a {kind}, found {type(obj).__name__}")
        state = _STATE.__get__(obj)
        if state is None:
            return {}
        if type(state) is tuple and len(state) == 2 and state[0] is None:
            state = state[1]  # (None, slotstate): frozen dataclasses may pickle so
        if type(state) is not dict or not all(type(k) is str for k in state):
            raise self.fail(f"a {kind} with a state of type {type(state).__name__}")
        return state

    def checkpoint(self, loaded: Any) -> DcpCheckpoint:
        state = self.fields(loaded, "Metadata")
        entries, storage = state.get("state_dict_metadata"), state.get("storage_data")
        if not isinstance(entries, dict) or not isinstance(storage, dict):
            raise self.fail("state_dict_metadata and storage_data must be dicts")
        version = state.get("version")
        if version is not None and (type(version) is not str or len(version) > 100):
            raise self.fail("bad version")
        self.out.version = version
        self.out.planner_data = self.planner_data(state.get("planner_data"))
        locations = self.locations(storage)
        for fqn, entry in entries.items():
            if type(fqn) is not str:
                raise self.fail("a state_dict_metadata key that is not a string")
            if self.kinds.get(type(entry)) == "BytesStorageMetadata":
                location = locations.get((fqn, None))
                if location is None:
                    raise self.fail(f"no stored bytes for the value {fqn[:80]!r}")
                self.out.values[fqn] = location
            else:
                self.out.tensors[fqn] = self.tensor(
                    fqn, self.fields(entry, "TensorStorageMetadata"), locations
                )
        self.check_overlaps()
        return self.out

    def planner_data(self, data: Any) -> dict[str, tuple[str | int, ...]] | None:
        if data is None:
            return None
        if not isinstance(data, dict):
            raise self.fail("planner_data of a form this importer does not read (not a dict)")
        out: dict[str, tuple[str | int, ...]] = {}
        for key, path in data.items():
            if not (
                type(key) is str
                and type(path) is tuple
                and 0 < len(path) <= MAX_PATH_LENGTH
                and all(type(p) in (str, int) for p in path)
            ):
                raise self.fail(f"planner_data entry {str(key)[:80]!r} is not a path of keys")
            out[key] = path
        return out

    def dims(self, value: Any, what: str) -> tuple[int, ...]:
        import torch

        if type(value) is not torch.Size or len(value) > MAX_NDIM:
            raise self.fail(f"{what} is not a torch.Size of at most {MAX_NDIM} dims")
        out = tuple(value)
        if not all(type(d) is int and d >= 0 for d in out):
            raise self.fail(f"{what} has negative or non-integer dims")
        return out

    def locations(self, storage: dict[Any, Any]) -> dict[tuple[str, tuple[int, ...] | None], Location]:
        out: dict[tuple[str, tuple[int, ...] | None], Location] = {}
        for index, info in storage.items():
            key_fields = self.fields(index, "MetadataIndex")
            fqn, offset = key_fields.get("fqn"), key_fields.get("offset")
            if type(fqn) is not str:
                raise self.fail("a MetadataIndex without a string fqn")
            key = (fqn, None if offset is None else self.dims(offset, f"{fqn[:80]!r} offset"))
            out[key] = self.location(fqn, self.fields(info, "_StorageInfo"))
        return out

    def location(self, fqn: str, info: dict[str, Any]) -> Location:
        name, offset, length = info.get("relative_path"), info.get("offset"), info.get("length")
        if type(name) is not str or not _FILE_NAME.fullmatch(name):
            raise UnsafeCheckpointError(
                f"{fqn[:80]!r} is stored in {str(name)[:80]!r}, not a plain file name of the directory",
                path=str(self.root),
                file=METADATA_FILE,
            )
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
            raise self.fail(f"{fqn[:80]!r}: bad byte range")
        if info.get("transform_descriptors"):
            raise UnsupportedStateError(
                fqn,
                "stored through DCP stream extensions (e.g. compression); this importer reads plain items",
            )
        size = self.file_size(name)
        if offset + length > size:
            raise CorruptCheckpointError(
                f"{fqn[:80]!r} is said to be at bytes {offset}..{offset + length} of {name}, "
                f"which has {size} bytes",
                path=str(self.root),
                file=name,
                kind="truncated",
            )
        self.ranges.setdefault(name, []).append((offset, length, fqn))
        return Location(name, offset, length)

    def file_size(self, name: str) -> int:
        known = self.out.file_sizes.get(name)
        if known is not None:
            return known
        try:
            size = regular_size(self.root / name)
        except FileNotFoundError as exc:
            raise CorruptCheckpointError(
                "a data file the metadata names is missing",
                path=str(self.root),
                file=name,
                kind="missing-file",
            ) from exc
        if size is None:
            raise UnsafeCheckpointError(
                "a data file is a link or not a regular file", path=str(self.root), file=name
            )
        self.out.file_sizes[name] = size
        return size

    def check_overlaps(self) -> None:
        """Items never share bytes in a DCP directory; refusing overlaps bounds the import's work
        by the bytes stored (many items cannot all point at one big range)."""
        for name, ranges in self.ranges.items():
            ranges.sort()
            for (a, n, first), (b, _, second) in itertools.pairwise(ranges):
                if a + n > b:
                    raise CorruptCheckpointError(
                        f"items {first[:60]!r} and {second[:60]!r} overlap", path=str(self.root), file=name
                    )

    def tensor(self, fqn: str, state: dict[str, Any], locations: dict[Any, Location]) -> DcpTensor:
        import torch

        props = state.get("properties")
        dtype, requires_grad, layout = self.properties(fqn, props)
        if layout is not torch.strided:
            raise UnsupportedStateError(fqn, f"layout {layout} (only strided tensors are imported)")
        name = str(dtype).removeprefix("torch.")
        if name not in TORCH_DTYPES:
            raise UnsupportedStateError(fqn, f"dtype {name} has no stored form in ckptvault")
        size = self.dims(state.get("size"), f"{fqn[:80]!r} size")
        raw_chunks = state.get("chunks")
        if type(raw_chunks) is not list:
            raise self.fail(f"{fqn[:80]!r}: chunks must be a list")
        self.chunks_seen += len(raw_chunks)
        if self.chunks_seen > MAX_CHUNKS:
            raise self.fail(f"more than {MAX_CHUNKS} chunk records")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        chunks: list[DcpChunk] = []
        volume = 0
        for raw in raw_chunks:
            c = self.fields(raw, "ChunkStorageMetadata")
            offsets = self.dims(c.get("offsets"), f"{fqn[:80]!r} chunk offsets")
            sizes = self.dims(c.get("sizes"), f"{fqn[:80]!r} chunk sizes")
            if len(offsets) != len(size) or len(sizes) != len(size):
                raise self.fail(f"{fqn[:80]!r}: a chunk of another rank than its tensor")
            if any(o + s > d for o, s, d in zip(offsets, sizes, size, strict=True)):
                raise self.fail(f"{fqn[:80]!r}: chunk at {list(offsets)} reaches outside the tensor")
            count = math.prod(sizes)
            volume += count
            location = locations.get((fqn, offsets))
            if location is None and count:
                raise self.fail(f"{fqn[:80]!r}: no stored bytes for the chunk at {list(offsets)}")
            if location is not None and count * itemsize > location.length:
                raise self.fail(
                    f"{fqn[:80]!r}: the chunk at {list(offsets)} needs {count * itemsize} bytes, "
                    f"its item holds {location.length}"
                )
            chunks.append(DcpChunk(offsets, sizes, location if count else None))
        if volume != math.prod(size):
            raise self.fail(f"{fqn[:80]!r}: chunks hold {volume} elements, the tensor {math.prod(size)}")
        return DcpTensor(fqn, dtype, requires_grad, size, tuple(chunks))

    def properties(self, fqn: str, props: Any) -> tuple[Any, bool, Any]:
        import torch

        if self.kinds.get(type(props)) != "TensorProperties":
            raise self.fail(f"{fqn[:80]!r}: no TensorProperties")
        state = _STATE.__get__(props)
        if type(state) is tuple and len(state) == 5:  # DCP's __getstate__: dtype, layout, grad, ...
            dtype, layout, requires_grad = state[0], state[1], state[2]
        elif type(state) is dict:
            dtype = state.get("dtype")
            layout, requires_grad = state.get("layout", torch.strided), state.get("requires_grad", False)
        else:
            raise self.fail(f"{fqn[:80]!r}: TensorProperties of an unknown form")
        if not isinstance(dtype, torch.dtype) or type(requires_grad) is not bool:
            raise self.fail(f"{fqn[:80]!r}: bad dtype or requires_grad")
        return dtype, requires_grad, layout
