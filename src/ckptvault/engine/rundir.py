"""L2: a run's layout -- the one place that knows what lives in a run and under which name.

The manager, the catalog, reports, the CLI and validation learn about a run only through
:class:`RunDirectory`, and it speaks only the :class:`~ckptvault.storage.base.Storage` protocol, so
a run on an object store is the same class over another backend. docs/format.md ("Run layout")
is the normative description::

    run.json                      run id, config, provenance, retention settings in force
    pins.json                     {"steps": [...]}: steps the user pinned (never deleted)
    .ckptvault-index.json         derived records + trigger states (rebuilt from manifests if lost)
    .ckptvault-events.jsonl       append-only log of commits and deletions (plots, reports)
    .ckptvault-run.lock           the writer's lease
    .ckptvault-registered.json    checkpoints a registry version points at (written by the registry)
    .ckptvault-validation/N.json  the validation result of checkpoint N
    .ckptvault-store/             the chunk store (incremental / compressed checkpoints)
    step_00001200/                full-scope checkpoint after step 1200
    weights_00001200/             weights-only checkpoint

Every file here is untrusted input (docs/security.md): documents are read with a byte cap, damaged
ones are reported as typed errors or treated as absent where absence is the safe reading (the
index), and no key is built from a name that did not parse.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointError, StorageError
from ..storage.base import Entry, Lease, Storage
from ..storage.resolve import storage_for

RUN_NAME = "run.json"
PINS_NAME = "pins.json"
INDEX_NAME = ".ckptvault-index.json"
EVENTS_NAME = ".ckptvault-events.jsonl"
LEASE_NAME = ".ckptvault-run.lock"
REGISTERED_NAME = ".ckptvault-registered.json"
VALIDATION_DIR = ".ckptvault-validation"
STORE_NAME = ".ckptvault-store"
PREFIXES = {"full": "step", "weights": "weights"}  # scope -> checkpoint name prefix
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024  # no run document comes near this; a larger one is hostile
MAX_EVENT_LINE = 1 << 20  # an event is a few hundred bytes; a longer line is damage, never allocated
_NAME = re.compile(r"^(step|weights)_([0-9]{1,19})$")


class DamagedRunFileError(CheckpointError):
    """A run document (run.json, pins.json) exists but cannot be parsed: the caller must not act
    as if it were absent (taking damaged pins for "no pins" would let retention delete them)."""


def checkpoint_name(scope: str, step: int) -> str:
    return f"{PREFIXES[scope]}_{step:08d}"


def parse_name(name: str) -> tuple[str, int] | None:
    """``(scope, step)`` of a checkpoint name this library writes, None for anything else."""
    match = _NAME.match(name)
    if match is None:
        return None
    scope = "full" if match.group(1) == "step" else "weights"
    return scope, int(match.group(2))


def dumps(doc: Any, *, compact: bool = False) -> bytes:
    """A run document's bytes, as this library has always written them (``default=str``)."""
    return json.dumps(
        doc, indent=None if compact else 1, separators=(",", ":") if compact else None, default=str
    ).encode("utf-8")


