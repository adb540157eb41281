"""The manifest: the single commit point of a checkpoint, and a strict schema for it.

A manifest lists every file (size, digest; for tensor files also the header's size and digest),
every stored tensor (file, safetensors dtype, stored shape, byte range, digest), the encoded state
tree and the user's metadata. Parsing rejects unknown fields, unknown required features, unsafe
names and inconsistent cross-references, so everything downstream can trust a parsed
:class:`Manifest` — but not the bytes it describes, which readers check against it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from math import prod
from typing import Any

from ..config import FORMAT_NAME, MAX_NAME_BYTES, MAX_NDIM, SCHEMA_VERSION
from ..errors import CorruptCheckpointError, IncompatibleCheckpointError, UnsafeCheckpointError
from ..types import ChunkRef, FileEntry, ShardedEntry, TensorEntry
from .dtypes import SAFETENSORS_ITEMSIZE
from .sharding import SHARDED_TENSORS, parse_sharded, sharded_json
from .strictjson import StrictJSONError, dumps, gc_paused, loads

# Features a reader must understand to read a checkpoint correctly; this reader refuses others.
# "chunked-tensors": some tensors live in the run's chunk store (docs/format.md §11).
# "sharded-tensors": some tensors are stored as pieces, listed in "sharded" (§15).
CHUNKED_TENSORS = "chunked-tensors"
KNOWN_FEATURES: frozenset[str] = frozenset({CHUNKED_TENSORS, SHARDED_TENSORS})
CHUNK_CODECS = ("raw", "zstd", "lz4")
MAX_CHUNK_BYTES = 1 << 30

_SAFE_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
_CHECKPOINT_ID = re.compile(r"^[0-9a-f]{32}$")
_TOP_KEYS = {
    "format",
    "schema_version",
    "checkpoint_id",
    "created_at",
    "step",
    "digest_algorithm",
    "required_features",
    "files",
    "tensors",
    "tree",
    "metadata",
}
_FILE_KEYS = {"size", "digest", "header_size", "header_digest"}
_TENSOR_KEYS = {"file", "dtype", "shape", "offsets", "digest"}
_CHUNKED_KEYS = {"dtype", "shape", "digest", "chunks"}


@dataclass(frozen=True)
class Manifest:
    checkpoint_id: str
    created_at: str
    step: int
    digest_algorithm: str
    files: dict[str, FileEntry]
    tensors: dict[str, TensorEntry]
    tree: Any
    metadata: Any
    schema_version: int = SCHEMA_VERSION
    required_features: tuple[str, ...] = ()
    sharded: dict[str, ShardedEntry] = field(default_factory=dict)

    def entry(self, name: str) -> TensorEntry | ShardedEntry | None:
        """What a tree leaf's tensor name refers to: a stored tensor or a sharded one."""
        found = self.tensors.get(name)
        return found if found is not None else self.sharded.get(name)

    @property
    def logical_count(self) -> int:
        """Tensors as a user counts them: a sharded tensor once, not its pieces."""
        pieces = sum(len(s.shards) for s in self.sharded.values())
        return len(self.tensors) - pieces + len(self.sharded)

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT_NAME,
            "schema_version": self.schema_version,
            "checkpoint_id": self.checkpoint_id,
            "created_at": self.created_at,
            "step": self.step,
            "digest_algorithm": self.digest_algorithm,
            "required_features": list(self.required_features),
            "files": {name: _file_json(entry) for name, entry in self.files.items()},
            "tensors": {name: _tensor_json(t) for name, t in self.tensors.items()},
            "tree": self.tree,
            "metadata": self.metadata,
        }
        if self.sharded:
            doc["sharded"] = {name: sharded_json(entry) for name, entry in self.sharded.items()}
        # Compact, which Python's json writes with its C encoder (~6x faster than indented: 0.1 vs
        # 0.6 ms for a small training state, on every save's critical path; a distributed save's
        # manifest lists every piece). People read the sidecar, or ``ckptvault show`` / ``jq``.
        return dumps(doc) + b"\n"

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def total_bytes(self) -> int:
        """Bytes the checkpoint's files hold plus the stored size of every chunk it references
        (chunks shared with other checkpoints count in each of them)."""
        chunked = sum(c.stored_len for t in self.tensors.values() for c in t.chunks or ())
        return sum(f.size for f in self.files.values()) + chunked


