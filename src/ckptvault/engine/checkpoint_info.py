"""L2: the :class:`CheckpointInfo` summary of a committed checkpoint, built from its manifest.

It lives in the engine (not in ``api``) because the engine's own readers and the background writer
return it; keeping it here lets them do so without importing the layer above.
"""

from __future__ import annotations

from typing import Any

from ..format.manifest import Manifest
from ..types import CheckpointInfo


def info_from_manifest(path: str, manifest: Manifest, metadata: dict[str, Any]) -> CheckpointInfo:
    """The summary ``info()`` and ``save()`` return: the manifest's facts plus the decoded metadata."""
    return CheckpointInfo(
        path=path,
        checkpoint_id=manifest.checkpoint_id,
        step=manifest.step,
        created_at=manifest.created_at,
        size_bytes=manifest.total_bytes,
        num_tensors=manifest.logical_count,
        tensor_bytes=manifest.tensor_bytes,
        digest_algorithm=manifest.digest_algorithm,
        metadata=metadata,
    )
