"""L2: reading one checkpoint's manifest and metadata through the storage protocol.

Why a module of its own: the catalog, the registry and reports need a checkpoint's facts (its id,
step, sizes, metrics) without opening its tensors, and they used to read ``manifest.json`` each
their own way. This is the one way: :meth:`Storage.open` (which never follows a link or blocks on
a FIFO, and caps the manifest's size) and :func:`~ckptvault.format.manifest.parse_manifest`, the
same parse every load performs, so a manifest a load would refuse is refused here too.
"""

from __future__ import annotations

from typing import Any

from ..config import MANIFEST_NAME
from ..errors import CorruptCheckpointError
from ..format.manifest import Manifest, parse_manifest
from ..format.tree import TreeDecodeError, TreeDecoder
from ..storage.base import Storage
from .writer import NO_LEAVES


def read_manifest(storage: Storage, key: str) -> tuple[Manifest, dict[str, Any]]:
    """The parsed manifest of the checkpoint at ``key`` and its decoded metadata (``{}`` when the
    metadata is not a mapping: display code shows what there is). Raises CheckpointError (missing,
    damaged, a link or FIFO) or StorageError."""
    handle = storage.open(key)
    try:
        data = handle.read_manifest()
    finally:
        handle.close()
    manifest = parse_manifest(data, path=key)
    return manifest, decode_metadata(manifest, key)


def decode_metadata(manifest: Manifest, key: str) -> dict[str, Any]:
    """The manifest's metadata tree as plain values; a tensor leaf in it is damage."""
    try:
        value = TreeDecoder(NO_LEAVES).decode(manifest.metadata, "metadata")
    except (TreeDecodeError, ValueError) as exc:
        raise CorruptCheckpointError(
            f"metadata: {exc}", path=key, file=MANIFEST_NAME, kind="bad-manifest"
        ) from exc
    return value if isinstance(value, dict) else {}
