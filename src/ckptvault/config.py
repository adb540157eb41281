"""Settings with ``CKPTVAULT_*`` environment knobs; explicit arguments always win.

Limits here are the format's hard bounds for *reading*: they keep a hostile checkpoint from making
us allocate or recurse without bound. They are documented in ``docs/format.md``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

SCHEMA_VERSION = 1
FORMAT_NAME = "ckptvault"
MANIFEST_NAME = "manifest.json"
DIGEST_ALGORITHMS = ("blake3", "sha256")

# Hard limits a reader enforces before it allocates anything.
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the same bound the safetensors library uses
MAX_TREE_DEPTH = 256
MAX_TREE_NODES = 10_000_000
MAX_NDIM = 64
MAX_BIGINT_HEX_DIGITS = 1 << 20
MAX_NAME_BYTES = 1024


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


@dataclass(frozen=True)
class Settings:
    """Tunable behaviour of a save or load; read once from the environment per call."""

    digest: str = "blake3"
    shard_bytes: int = 4 * 1024**3
    io_threads: int = 2
    # Data files of at least direct_io_min_bytes are written with O_DIRECT where the filesystem
    # allows it (benchmarks/write_paths.py: 1.2-1.5x buffered throughput here, far less kernel CPU).
    direct_io: bool = True
    direct_io_min_bytes: int = 8 * 1024 * 1024

    @classmethod
    def from_env(cls) -> Settings:
        digest = os.environ.get("CKPTVAULT_DIGEST", "blake3").strip().lower() or "blake3"
        if digest not in DIGEST_ALGORITHMS:
            raise ValueError(f"CKPTVAULT_DIGEST must be one of {DIGEST_ALGORITHMS}, got {digest!r}")
        return cls(
            digest=digest,
            shard_bytes=max(1, _env_int("CKPTVAULT_SHARD_BYTES", cls.shard_bytes)),
            io_threads=max(1, _env_int("CKPTVAULT_IO_THREADS", min(4, os.cpu_count() or 2))),
            direct_io=_env_int("CKPTVAULT_DIRECT_IO", 1) != 0,
        )
