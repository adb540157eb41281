"""L3: a mirrored run's tier record -- which checkpoints are local, uploading, remote or both.

Why a document: ``ckptvault ls`` runs in another process than the manager whose mirror uploads, so
the mirror writes what it knows (each checkpoint's state on its side: queued, uploading, remote,
failed) to ``.ckptvault-mirror.json`` in the local run, through the run's storage; ``ls`` combines
it with what it lists locally (:func:`tier_of`). It is derived, informative data: rewritten whole on
every change, never flushed, and read as absent when missing or damaged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..engine.rundir import MAX_DOCUMENT_BYTES, RunDirectory
from ..errors import CheckpointError
from ..policy import CheckpointRecord

MIRROR_NAME = ".ckptvault-mirror.json"  # in the local run, beside the index (docs/format.md §12)


def tier_entry(record: CheckpointRecord, tier: str) -> dict[str, Any]:
    return {"step": record.step, "scope": record.scope, "checkpoint_id": record.checkpoint_id, "tier": tier}


def read_tiers(run: RunDirectory) -> dict[str, Any] | None:
    """A run's tier document (None when the run has no mirror, or the document is unreadable)."""
    try:
        doc = run.storage.get(run.key(MIRROR_NAME), max_bytes=MAX_DOCUMENT_BYTES)
        parsed = json.loads(doc.data) if doc is not None else None
    except (OSError, ValueError, CheckpointError):
        return None
    return parsed if isinstance(parsed, dict) and isinstance(parsed.get("checkpoints"), dict) else None


def tier_of(tiers: Mapping[str, Any], name: str, checkpoint_id: str | None, *, local: bool) -> str:
    """One checkpoint's tier for display: ``local``, ``uploading`` (queued or in flight), ``remote``
    (only on the mirror) or ``both``; a mirror entry of another checkpoint id does not count."""
    entry = tiers.get("checkpoints", {}).get(name)
    if not isinstance(entry, dict) or (
        local and checkpoint_id and entry.get("checkpoint_id") != checkpoint_id
    ):
        return "local"
    state = entry.get("tier")
    if state == "remote":
        return "both" if local else "remote"
    return "uploading" if state in ("queued", "uploading") else "local"


def mirror_reasons(tiers: Mapping[str, Any]) -> dict[str, str]:
    """Why local retention keeps a checkpoint its policy would delete, as the record last said
    (:meth:`Mirror.protected <ckptvault.manager.mirror.Mirror.protected>`): it is not on the mirror
    yet, or it is the newest checkpoint of its scope the mirror holds."""
    reasons: dict[str, str] = {}
    newest: dict[str, tuple[int, str]] = {}
    for name, entry in tiers.get("checkpoints", {}).items():
        if not isinstance(entry, dict) or type(entry.get("step")) is not int:
            continue
        if entry.get("tier") != "remote":
            reasons[name] = "not on the mirror yet"
        elif str(entry.get("scope")) not in newest or entry["step"] > newest[str(entry.get("scope"))][0]:
            newest[str(entry.get("scope"))] = (entry["step"], name)
    for _, name in newest.values():
        reasons[name] = "newest on the mirror"
    return reasons