class RunDirectory:
    """One run: its documents, events, lease, validation results and checkpoints, by name.

    ``storage`` defaults to the local backend rooted at the run (below it no link is followed).
    Not thread-safe; the manager uses it from the training loop's thread and its validation
    results are written by the validator through their own ``RunDirectory``.
    """

    def __init__(self, path: str | os.PathLike[str], storage: Storage | None = None) -> None:
        self.path = os.fspath(path)
        self.storage: Storage = storage if storage is not None else storage_for(self.path, rooted=True)[0]

    def __repr__(self) -> str:
        return f"RunDirectory({self.path!r})"

    def key(self, *names: str) -> str:
        return self.storage.join(self.path, *names)

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoint(self, name: str) -> str:
        """The key of checkpoint ``name`` (which must be a name this library writes)."""
        if parse_name(name) is None:
            raise ValueError(f"{name[:80]!r} is not a checkpoint name of a run")
        return self.key(name)

    def checkpoints(self) -> list[Entry]:
        """The committed checkpoints whose names this library writes, by name."""
        return [e for e in self.storage.list(self.path) if e.kind == "checkpoint" and parse_name(e.name)]

    def checkpoint_dirs(self) -> list[Entry]:
        """Checkpoint-named entries, committed or not (a directory without a valid manifest is
        still a name retention must account for, as corrupt)."""
        return [e for e in self.storage.list(self.path) if e.kind != "document" and parse_name(e.name)]

    def delete_checkpoint(self, name: str) -> bool:
        return self.storage.delete(self.checkpoint(name))

    def change_token(self) -> str | None:
        return self.storage.change_token(self.path)

    def exists(self) -> bool:
        return self.change_token() is not None

    # -- ownership --------------------------------------------------------------------------------
    def acquire(self, *, ttl_seconds: float = 300.0) -> Lease:
        """The run's writer lease (ConcurrentWriteError naming the holder when taken); with it
        held, leftovers of writers killed mid-write are removed."""
        owner = f"pid {os.getpid()} on {socket.gethostname()}"
        lease = self.storage.acquire_lease(self.key(LEASE_NAME), owner=owner, ttl_seconds=ttl_seconds)
        try:
            self.storage.recover(self.path)
        except BaseException:
            lease.release()
            raise
        return lease

    # -- documents --------------------------------------------------------------------------------
    def _read_json(self, name: str) -> Any:
        """The parsed document, None when absent; DamagedRunFileError when unparseable."""
        doc = self.storage.get(self.key(name), max_bytes=MAX_DOCUMENT_BYTES)
        if doc is None:
            return None
        try:
            return json.loads(doc.data)
        except ValueError as exc:
            raise DamagedRunFileError(f"{self.key(name)} is damaged ({exc})") from exc

    def read_run(self) -> dict[str, Any] | None:
        doc = self._read_json(RUN_NAME)
        if doc is not None and not isinstance(doc, dict):
            raise DamagedRunFileError(f"{self.key(RUN_NAME)} is damaged (not an object)")
        return doc

    def read_run_or_empty(self) -> dict[str, Any]:
        """run.json for display (catalog, reports): missing, damaged or hostile reads as empty."""
        try:
            return self.read_run() or {}
        except (CheckpointError, OSError):
            return {}

    def write_run(self, doc: Mapping[str, Any]) -> None:
        self.storage.put(self.key(RUN_NAME), dumps(doc))

    def read_index(self) -> dict[str, Any]:
        """The derived index, or an empty one when missing or damaged (it is rebuilt)."""
        try:
            doc = self._read_json(INDEX_NAME)
        except (CheckpointError, OSError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def write_index(self, doc: Mapping[str, Any]) -> None:
        self.storage.put(self.key(INDEX_NAME), dumps(doc, compact=True), durable=False)

    def read_pins(self) -> set[int]:
        """The pinned steps. Only a missing file means none: an unreadable one raises StorageError,
        a damaged one DamagedRunFileError -- taking either for "no pins" would let retention delete
        them."""
        try:
            doc = self._read_json(PINS_NAME)
        except DamagedRunFileError as exc:
            raise DamagedRunFileError(f"{exc}; retention is off until it is fixed") from exc
        if doc is None:
            return set()
        if not isinstance(doc, dict) or not isinstance(doc.get("steps", []), list):
            raise DamagedRunFileError(
                f"{self.key(PINS_NAME)} is damaged (not a list of steps); retention is off until it is fixed"
            )
        return {int(p) for p in doc.get("steps", []) if isinstance(p, int) and not isinstance(p, bool)}

    def write_pins(self, steps: set[int]) -> None:
        self.storage.put(self.key(PINS_NAME), dumps({"steps": sorted(steps)}))

    def read_registered(self) -> Any:
        """The registry's pin marker of this run (its format is the registry's), None if absent."""
        return self._read_json(REGISTERED_NAME)

    # -- events -----------------------------------------------------------------------------------
    def append_event(self, doc: Mapping[str, Any]) -> None:
        """One line of the event log. Informative only (plots, reports): a lost line costs a mark
        on a picture, so a failure to append is swallowed and no flush is asked for."""
        line = json.dumps(dict(doc), default=str).encode("utf-8") + b"\n"
        with contextlib.suppress(OSError):
            self.storage.append(self.key(EVENTS_NAME), line)

    def read_events(self) -> list[dict[str, Any]]:
        """The event log, oldest first; lines that are not UTF-8 JSON objects, or longer than any
        event, are skipped (read in bounded pieces, never whole), not a failure."""
        events: list[dict[str, Any]] = []
        try:
            for line in self.storage.read_lines(self.key(EVENTS_NAME), max_line=MAX_EVENT_LINE):
                try:
                    doc = json.loads(line.decode("utf-8"))
                except ValueError:  # UnicodeDecodeError and JSONDecodeError included
                    continue
                if isinstance(doc, dict):
                    events.append(doc)
        except OSError:
            pass
        return events

    # -- validation results ---------------------------------------------------------------------------
    def validation_key(self, name: str) -> str:
        if name in ("", ".", "..") or "/" in name or "\0" in name or os.sep in name:
            raise ValueError(f"{name[:80]!r} cannot name a validation result (not a directory name)")
        return self.key(VALIDATION_DIR, f"{name}.json")

    def read_validation(self, name: str) -> dict[str, Any] | None:
        """The recorded result for checkpoint ``name``; None when absent, damaged or hostile."""
        try:
            doc = self.storage.get(self.validation_key(name), max_bytes=MAX_DOCUMENT_BYTES)
            parsed = json.loads(doc.data) if doc is not None else None
        except (OSError, ValueError, CheckpointError):
            return None
        return parsed if isinstance(parsed, dict) else None

    def write_validation(self, name: str, result: Mapping[str, Any]) -> None:
        """Not flushed: a result lost in a crash is only a validation to repeat."""
        self.storage.put(self.validation_key(name), dumps(result), durable=False)

    def remove_validation(self, name: str) -> None:
        try:
            self.storage.remove(self.validation_key(name))
        except StorageError as exc:
            if exc.errno != errno.ENOENT:
                raise
