"""Cross-checks between the manifest and the sidecar it digests (``checkpoint_<step>.meta.json``).

The sidecar's bytes are covered by the manifest's file digest, so it cannot change alone; but a
hand-made manifest can carry ``metadata.metrics`` that its own (consistent) sidecar contradicts.
Tools read either one — the manager and the catalog the manifest, people, ``jq`` and validation the
sidecar — so a checkpoint whose two records of its metrics disagree is reported, never trusted.
"""

from __future__ import annotations

from typing import Any

from ..format.strictjson import StrictJSONError, loads
from ..types import Problem
from .sidecar import plain_json, sidecar_name


def sidecar_problems(step: int, listed: set[str], read: Any, metadata: dict[str, Any]) -> list[Problem]:
    """Problems where the sidecar disagrees with ``metadata`` (the decoded manifest metadata).

    ``read(name)`` returns a digest-checked file of the checkpoint. No sidecar: nothing to compare.
    """
    name = sidecar_name(step)
    if name not in listed:
        return []
    try:
        doc = loads(read(name))
    except StrictJSONError as exc:
        return [Problem("metadata-mismatch", f"sidecar is not strict JSON: {exc}", name)]
    if not isinstance(doc, dict):
        return [Problem("metadata-mismatch", "sidecar is not a JSON object", name)]
    problems: list[Problem] = []
    expected = plain_json(metadata.get("metrics", {}))
    if doc.get("metrics") != expected:
        problems.append(
            Problem(
                "metadata-mismatch",
                f"metrics in the manifest {_short(expected)} disagree with the sidecar's "
                f"{_short(doc.get('metrics'))}",
                name,
            )
        )
    if doc.get("step") != step:
        problems.append(
            Problem(
                "metadata-mismatch", f"sidecar says step {_short(doc.get('step'))}, manifest {step}", name
            )
        )
    return problems


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's digit limit
        return f"<{type(value).__name__}>"
    return text if len(text) <= 200 else text[:197] + "..."
