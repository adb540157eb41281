"""The model registry: named models, numbered versions pointing at checkpoints, movable aliases.

``ROOT/.ckptvault/registry/<name>.json`` holds one model: its versions (checkpoint path relative
to the root, checkpoint id, when, by whom), its aliases (``production``, ``staging``, any name ->
version) and the history of every alias move (when, from, to, why, host, user). Each is a storage
document changed by compare-and-swap (read, change, ``put(if_version=...)``, and on a conflict read
again and redo the change), so concurrent commands never lose an update and no lock is needed:
every change touches one document at a time. A registered checkpoint is pinned: the registry lists
it in its run's ``.ckptvault-registered.json`` (also by compare-and-swap, before the version that
needs it is written), which retention reads before deleting anything.

References: ``registry://NAME`` (newest version), ``registry://NAME@3`` (version 3),
``registry://NAME@production`` (an alias); :func:`resolve_reference` turns one into a path.

A root is a local directory or an object-store URL (``s3://bucket/models``; also from
``CKPTVAULT_ROOT``), read and written through its storage; a version's checkpoint is a
``/``-separated key relative to the root. A URL root stays a string (a ``Path`` folds ``s3://``).

A registry's files are untrusted input like any run directory (docs/security.md): they are read
through storage rooted at the registry's root (no symlink followed below it, no FIFO blocks), a
version whose path leaves the root is refused, and a version pins its checkpoint id -- resolving it
when its path now holds another checkpoint raises :class:`ReplacedCheckpointError`.
"""

from __future__ import annotations

import getpass
import json
import os
import random
import re
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from ..engine.manifests import read_manifest
from ..engine.rundir import MAX_DOCUMENT_BYTES, REGISTERED_NAME, DamagedRunFileError, RunDirectory
from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    DocumentConflictError,
    StorageError,
    typed_os_errors,
)
from ..format.manifest import Manifest
from ..storage.resolve import is_url, split_location, storage_for
from .files import CATALOG_DIR

REGISTRY_DIR = "registry"
__all__ = ["REGISTERED_NAME", "Registry", "RegistryError", "ReplacedCheckpointError", "registered_in"]
SCHEME = "registry://"
ROOT_ENV = "CKPTVAULT_ROOT"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CAS_TRIES = 64  # a change that loses this many races in a row is refused, never lost silently


class RegistryError(CheckpointError):
    """A registry operation is impossible: unknown model/version/alias, bad name, foreign path."""


class ReplacedCheckpointError(RegistryError):
    """A registered version's path now holds another checkpoint than the one registered."""


def default_root() -> Path | str:
    """``CKPTVAULT_ROOT`` if set, else the current directory (the CLI's ``--root`` overrides); an
    object-store URL stays a string."""
    text = os.environ.get(ROOT_ENV) or os.getcwd()
    return text if is_url(text) else Path(text)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _who() -> dict[str, str]:
    try:
        user = getpass.getuser()
    except Exception:  # no user database entry (containers): not worth failing a registration
        user = str(os.getuid())
    return {"host": socket.gethostname(), "user": user}


@typed_os_errors
def registered_in(run_dir: Path | RunDirectory) -> set[str]:
    """Names of the checkpoints of ``run_dir`` that a registry pins (read by retention); a
    :class:`RunDirectory` is read through its own storage (the run may not be on local disk).

    Only a missing file means "nothing pinned": an unreadable or damaged one raises
    (``StorageError`` / ``RegistryError``), because retention taking it for "no pins" would
    delete registered checkpoints."""
    run = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory(run_dir)
    try:
        doc = run.read_registered()
    except DamagedRunFileError as exc:
        raise RegistryError(f"{run.key(REGISTERED_NAME)} is damaged: {exc}") from exc
    if doc is None:
        return set()
    if not isinstance(doc, dict) or not isinstance(doc.get("checkpoints", {}), dict):
        raise RegistryError(f"{run.key(REGISTERED_NAME)} is damaged: not a pin list")
    entries = doc.get("checkpoints", {})
    return {name for name, refs in entries.items() if isinstance(name, str) and refs}


def _dumps(doc: dict[str, Any]) -> bytes:
    """A registry document's bytes, as they have always been written (sorted keys, indented)."""
    return json.dumps(doc, indent=1, sort_keys=True, default=str).encode("utf-8")


def _backoff(attempt: int) -> None:
    """A short random pause after a lost compare-and-swap, so racing writers spread out."""
    time.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))


