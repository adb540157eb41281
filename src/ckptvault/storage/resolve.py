"""L1: the URL → backend resolver: which :class:`Storage` owns a location, and the location in that
backend's terms.

Today every plain path belongs to :class:`LocalStorage`; an object-store backend becomes one more
branch here (a ``s3://`` prefix, say), not a change to the engine. References that need a higher
layer to resolve (``registry://`` names, which live in the catalog) are turned into a location by
that layer first — see :func:`ckptvault.api.storage_for`.
"""

from __future__ import annotations

import os

from .base import Storage
from .local import LocalStorage

PathLike = str | os.PathLike[str]


def storage_for(path: PathLike, *, rooted: bool = False) -> tuple[Storage, str]:
    """The backend that owns ``path`` and the path in that backend's terms. ``rooted``: a backend
    rooted at ``path`` (a run or a registry root the user named: below it no link is followed)."""
    return LocalStorage(root=path if rooted else None), os.fspath(path)
