"""The model registry: named models, numbered versions pointing at checkpoints, movable aliases.

``ROOT/.ckptvault/registry/<name>.json`` holds one model: its versions (checkpoint path relative
to the root, checkpoint id, when, by whom), its aliases (``production``, ``staging``, any name ->
version) and the history of every alias move (when, from, to, why, host, user). Writes take an
exclusive ``flock`` on ``registry/.lock`` and replace the file atomically, so concurrent commands
never lose an update. A registered checkpoint is pinned: the registry lists it in its run's
``.ckptvault-registered.json``, which retention reads before deleting anything.

References: ``registry://NAME`` (newest version), ``registry://NAME@3`` (version 3),
``registry://NAME@production`` (an alias); :func:`resolve_reference` turns one into a path.

A registry's files are untrusted input like any run directory (docs/security.md): its directories
and files are opened without following symlinks or blocking on FIFOs (``storage.safeopen``), a
version whose path leaves the root is refused, and a version pins its checkpoint id -- resolving it
when its path now holds another checkpoint raises :class:`ReplacedCheckpointError`.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import re
import socket
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..config import MANIFEST_NAME
from ..errors import CheckpointError, CheckpointNotFoundError, typed_os_errors
from ..storage.safeopen import atomic_write_json, check_dir, open_dir, open_file, read_file
from .store import CATALOG_DIR, read_manifest

REGISTRY_DIR = "registry"
REGISTERED_NAME = ".ckptvault-registered.json"
SCHEME = "registry://"
ROOT_ENV = "CKPTVAULT_ROOT"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RegistryError(CheckpointError):
    """A registry operation is impossible: unknown model/version/alias, bad name, foreign path."""


class ReplacedCheckpointError(RegistryError):
    """A registered version's path now holds another checkpoint than the one registered."""


def default_root() -> Path:
    """``CKPTVAULT_ROOT`` if set, else the current directory (the CLI's ``--root`` overrides)."""
    return Path(os.environ.get(ROOT_ENV) or os.getcwd())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _who() -> dict[str, str]:
    try:
        user = getpass.getuser()
    except Exception:  # no user database entry (containers): not worth failing a registration
        user = str(os.getuid())
    return {"host": socket.gethostname(), "user": user}