def _tensor_json(t: TensorEntry) -> dict[str, Any]:
    if t.chunks is not None:
        return {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "digest": t.digest,
            "chunks": [[c.digest, c.raw_len, c.stored_len, c.codec] for c in t.chunks],
        }
    return {
        "file": t.file,
        "dtype": t.dtype,
        "shape": list(t.shape),
        "offsets": list(t.offsets),
        "digest": t.digest,
    }


def _file_json(entry: FileEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"size": entry.size, "digest": entry.digest}
    if entry.header_size is not None:
        out["header_size"] = entry.header_size
        out["header_digest"] = entry.header_digest
    return out


def check_file_name(name: Any, *, path: str | None = None) -> str:
    """A file name inside a checkpoint: one plain path component, never hidden, never escaping."""
    if not isinstance(name, str) or not _SAFE_FILE_NAME.match(name) or name in (".", ".."):
        raise UnsafeCheckpointError(f"unsafe file name {str(name)[:80]!r} in manifest", path=path)
    return name


def _require(cond: bool, message: str, path: str | None) -> None:
    if not cond:
        raise _bad(message, path)


def _bad(message: str, path: str | None) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"manifest: {message}", path=path, file="manifest.json", kind="bad-manifest"
    )


def _is_uint(value: Any) -> bool:
    return type(value) is int and value >= 0


def parse_manifest(data: bytes, *, path: str | None = None) -> Manifest:
    """Parses and validates manifest bytes; raises typed errors naming what is wrong."""
    try:
        with gc_paused():
            return _parse_manifest(data, path)
    except (CorruptCheckpointError, IncompatibleCheckpointError):
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # incl. UnicodeError
        # Every rule above should have caught a bad document first; this net keeps the promise
        # that hostile input only ever yields a typed error.
        raise CorruptCheckpointError(
            f"manifest: malformed ({type(exc).__name__}: {str(exc)[:120]})",
            path=path,
            file="manifest.json",
            kind="bad-manifest",
        ) from exc


