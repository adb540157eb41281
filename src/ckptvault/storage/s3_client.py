"""The object-store backend's client: one bucket (or container) behind `obstore`, with every failure
mapped to this library's typed errors naming the object.

Why obstore: it is the Python binding of the Rust ``object_store`` crate (Apache Arrow's), so one code
path speaks S3, GCS and Azure; it signs requests itself (no hand-written SigV4), retries 5xx,
throttling, resets and timeouts with exponential backoff and jitter (bounded by count and time),
uploads large objects as parallel multipart uploads (aborted when the writer fails), sends a
server-verified checksum with every PUT (``checksum_algorithm``), and does conditional puts
(``If-None-Match: *`` and ``If-Match: <etag>``) -- everything the commit protocol in docs/format.md
§14 needs. README "Object storage" has the measured comparison with boto3 and s3fs.

Configuration is the ecosystem's: obstore reads the standard ``AWS_*`` variables (keys, session
token, region, ``AWS_ENDPOINT_URL``; ``GOOGLE_*`` and ``AZURE_*`` likewise) once, when the client is
built; an ``http://`` endpoint is allowed without further flags; ``AWS_PROFILE`` (or a ``profile=``
argument) goes through boto3's credential chain when boto3 is installed, so ``~/.aws/config``
profiles, SSO and role assumption work as they do for the AWS CLI.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn, Protocol

from ..errors import CheckpointNotFoundError, DocumentConflictError, StorageError

SCHEMES = ("s3", "gs", "az", "abfs")
_URL = re.compile(r"^(?P<scheme>[a-z0-9]+)://(?P<bucket>[^/]+)(?:/(?P<path>.*))?$")


def split_url(url: str) -> tuple[str, str, str]:
    """``s3://bucket/a/b`` -> ``("s3", "bucket", "a/b")``; a key never climbs with ``..``."""
    match = _URL.match(url)
    if match is None or match["scheme"] not in SCHEMES:
        raise StorageError(errno.EINVAL, f"{url!r} is not an object-store URL ({', '.join(SCHEMES)})")
    parts = [p for p in (match["path"] or "").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise StorageError(errno.EINVAL, f"{url!r}: '..' never names a key")
    return match["scheme"], match["bucket"], "/".join(parts)


@dataclass(frozen=True)
class ObjectMeta:
    path: str  # the key within the bucket
    size: int
    modified: float
    etag: str


def _meta(raw: Mapping[str, Any]) -> ObjectMeta:
    return ObjectMeta(str(raw["path"]), int(raw["size"]), raw["last_modified"].timestamp(), str(raw["e_tag"]))


def _obstore() -> Any:
    try:
        import obstore
    except ImportError as exc:  # pragma: no cover - the s3 extra is part of dev installs
        raise StorageError(
            errno.ENOPROTOOPT, "object-store locations need the s3 extra: pip install 'ckptvault[s3]'"
        ) from exc
    return obstore


class ObjectClient:
    """One bucket, addressed by keys relative to it; errors name ``scheme://bucket/key``."""

    def __init__(
        self,
        scheme: str,
        bucket: str,
        *,
        endpoint: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        config: Mapping[str, Any] | None = None,
        max_retries: int = 10,
        retry_timeout_seconds: float = 180.0,
        request_timeout_seconds: float = 60.0,
        connect_timeout_seconds: float = 5.0,
    ) -> None:
        obstore = _obstore()
        from obstore.store import from_url as _from_url

        from_url: Any = _from_url  # its overloads are per provider; the URL picks one

        self.scheme = scheme
        self.bucket = bucket
        settings: dict[str, Any] = dict(config or {})
        client_options: dict[str, Any] = {
            "timeout": f"{request_timeout_seconds}s",
            "connect_timeout": f"{connect_timeout_seconds}s",
        }
        kwargs: dict[str, Any] = {}
        if scheme == "s3":
            endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                settings.setdefault("endpoint", endpoint)
                if endpoint.startswith("http://"):
                    client_options["allow_http"] = True
            if region:
                settings["region"] = region
            # The server checks this SHA-256 of every PUT and part and refuses a body that
            # changed on the way (on top of SigV4's signed payload hash).
            if settings.get("checksum_algorithm", "sha256") is None:
                settings.pop("checksum_algorithm")
            else:
                settings.setdefault("checksum_algorithm", "sha256")
            profile = profile or os.environ.get("AWS_PROFILE")
            if profile:
                kwargs["credential_provider"] = _profile_credentials(profile)
        retry = {
            "max_retries": max_retries,
            "retry_timeout": timedelta(seconds=retry_timeout_seconds),
            "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=15)},
        }
        try:
            self.store = from_url(
                f"{scheme}://{bucket}",
                config=settings or None,
                client_options=client_options,
                retry_config=retry,
                **kwargs,
            )
        except Exception as exc:
            raise StorageError(errno.EINVAL, f"cannot configure {scheme}://{bucket}: {exc}") from exc
        self.ob = obstore
        self.max_retries = max_retries

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.bucket}/{path}" if path else f"{self.scheme}://{self.bucket}"

    # -- error mapping --------------------------------------------------------------------------
    def error(self, exc: BaseException, path: str, action: str) -> StorageError:
        """The typed error for a failed request: what was done to which object, and why."""
        if isinstance(exc, StorageError):
            return exc
        text = str(exc).split("\n")[0][:300]
        number = errno.ENOENT if isinstance(exc, FileNotFoundError) else errno.EIO
        return StorageError(number, f"cannot {action} {self.url(path)}: {type(exc).__name__}: {text}")

    def _is_conflict(self, exc: BaseException) -> bool:
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        return isinstance(exc, AlreadyExistsError | PreconditionError)

    # -- requests -------------------------------------------------------------------------------
    def head(self, path: str) -> ObjectMeta | None:
        try:
            return _meta(self.ob.head(self.store, path))
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self.error(exc, path, "look up") from exc

    def get(self, path: str, *, max_bytes: int) -> tuple[bytes, ObjectMeta, dict[str, str]] | None:
        """The whole object, its metadata and attributes; None when absent. The size is checked
        against ``max_bytes`` before the body is read (a hostile object cannot make us buffer it)."""
        try:
            result = self.ob.get(self.store, path)
            meta = _meta(result.meta)
            if meta.size > max_bytes:
                raise StorageError(
                    errno.EFBIG, f"{self.url(path)} has {meta.size} bytes, more than {max_bytes}"
                )
            data = bytes(result.bytes())
            attributes = {str(k): str(v) for k, v in result.attributes.items()}
        except FileNotFoundError:
            return None
        except StorageError:
            raise
        except Exception as exc:
            raise self.error(exc, path, "read") from exc
        if len(data) != meta.size:
            raise StorageError(errno.EIO, f"{self.url(path)}: {len(data)} bytes read, {meta.size} stored")
        return data, meta, attributes

    def get_range(self, path: str, start: int, length: int) -> memoryview:
        try:
            data = memoryview(self.ob.get_range(self.store, path, start=start, length=length))
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(f"{self.url(path)} is gone") from exc
        except Exception as exc:
            raise self.error(exc, path, f"read bytes {start}..{start + length} of") from exc
        return data

    def put(
        self,
        path: str,
        data: Any,
        *,
        mode: str | dict[str, str] = "overwrite",
        attributes: dict[str, str] | None = None,
        part_bytes: int = 16 << 20,
        max_concurrency: int = 8,
    ) -> str:
        """Stores ``data`` (bytes, a buffer or a binary file); returns the new ETag. A failed
        condition raises DocumentConflictError."""
        for attempt in itertools.count():
            try:
                result = self.ob.put(
                    self.store,
                    path,
                    data,
                    mode=mode,
                    attributes=attributes,
                    chunk_size=part_bytes,
                    max_concurrency=max_concurrency,
                )
                break
            except Exception as exc:
                # The client does not retry a conditional PUT whose connection broke (it is not
                # idempotent in general); with the condition it is safe to send again: a first
                # attempt that landed makes the retry fail its condition, which callers check.
                retry = not self._is_conflict(exc) and _transport_error(exc)  # a 412 names its timeout
                if mode == "overwrite" or attempt >= self.max_retries or not retry:
                    self._raise_put(exc, path)
                if hasattr(data, "seek"):
                    data.seek(0)
                time.sleep(min(5.0, 0.1 * 2**attempt) * random.uniform(0.5, 1.0))
        return str(result["e_tag"])

    def _raise_put(self, exc: Exception, path: str) -> NoReturn:
        if self._is_conflict(exc):
            raise DocumentConflictError(
                errno.EEXIST, f"{self.url(path)} was changed by another writer"
            ) from exc
        raise self.error(exc, path, "write") from exc

    def open_writer(self, path: str, *, part_bytes: int, max_concurrency: int) -> Any:
        try:
            return self.ob.open_writer(
                self.store, path, buffer_size=part_bytes, max_concurrency=max_concurrency
            )
        except Exception as exc:
            raise self.error(exc, path, "start writing") from exc

    def delete(self, paths: list[str]) -> None:
        """Deletes objects in batches (absent ones are fine: deletion is idempotent)."""
        for start in range(0, len(paths), 1000):
            batch = paths[start : start + 1000]
            try:
                self.ob.delete(self.store, batch)
            except FileNotFoundError:
                continue
            except Exception as exc:
                raise self.error(exc, batch[0], f"delete {len(batch)} objects from") from exc

    def list_dir(self, prefix: str) -> tuple[list[str], list[ObjectMeta]]:
        """One level below ``prefix``: the child prefixes (without the trailing ``/``) and the
        objects directly in it."""
        try:
            result = self.ob.list_with_delimiter(self.store, prefix or None)
        except Exception as exc:
            raise self.error(exc, prefix, "list") from exc
        prefixes = [str(p).rstrip("/") for p in result["common_prefixes"]]
        return prefixes, [_meta(o) for o in result["objects"]]

    def list_all(self, prefix: str) -> Iterator[ObjectMeta]:
        """Every object below ``prefix`` (recursively), page by page."""
        try:
            for batch in self.ob.list(self.store, prefix or None, chunk_size=1000):
                for raw in batch:
                    yield _meta(raw)
        except Exception as exc:
            raise self.error(exc, prefix, "list") from exc


class BucketOwner(Protocol):
    """What the backend's parts (transactions, handles, leases, chunk store) need of their
    :class:`~ckptvault.storage.s3.S3Storage` -- named here so they never import it (no cycle)."""

    client: ObjectClient
    part_bytes: int
    max_concurrency: int

    def clock(self) -> float: ...
    def drop_strays(self, path: str) -> None: ...


def _transport_error(exc: BaseException) -> bool:
    """A request that may not have reached the server, or whose answer was lost."""
    text = str(exc).lower()
    return any(w in text for w in ("error sending request", "connection", "timed out", "timeout", "reset"))


def _profile_credentials(profile: str) -> Any:
    """boto3's credential chain for a named profile (SSO, role assumption, credential_process)."""
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError as exc:
        raise StorageError(
            errno.ENOPROTOOPT, f"AWS profile {profile!r} needs boto3 installed (pip install boto3)"
        ) from exc
    return Boto3CredentialProvider(boto3.Session(profile_name=profile))