class Registry:
    """The registry of a root. ``trackers`` get ``on_register`` calls (e.g. MLflow's registry)."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *, trackers: Sequence[Any] = ()) -> None:
        location = root if root is not None else default_root()
        self.root: Path | str
        self.directory: Path | str
        if is_url(location):  # the URL as its storage spells it (trailing "/" and "//" gone)
            self.storage, self.root = storage_for(location, rooted=True)
            self.directory = self.storage.join(self.root, CATALOG_DIR, REGISTRY_DIR)
        else:
            self.root = Path(location).absolute()
            self.directory = self.root / CATALOG_DIR / REGISTRY_DIR
            # Rooted at the registry's root: below it no link is followed (a planted one is refused).
            self.storage = storage_for(self.root, rooted=True)[0]
        self.trackers = list(trackers)

    def _key(self, name: str) -> str:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise RegistryError(
                f"bad model name {str(name)[:80]!r}: letters, digits, '.', '_', '-' (max 128)"
            )
        return self.storage.join(str(self.directory), f"{name}.json")

    def _get(self, name: str) -> tuple[dict[str, Any] | None, str | None]:
        """The model's document and its version, ``(None, None)`` when it is not registered."""
        found = self.storage.get(self._key(name), max_bytes=MAX_DOCUMENT_BYTES)
        if found is None:
            return None, None
        try:
            doc = json.loads(found.data)
        except ValueError as exc:
            raise RegistryError(f"registry file of {name!r} is damaged: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("versions"), list):
            raise RegistryError(f"registry file of {name!r} is damaged")
        return doc, found.version

    def _load(self, name: str) -> dict[str, Any]:
        doc, _ = self._get(name)
        if doc is None:
            raise RegistryError(f"no registered model {name!r} under {self.root}")
        return doc

    def _update(self, name: str, change: Callable[[dict[str, Any] | None], dict[str, Any]]) -> dict[str, Any]:
        """Applies ``change`` to the model's current document and writes the result only if
        nobody wrote in between; otherwise reads again and applies it again."""
        for attempt in range(_CAS_TRIES):
            doc, version = self._get(name)
            new = change(doc)
            try:
                self.storage.put(self._key(name), _dumps(new), if_version=version, if_absent=version is None)
                return new
            except DocumentConflictError:
                _backoff(attempt)
        raise RegistryError(f"{name!r} kept changing under {_CAS_TRIES} attempts to update it; try again")

    def _relative(self, checkpoint: str | os.PathLike[str]) -> str:
        if isinstance(self.root, str):
            return self._relative_key(os.fspath(checkpoint), self.root)
        # Resolved, not lexical: ROOT/../elsewhere and a symlink out of the root are outside it.
        path = Path(checkpoint).resolve()
        try:
            rel = path.relative_to(self.root.resolve())
        except ValueError:
            raise RegistryError(f"{path} is not under the registry's root {self.root}") from None
        return rel.as_posix()

    def _relative_key(self, checkpoint: str, root: str) -> str:
        """``checkpoint``'s key relative to the URL root: it must be a URL strictly below it, in the
        same bucket (an object store has no links, and a key never climbs with ``..``)."""
        outside = RegistryError(f"{checkpoint} is not under the registry's root {root}")
        if not is_url(checkpoint):
            raise outside
        try:
            key = self.storage.join(checkpoint)  # normalised; another bucket or a ".." raises
        except StorageError:
            raise outside from None
        prefix = root.rstrip("/") + "/"
        if not key.startswith(prefix) or len(key) == len(prefix):
            raise outside
        return key[len(prefix) :]

    def _location(self, rel: str) -> Path | str:
        """Where the checkpoint at ``rel`` (relative to the root, ``/``-separated) is: a path or a URL."""
        if isinstance(self.root, Path):
            return self.root / rel
        return self.storage.join(self.root, *rel.split("/"))

    def _run_of(self, rel: str) -> str:
        """The location of the run holding the checkpoint at ``rel``."""
        return split_location(self._location(rel))[0]

    def _manifest(self, rel: str) -> Manifest:
        """The manifest of the checkpoint at ``rel`` (CheckpointNotFoundError if there is none)."""
        return read_manifest(self.storage, str(self._location(rel)))[0]

    # -- changes -----------------------------------------------------------------------------------
    @typed_os_errors
    def register(
        self,
        name: str,
        checkpoint: str | os.PathLike[str],
        *,
        alias: str | None = None,
        note: str | None = None,
    ) -> dict[str, Any]:
        """Registers ``checkpoint`` as the next version of ``name`` (and pins it); returns the version."""
        rel = self._relative(checkpoint)
        if alias is not None:
            _check_alias(alias)  # before anything is written: a refused registration pins nothing
        manifest = self._manifest(rel)
        self._key(name)  # a bad name is refused before anything is written
        self._recover(rel)
        for attempt in range(_CAS_TRIES):
            found, version = self._get(name)
            doc: dict[str, Any] = found or {"name": name, "versions": [], "aliases": {}, "history": []}
            number = len(doc["versions"]) + 1
            entry: dict[str, Any] = {
                "version": number,
                "checkpoint": rel,
                "checkpoint_id": manifest.checkpoint_id,
                "step": manifest.step,
                "registered_at": _now(),
                "note": note,
                **_who(),
            }
            doc["versions"].append(entry)
            self._pin(rel, name, number)  # pinned before the version exists: never an unpinned one
            if alias is not None:
                self._move(doc, alias, number, f"registered version {number}")
            try:
                self.storage.put(self._key(name), _dumps(doc), if_version=version, if_absent=version is None)
                break
            except DocumentConflictError:
                self._unpin_if_lost(rel, name, number)
                _backoff(attempt)
        else:
            raise RegistryError(f"{name!r} kept changing under {_CAS_TRIES} attempts to register; try again")
        self._notify(name, number, doc)
        return entry

    @typed_os_errors
    def alias(self, name: str, version: int, alias: str, *, why: str | None = None) -> None:
        """Points ``alias`` at ``version`` of ``name`` (recorded in the history)."""

        def move(doc: dict[str, Any] | None) -> dict[str, Any]:
            if doc is None:
                raise RegistryError(f"no registered model {name!r} under {self.root}")
            self._version(doc, version)
            self._move(doc, alias, version, why)
            return doc

        self._recover(None)
        self._notify(name, version, self._update(name, move))

    def _recover(self, rel: str | None) -> None:
        """Removes what registry writers killed mid-write left (their temporary documents) in the
        registry and, when registering ``rel``, beside its run's pin marker; live writes are safe."""
        self.storage.recover(str(self.directory))
        if rel is not None:
            self.storage.recover(self._run_of(rel))

    def _move(self, doc: dict[str, Any], alias: str, version: int, why: str | None) -> None:
        _check_alias(alias)
        previous = doc["aliases"].get(alias)
        doc["aliases"][alias] = version
        doc["history"].append(
            {"when": _now(), "alias": alias, "from": previous, "to": version, "why": why, **_who()}
        )

    def _marker(self, rel: str) -> str:
        """The key of the pin marker of the run holding the checkpoint at ``rel``."""
        return RunDirectory(self._run_of(rel), self.storage).key(REGISTERED_NAME)

    def _change_pins(self, rel: str, change: Callable[[list[Any]], bool]) -> None:
        """Applies ``change`` to the checkpoint's list of ``[model, version]`` references in its
        run's pin marker, by compare-and-swap; ``change`` returns False when there is nothing to
        write. A damaged marker is rebuilt from this registry's versions."""
        key, checkpoint = self._marker(rel), PurePosixPath(rel)
        for attempt in range(_CAS_TRIES):
            found = self.storage.get(key, max_bytes=MAX_DOCUMENT_BYTES)
            try:
                doc = json.loads(found.data) if found is not None else {}
            except ValueError:
                doc = self._pins_from_versions(checkpoint.parent)  # damaged: every version names its pin
            if not isinstance(doc, dict) or not isinstance(doc.get("checkpoints", {}), dict):
                doc = self._pins_from_versions(checkpoint.parent)
            refs = doc.setdefault("checkpoints", {}).setdefault(checkpoint.name, [])
            if not isinstance(refs, list):
                refs = doc["checkpoints"][checkpoint.name] = []
            if not change(refs):
                return
            version = found.version if found is not None else None
            try:
                self.storage.put(key, _dumps(doc), if_version=version, if_absent=version is None)
                return
            except DocumentConflictError:
                _backoff(attempt)
        raise RegistryError(f"{key} kept changing under {_CAS_TRIES} attempts to update it; try again")

    def _pin(self, rel: str, name: str, version: int) -> None:
        def add(refs: list[Any]) -> bool:
            if [name, version] not in refs:
                refs.append([name, version])
            return True  # written even when present: the marker may be being rebuilt

        self._change_pins(rel, add)

    def _unpin_if_lost(self, rel: str, name: str, version: int) -> None:
        """After a lost race to write version ``version`` of ``name``: the pin added for it goes
        unless that version, as written by the winner, is this same checkpoint (versions are only
        ever appended, so what the winner wrote there stays)."""
        doc, _ = self._get(name)
        if doc is not None and any(
            v.get("version") == version and v.get("checkpoint") == rel
            for v in doc["versions"]
            if isinstance(v, dict)
        ):
            return

        def drop(refs: list[Any]) -> bool:
            if [name, version] not in refs:
                return False
            refs.remove([name, version])
            return True

        self._change_pins(rel, drop)

    def _pins_from_versions(self, run_dir: PurePosixPath) -> dict[str, Any]:
        """The pin list of ``run_dir`` (relative to the root) rebuilt from this registry's versions
        (a damaged pin file must not lose the pins of the other registered checkpoints)."""
        entries: dict[str, list[list[Any]]] = {}
        for name in self.names():
            try:
                doc = self._load(name)
            except RegistryError:
                continue
            for version in doc["versions"]:
                path = PurePosixPath(str(version.get("checkpoint", "")))
                if path.name and path.parent == run_dir:
                    entries.setdefault(path.name, []).append([name, version.get("version")])
        return {"checkpoints": entries}

    def _notify(self, name: str, version: int, doc: dict[str, Any]) -> None:
        if not self.trackers:
            return
        entry = self._version(doc, version)
        aliases = sorted(a for a, v in doc["aliases"].items() if v == version)
        for tracker in self.trackers:
            try:  # the registry change is made; a tracker failing to mirror it is a warning
                tracker.on_register(name, version, str(self._location(entry["checkpoint"])), aliases)
            except Exception as exc:
                warnings.warn(
                    f"tracker {type(tracker).__name__} failed to mirror {name} v{version}: {exc}",
                    stacklevel=3,
                )

    # -- reading -----------------------------------------------------------------------------------
    def _version(self, doc: dict[str, Any], version: int) -> dict[str, Any]:
        for entry in doc["versions"]:
            if entry.get("version") == version:
                return dict(entry)
        raise RegistryError(f"{doc.get('name')!r} has no version {version}")

    @typed_os_errors
    def names(self) -> list[str]:
        # The storage is rooted at the registry's root: a linked directory on the way is refused.
        entries = self.storage.list(str(self.directory))
        stems = (
            e.name[: -len(".json")] for e in entries if e.kind == "document" and e.name.endswith(".json")
        )
        return sorted(stem for stem in stems if _NAME.fullmatch(stem))

    @typed_os_errors
    def show(self, name: str) -> dict[str, Any]:
        return self._load(name)

    @typed_os_errors
    def history(self, name: str) -> list[dict[str, Any]]:
        return list(self._load(name)["history"])

    @typed_os_errors
    def resolve(self, name: str, ref: str | None = None) -> Path | str:
        """The checkpoint a version number, an alias or (None) the newest version names."""
        doc = self._load(name)
        if not doc["versions"]:
            raise RegistryError(f"{name!r} has no versions")
        if ref is None or (ref == "latest" and "latest" not in doc["aliases"]):
            entry = doc["versions"][-1]
        elif re.fullmatch(r"[0-9]+", ref):
            entry = self._version(doc, int(ref))
        elif ref in doc["aliases"]:
            entry = self._version(doc, int(doc["aliases"][ref]))
        else:
            raise RegistryError(f"{name!r} has no alias {ref!r} (aliases: {sorted(doc['aliases'])})")
        return self._checked_path(name, entry)

    def _checked_path(self, name: str, entry: dict[str, Any]) -> Path | str:
        """The path (or URL) of a version, after checking it is inside the root and still holds the
        checkpoint registered (same checkpoint id): the registry file is untrusted input, and a
        path may have been overwritten by another checkpoint since."""
        label = f"{name!r} version {entry.get('version')}"
        rel, pinned = entry.get("checkpoint"), entry.get("checkpoint_id")
        if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise RegistryError(f"{label}: path {str(rel)[:200]!r} is not inside the root {self.root}")
        path = self._location(rel)  # under a URL root: joined part by part, no ".": never outside it
        if isinstance(self.root, Path) and not Path(path).resolve().is_relative_to(self.root.resolve()):
            raise RegistryError(f"{label}: {rel!r} resolves outside the root {self.root}")
        if not isinstance(pinned, str) or not pinned:
            raise RegistryError(f"{label}: the entry records no checkpoint id; register the checkpoint again")
        try:
            manifest = self._manifest(rel)
        except (CheckpointNotFoundError, FileNotFoundError, NotADirectoryError):
            raise CheckpointNotFoundError(f"{label}: {path} no longer holds a checkpoint") from None
        if manifest.checkpoint_id != pinned:
            raise ReplacedCheckpointError(
                f"{label}: {path} now holds checkpoint {manifest.checkpoint_id}, not the registered "
                f"{pinned}; it was overwritten since it was registered"
            )
        return path


def _check_alias(alias: str) -> None:
    if not isinstance(alias, str) or not _NAME.fullmatch(alias) or re.fullmatch(r"[0-9]+", alias):
        raise RegistryError(f"bad alias {str(alias)[:80]!r}: letters, digits, '.', '_', '-', not only digits")


def resolve_reference(reference: str, root: str | os.PathLike[str] | None = None) -> Path | str:
    """``registry://NAME[@VERSION|@ALIAS]`` -> the checkpoint's path (a URL under a URL root)."""
    body = reference[len(SCHEME) :]
    name, _, ref = body.partition("@")
    return Registry(root).resolve(name, ref or None)