def _parse_manifest(data: bytes, path: str | None) -> Manifest:
    try:
        doc = loads(data)
    except StrictJSONError as exc:
        raise CorruptCheckpointError(
            f"manifest is not valid JSON: {exc}", path=path, file="manifest.json", kind="bad-manifest"
        ) from exc
    _require(isinstance(doc, dict), "top level must be an object", path)
    _require(doc.get("format") == FORMAT_NAME, f"format must be {FORMAT_NAME!r}", path)
    version = doc.get("schema_version")
    _require(type(version) is int and version >= 1, "schema_version must be a positive integer", path)
    if version > SCHEMA_VERSION:
        raise IncompatibleCheckpointError(
            f"{path}: written with schema_version {version}; this ckptvault reads up to {SCHEMA_VERSION}. "
            "Upgrade ckptvault to read it."
        )
    unknown = set(doc) - _TOP_KEYS - {"sharded"}
    _require(not unknown, f"unknown fields {sorted(unknown)[:5]}", path)
    missing = _TOP_KEYS - set(doc)
    _require(not missing, f"missing fields {sorted(missing)}", path)
    features = doc["required_features"]
    _require(
        isinstance(features, list) and all(isinstance(f, str) for f in features),
        "bad required_features",
        path,
    )
    unknown_features = set(features) - KNOWN_FEATURES
    if unknown_features:
        raise IncompatibleCheckpointError(f"{path}: needs unknown features {sorted(unknown_features)}")
    algorithm = doc["digest_algorithm"]
    _require(algorithm in ("blake3", "sha256"), f"unknown digest_algorithm {str(algorithm)[:20]!r}", path)
    _require(
        isinstance(doc["checkpoint_id"], str) and bool(_CHECKPOINT_ID.match(doc["checkpoint_id"])),
        "checkpoint_id must be 32 hex digits",
        path,
    )
    _require(isinstance(doc["created_at"], str) and len(doc["created_at"]) < 64, "bad created_at", path)
    _require(_is_uint(doc["step"]), "step must be a non-negative integer", path)

    files: dict[str, FileEntry] = {}
    raw_files = doc["files"]
    _require(isinstance(raw_files, dict), "files must be an object", path)
    for name, raw in raw_files.items():
        check_file_name(name, path=path)
        _require(name != "manifest.json", "the manifest cannot list itself", path)
        _require(
            isinstance(raw, dict) and {"size", "digest"} <= set(raw) <= _FILE_KEYS,
            f"file {name}: bad entry",
            path,
        )
        _require(_is_uint(raw["size"]), f"file {name}: size must be a non-negative integer", path)
        _require(
            isinstance(raw["digest"], str) and bool(_HEX.match(raw["digest"])),
            f"file {name}: bad digest",
            path,
        )
        header_size = raw.get("header_size")
        header_digest = raw.get("header_digest")
        if "header_size" in raw or "header_digest" in raw:
            _require(
                _is_uint(header_size) and header_size + 8 <= raw["size"],
                f"file {name}: bad header_size",
                path,
            )
            _require(
                isinstance(header_digest, str) and bool(_HEX.match(header_digest)),
                f"file {name}: bad header_digest",
                path,
            )
        files[name] = FileEntry(name, raw["size"], raw["digest"], header_size, header_digest)

    raw_tensors = doc["tensors"]
    _require(isinstance(raw_tensors, dict), "tensors must be an object", path)
    tensors = _parse_tensors(raw_tensors, files, features, path)
    sharded: dict[str, ShardedEntry] = {}
    if "sharded" in doc:
        _require(SHARDED_TENSORS in features, "sharded tensors without the feature", path)
        sharded = parse_sharded(doc["sharded"], tensors, algorithm, lambda m: _bad(m, path))
    return Manifest(
        checkpoint_id=doc["checkpoint_id"],
        created_at=doc["created_at"],
        step=doc["step"],
        digest_algorithm=algorithm,
        files=files,
        tensors=tensors,
        tree=doc["tree"],
        metadata=doc["metadata"],
        schema_version=version,
        required_features=tuple(features),
        sharded=sharded,
    )


def _uints(values: list[Any]) -> bool:
    """Every item a non-negative int (bool excluded), checked without a Python call per item."""
    return {*map(type, values)} <= _INT_TYPE and (not values or min(values) >= 0)


_INT_TYPE = {int}
_MAX_DIM = 2**63 - 1  # what numpy (intp) and torch (int64) can hold; tensorfile refuses more too


def _too_big(shape: list[int]) -> bool:
    return bool(shape) and max(shape) > _MAX_DIM


