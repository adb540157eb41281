"""Small immutable value types that cross layer boundaries (no I/O, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FileEntry:
    """One file of a committed checkpoint, as the manifest records it."""

    name: str
    size: int
    digest: str
    header_size: int | None = None
    header_digest: str | None = None


@dataclass(frozen=True)
class ChunkRef:
    """One chunk of a chunked tensor in the run's chunk store.

    ``digest`` is of the raw bytes (so one content is one chunk whatever its encoding), ``codec``
    names how the stored file encodes them (``raw``, ``zstd``, ``lz4``).
    """

    digest: str
    raw_len: int
    stored_len: int
    codec: str


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor: where its bytes are and what they must hash to.

    ``dtype`` and ``shape`` are the safetensors header's (the stored form); the logical dtype of the
    Python object lives in the tree leaf that references it. A *chunked* tensor (``chunks`` set)
    lives in the run's chunk store instead of a data file: ``file`` is empty and ``offsets`` is
    ``(0, nbytes)``.
    """

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]
    digest: str
    chunks: tuple[ChunkRef, ...] | None = None

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


@dataclass(frozen=True)
class ShardedEntry:
    """A tensor stored in pieces: the shards several ranks of a distributed save wrote.

    Each piece is an ordinary stored tensor (a :class:`TensorEntry` of the manifest, in some rank's
    data file, so any safetensors tool reads it) of the same dtype; ``shards`` lists each piece's
    name with the index of its first element in the whole tensor. The pieces tile the tensor
    exactly (checked when the manifest is parsed), so the tensor is whole when every piece is read.
    ``digest`` is combined from the pieces' offsets and digests: equal digests mean equal bytes cut
    the same way.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    shards: tuple[tuple[tuple[int, ...], str], ...]
    digest: str
    nbytes: int


@dataclass(frozen=True)
class CheckpointInfo:
    """What a caller learns about a committed checkpoint without loading its tensors."""

    path: str
    checkpoint_id: str
    step: int
    created_at: str
    size_bytes: int
    num_tensors: int
    tensor_bytes: int
    digest_algorithm: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, Any]:
        value = self.metadata.get("metrics", {})
        return dict(value) if isinstance(value, dict) else {}


@dataclass(frozen=True)
class Problem:
    """One thing ``verify`` found wrong; ``kind`` is a stable machine-readable word."""

    kind: str
    message: str
    file: str | None = None
    tensor: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "file": self.file, "tensor": self.tensor}


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of ``verify``: every problem found, never an exception."""

    path: str
    problems: tuple[Problem, ...]
    files_checked: int
    tensors_checked: int
    bytes_checked: int
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "problems": [p.as_dict() for p in self.problems],
            "files_checked": self.files_checked,
            "tensors_checked": self.tensors_checked,
            "bytes_checked": self.bytes_checked,
            "seconds": round(self.seconds, 6),
        }
