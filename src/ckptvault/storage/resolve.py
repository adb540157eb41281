"""L1: the URL → backend resolver: which :class:`Storage` owns a location, and the location in that
backend's terms.

A plain path belongs to :class:`LocalStorage`; ``s3://``, ``gs://``, ``az://`` and ``abfs://`` URLs to
:class:`~ckptvault.storage.s3.S3Storage` (one per bucket, configured from the environment when first
resolved and reused after, so its connection pool and settings stay put for the process; a change
of ``AWS_*`` variables makes a new one). References that need a higher layer to resolve
(``registry://`` names, which live in the catalog) are turned into a location by that layer first --
see :func:`ckptvault.api.storage_for`.
"""

from __future__ import annotations

import os
import threading

from .base import Storage
from .local import LocalStorage
from .s3_client import SCHEMES

PathLike = str | os.PathLike[str]
_ENV_PREFIXES = ("AWS_", "GOOGLE_", "AZURE_")
_buckets: dict[tuple[str, ...], Storage] = {}
_lock = threading.Lock()


def is_url(location: PathLike) -> bool:
    """True for an object-store URL (``s3://bucket/...`` and the other schemes the client speaks)."""
    text = os.fspath(location)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme in SCHEMES


def split_location(location: PathLike) -> tuple[str, str]:
    """``(parent, name)`` of a checkpoint's location: a URL split at its last ``/`` (a ``Path``
    would turn ``s3://b/k`` into ``s3:/b/k``), a path as ``os.path`` splits it."""
    if is_url(location):
        parent, _, name = os.fspath(location).rstrip("/").rpartition("/")
        return parent, name
    text = os.path.normpath(os.fspath(location))
    return os.path.dirname(text) or ".", os.path.basename(text)


def object_storage(url: str) -> Storage:
    """The backend of ``url``'s bucket, shared by every location in it."""
    from .s3 import S3Storage  # the object-store client loads only when a URL is used
    from .s3_client import split_url

    scheme, bucket, _ = split_url(url)
    env = tuple(sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)))
    key = (scheme, bucket, *env)
    with _lock:
        storage = _buckets.get(key)
        if storage is None:
            storage = _buckets[key] = S3Storage(url)
        return storage


def storage_for(path: PathLike, *, rooted: bool = False) -> tuple[Storage, str]:
    """The backend that owns ``path`` and the path in that backend's terms. ``rooted``: a backend
    rooted at ``path`` (a run or a registry root the user named: below it no link is followed --
    object stores have no links, so every object-store backend is rooted)."""
    if is_url(path):
        url = os.fspath(path)
        storage = object_storage(url)
        return storage, storage.join(url)
    return LocalStorage(root=path if rooted else None), os.fspath(path)