def _parse_tensors(
    raw_tensors: dict[str, Any], files: dict[str, FileEntry], features: list[str], path: str | None
) -> dict[str, TensorEntry]:
    """The tensor table. Why it is written this way: it runs once per tensor (50,000 for an optimizer
    state), so each rule is an inline test that builds its message only when it fails, and the
    per-item tests (shape, offsets) run in C (``map``/``min``), not as a Python call per item."""
    data_files = {n for n, f in files.items() if f.header_size is not None}
    itemsizes = SAFETENSORS_ITEMSIZE
    hex_digest = _HEX.match
    cheap_name = MAX_NAME_BYTES // 4  # a name of this many characters fits in any UTF-8 encoding
    tensors: dict[str, TensorEntry] = {}
    for name, raw in raw_tensors.items():
        if not name or (len(name) > cheap_name and len(name.encode()) > MAX_NAME_BYTES):
            raise _bad("tensor name empty or too long", path)
        if type(raw) is dict and "chunks" in raw:
            _require(CHUNKED_TENSORS in features, f"tensor {name[:80]!r}: chunks without the feature", path)
            tensors[name] = _parse_chunked(name, raw, path)
            continue
        if type(raw) is not dict or raw.keys() != _TENSOR_KEYS:
            raise _bad(f"tensor {name[:80]!r}: bad entry", path)
        file, dtype, shape, offsets, digest = (
            raw["file"],
            raw["dtype"],
            raw["shape"],
            raw["offsets"],
            raw["digest"],
        )
        if type(file) is not str or file not in data_files:
            raise _bad(f"tensor {name[:80]!r}: file is not a listed tensor file", path)
        if type(dtype) is not str or dtype not in itemsizes:
            raise _bad(f"tensor {name[:80]!r}: unknown dtype", path)
        if type(shape) is not list or len(shape) > MAX_NDIM or not _uints(shape) or _too_big(shape):
            raise _bad(f"tensor {name[:80]!r}: bad shape", path)
        if (
            type(offsets) is not list
            or len(offsets) != 2
            or type(offsets[0]) is not int
            or type(offsets[1]) is not int
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _bad(f"tensor {name[:80]!r}: bad offsets", path)
        # The byte range must hold exactly what dtype and shape need (the header says the same, but a
        # lazy read of one tensor trusts the manifest and need not decode the header). A hostile shape
        # costs one bounded product: at most MAX_NDIM factors below 2**63 each.
        if (offsets[1] - offsets[0]) != itemsizes[dtype] * prod(shape):
            raise _bad(f"tensor {name[:80]!r}: byte range does not fit dtype and shape", path)
        if type(digest) is not str or not hex_digest(digest):
            raise _bad(f"tensor {name[:80]!r}: bad digest", path)
        tensors[name] = TensorEntry(name, file, dtype, tuple(shape), (offsets[0], offsets[1]), digest)
    return tensors


def _parse_chunked(name: str, raw: dict[str, Any], path: str | None) -> TensorEntry:
    label = f"tensor {name[:80]!r}"
    _require(set(raw) == _CHUNKED_KEYS, f"{label}: bad chunked entry", path)
    dtype, shape, chunks = raw["dtype"], raw["shape"], raw["chunks"]
    _require(isinstance(dtype, str) and dtype in SAFETENSORS_ITEMSIZE, f"{label}: unknown dtype", path)
    _require(
        isinstance(shape, list) and len(shape) <= MAX_NDIM and all(_is_uint(d) for d in shape),
        f"{label}: bad shape",
        path,
    )
    _require(isinstance(raw["digest"], str) and bool(_HEX.match(raw["digest"])), f"{label}: bad digest", path)
    _require(isinstance(chunks, list) and len(chunks) > 0, f"{label}: chunks must be a non-empty list", path)
    refs: list[ChunkRef] = []
    total = 0
    for item in chunks:
        _require(isinstance(item, list) and len(item) == 4, f"{label}: bad chunk reference", path)
        digest, raw_len, stored_len, codec = item
        _require(isinstance(digest, str) and bool(_HEX.match(digest)), f"{label}: bad chunk digest", path)
        _require(
            _is_uint(raw_len) and 0 < raw_len <= MAX_CHUNK_BYTES and _is_uint(stored_len),
            f"{label}: bad chunk length",
            path,
        )
        _require(codec in CHUNK_CODECS, f"{label}: unknown chunk codec {str(codec)[:20]!r}", path)
        _require(
            stored_len == raw_len if codec == "raw" else 0 < stored_len <= raw_len,
            f"{label}: chunk stored length does not fit its codec",
            path,
        )
        refs.append(ChunkRef(digest, raw_len, stored_len, codec))
        total += raw_len
    # The stored size must be what dtype and shape say; the running product stops early so a hostile
    # shape cannot make us multiply without bound.
    expected = SAFETENSORS_ITEMSIZE[dtype]
    for dim in shape:
        expected *= dim
        _require(expected <= total, f"{label}: shape does not match its chunks", path)
    _require(expected == total, f"{label}: shape does not match its chunks", path)
    return TensorEntry(name, "", dtype, tuple(shape), (0, total), raw["digest"], tuple(refs))