@typed_os_errors
def registered_in(run_dir: Path) -> set[str]:
    """Names of the checkpoints of ``run_dir`` that a registry pins (read by retention).

    Only a missing file means "nothing pinned": an unreadable or damaged one raises
    (``StorageError`` / ``RegistryError``), because retention taking it for "no pins" would
    delete registered checkpoints."""
    try:
        text = read_file(run_dir / REGISTERED_NAME)
    except FileNotFoundError:
        return set()
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise RegistryError(f"{run_dir / REGISTERED_NAME} is damaged: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("checkpoints", {}), dict):
        raise RegistryError(f"{run_dir / REGISTERED_NAME} is damaged: not a pin list")
    entries = doc.get("checkpoints", {})
    return {name for name, refs in entries.items() if isinstance(name, str) and refs}


class Registry:
    """The registry of a root. ``trackers`` get ``on_register`` calls (e.g. MLflow's registry)."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *, trackers: Sequence[Any] = ()) -> None:
        self.root = Path(root).absolute() if root is not None else default_root().absolute()
        self.directory = self.root / CATALOG_DIR / REGISTRY_DIR
        self.trackers = list(trackers)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        dir_fd = open_dir(self.root, Path(CATALOG_DIR, REGISTRY_DIR), create=True)
        try:
            fd = open_file(".lock", os.O_RDWR | os.O_CREAT, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _file(self, name: str) -> Path:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise RegistryError(
                f"bad model name {str(name)[:80]!r}: letters, digits, '.', '_', '-' (max 128)"
            )
        return self.directory / f"{name}.json"

    def _load(self, name: str) -> dict[str, Any]:
        path = self._file(name)
        try:
            dir_fd = open_dir(self.root, Path(CATALOG_DIR, REGISTRY_DIR))
            try:
                doc = json.loads(read_file(path.name, dir_fd=dir_fd))
            finally:
                os.close(dir_fd)
        except FileNotFoundError:
            raise RegistryError(f"no registered model {name!r} under {self.root}") from None
        except ValueError as exc:
            raise RegistryError(f"registry file of {name!r} is damaged: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("versions"), list):
            raise RegistryError(f"registry file of {name!r} is damaged")
        return doc

    def _relative(self, checkpoint: str | os.PathLike[str]) -> str:
        # Resolved, not lexical: ROOT/../elsewhere and a symlink out of the root are outside it.
        path = Path(checkpoint).resolve()
        try:
            rel = path.relative_to(self.root.resolve())
        except ValueError:
            raise RegistryError(f"{path} is not under the registry's root {self.root}") from None
        if not (path / MANIFEST_NAME).is_file():
            raise CheckpointNotFoundError(f"{path}: not a committed checkpoint")
        return rel.as_posix()

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
        manifest, _ = read_manifest(self.root / rel)
        with self._locked():
            path = self._file(name)
            try:
                doc = self._load(name)
            except RegistryError:
                if path.exists():
                    raise
                doc = {"name": name, "versions": [], "aliases": {}, "history": []}
            number = len(doc["versions"]) + 1
            version: dict[str, Any] = {
                "version": number,
                "checkpoint": rel,
                "checkpoint_id": manifest.checkpoint_id,
                "step": manifest.step,
                "registered_at": _now(),
                "note": note,
                **_who(),
            }
            doc["versions"].append(version)
            self._pin(rel, name, number)
            if alias is not None:
                self._move(doc, alias, number, f"registered version {number}")
            atomic_write_json(path, doc, sort_keys=True, sweep=True, base=self.root)
        self._notify(name, number, doc)
        return version

    @typed_os_errors
    def alias(self, name: str, version: int, alias: str, *, why: str | None = None) -> None:
        """Points ``alias`` at ``version`` of ``name`` (recorded in the history)."""
        with self._locked():
            doc = self._load(name)
            self._version(doc, version)
            self._move(doc, alias, version, why)
            atomic_write_json(self._file(name), doc, sort_keys=True, sweep=True, base=self.root)
        self._notify(name, version, doc)

    def _move(self, doc: dict[str, Any], alias: str, version: int, why: str | None) -> None:
        _check_alias(alias)
        previous = doc["aliases"].get(alias)
        doc["aliases"][alias] = version
        doc["history"].append(
            {"when": _now(), "alias": alias, "from": previous, "to": version, "why": why, **_who()}
        )

    def _pin(self, rel: str, name: str, version: int) -> None:
        checkpoint = self.root / rel
        marker = checkpoint.parent / REGISTERED_NAME
        try:
            dir_fd = open_dir(self.root, Path(rel).parent)
            try:
                doc = json.loads(read_file(REGISTERED_NAME, dir_fd=dir_fd))
            finally:
                os.close(dir_fd)
        except FileNotFoundError:
            doc = {}
        except ValueError:
            doc = self._pins_from_versions(checkpoint.parent)  # damaged: every version names its pin
        if not isinstance(doc, dict) or not isinstance(doc.get("checkpoints", {}), dict):
            doc = self._pins_from_versions(checkpoint.parent)
        entries = doc.setdefault("checkpoints", {})
        refs = entries.setdefault(checkpoint.name, [])
        if [name, version] not in refs:
            refs.append([name, version])
        atomic_write_json(marker, doc, sort_keys=True, sweep=True, base=self.root)

    def _pins_from_versions(self, run_dir: Path) -> dict[str, Any]:
        """The pin list of ``run_dir`` rebuilt from this registry's versions (a damaged pin file
        must not lose the pins of the other registered checkpoints)."""
        entries: dict[str, list[list[Any]]] = {}
        for name in self.names():
            try:
                doc = self._load(name)
            except RegistryError:
                continue
            for version in doc["versions"]:
                path = self.root / str(version.get("checkpoint", ""))
                if path.parent == run_dir:
                    entries.setdefault(path.name, []).append([name, version.get("version")])
        return {"checkpoints": entries}

    def _notify(self, name: str, version: int, doc: dict[str, Any]) -> None:
        if not self.trackers:
            return
        entry = self._version(doc, version)
        aliases = sorted(a for a, v in doc["aliases"].items() if v == version)
        for tracker in self.trackers:
            try:  # the registry change is made; a tracker failing to mirror it is a warning
                tracker.on_register(name, version, str(self.root / entry["checkpoint"]), aliases)
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
        if not check_dir(self.root, Path(CATALOG_DIR, REGISTRY_DIR)):
            return []
        stems = (n[: -len(".json")] for n in os.listdir(self.directory) if n.endswith(".json"))
        return sorted(stem for stem in stems if _NAME.fullmatch(stem))

    @typed_os_errors
    def show(self, name: str) -> dict[str, Any]:
        return self._load(name)

    @typed_os_errors
    def history(self, name: str) -> list[dict[str, Any]]:
        return list(self._load(name)["history"])

    @typed_os_errors
    def resolve(self, name: str, ref: str | None = None) -> Path:
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

    def _checked_path(self, name: str, entry: dict[str, Any]) -> Path:
        """The path of a version, after checking it is inside the root and still holds the
        checkpoint registered (same checkpoint id): the registry file is untrusted input, and a
        path may have been overwritten by another checkpoint since."""
        label = f"{name!r} version {entry.get('version')}"
        rel, pinned = entry.get("checkpoint"), entry.get("checkpoint_id")
        if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise RegistryError(f"{label}: path {str(rel)[:200]!r} is not inside the root {self.root}")
        path = self.root / rel
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise RegistryError(f"{label}: {rel!r} resolves outside the root {self.root}")
        if not isinstance(pinned, str) or not pinned:
            raise RegistryError(f"{label}: the entry records no checkpoint id; register the checkpoint again")
        try:
            manifest, _ = read_manifest(path)
        except (FileNotFoundError, NotADirectoryError):
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


def resolve_reference(reference: str, root: str | os.PathLike[str] | None = None) -> Path:
    """``registry://NAME[@VERSION|@ALIAS]`` -> the checkpoint's path."""
    body = reference[len(SCHEME) :]
    name, _, ref = body.partition("@")
    return Registry(root).resolve(name, ref or None)
