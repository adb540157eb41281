"""Verification: every check a load makes, on every byte, reporting each problem instead of
stopping at the first (``ckptvault verify``, validation, restore's fallback).

Memory stays one block whatever the checkpoint's size: data-file tensors are hashed as they stream
past, each chunk a manifest repeats is read once, sidecars are hashed in bounded reads. A sharded
tensor needs nothing of its own here: its pieces are stored tensors, checked like any other, and
the manifest's parse already proved that they tile it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..config import MANIFEST_NAME
from ..errors import CheckpointError, CorruptCheckpointError, ResourceLimitError
from ..format.digest import data_file_digest
from ..storage.base import Storage
from ..types import Problem, TensorEntry, VerifyReport
from .consistency import sidecar_problems
from .leaves import LeafChecker, leaf_nbytes_check, stored_nbytes_of
from .reader import CheckpointReader, check_whole_file_digest
from .streams import iter_stored_bytes, verify_chunked


def verify_checkpoint(
    storage: Storage, path: str, *, progress: Callable[[int], None] | None = None
) -> VerifyReport:
    """Checks everything and reports every problem; never raises for a bad checkpoint.

    ``progress`` is called with the number of bytes each checked file added (for progress bars).
    """
    started = time.perf_counter()
    problems: list[Problem] = []
    files_checked = tensors_checked = bytes_checked = 0

    def note(exc: CheckpointError, kind: str) -> None:
        problems.append(Problem(kind, str(exc), getattr(exc, "file", None), getattr(exc, "tensor", None)))

    try:
        reader = CheckpointReader(storage, path)
    except CheckpointError as exc:
        note(exc, _kind(exc))
        return VerifyReport(path, tuple(problems), 0, 0, 0, time.perf_counter() - started)
    with reader:
        manifest = reader.manifest
        present = set(reader.handle.file_names())
        for name in sorted(set(manifest.files) - present):
            problems.append(Problem("missing-file", "file listed in the manifest is missing", name))
        for name in sorted(present - set(manifest.files) - {MANIFEST_NAME}):
            problems.append(Problem("extra-file", "unexpected file not listed in the manifest", name))
        for name, entry in manifest.files.items():
            if name not in present:
                continue
            files_checked += 1
            try:
                reader.check_size(name)
                if entry.header_size is None:
                    check_whole_file_digest(reader, name)
                else:
                    reader.header(name)
            except CheckpointError as exc:
                note(exc, _kind(exc))
                continue
            if entry.header_size is not None:
                clean = True
                for tensor in reader.tensors_in(name):
                    tensors_checked += 1
                    try:
                        _check_streamed(reader, tensor)
                    except CheckpointError as exc:
                        clean = False
                        note(exc, _kind(exc))
                    if progress is not None:
                        progress(tensor.nbytes)
                if clean and not _data_digest_consistent(reader, name):
                    problems.append(Problem("digest-mismatch", "file digest disagrees with its parts", name))
            bytes_checked += entry.size
        checked: dict[tuple[str, str, int, int], CorruptCheckpointError | None] = {}
        for tensor in manifest.tensors.values():
            if tensor.chunks is None:
                continue
            tensors_checked += 1
            try:
                verify_chunked(reader.store, tensor, algorithm=reader.algorithm, where=path, checked=checked)
            except CheckpointError as exc:
                note(exc, _kind(exc))
            bytes_checked += sum(c.stored_len for c in tensor.chunks)
            if progress is not None:
                progress(tensor.nbytes)
        if not problems:
            try:
                metadata = reader.decode_metadata()
                problems += sidecar_problems(manifest.step, set(manifest.files), reader.read_file, metadata)
                # What a default load would refuse, verify reports (no bytes read for it).
                limit = reader.budget(None).limit
                leaf_nbytes_check(manifest.tensor_bytes, limit, "loading this checkpoint's tensors")
                reader.decode_tree(LeafChecker(stored_nbytes_of(manifest), limit))
            except CheckpointError as exc:
                note(exc, _kind(exc))
    return VerifyReport(
        path, tuple(problems), files_checked, tensors_checked, bytes_checked, time.perf_counter() - started
    )


def _check_streamed(reader: CheckpointReader, tensor: TensorEntry) -> None:
    """A data-file tensor's digest, read in blocks: memory stays one block whatever its size."""
    for _ in iter_stored_bytes(reader, tensor):
        pass


def _data_digest_consistent(reader: CheckpointReader, name: str) -> bool:
    """The recorded file digest equals the one combined from its (verified) header and tensors."""
    manifest = reader.manifest
    entry = manifest.files[name]
    parts = reader.tensors_in(name)
    combined = data_file_digest(
        manifest.digest_algorithm, entry.size, str(entry.header_digest), [t.digest for t in parts]
    )
    return combined == entry.digest


def _kind(exc: CheckpointError) -> str:
    if isinstance(exc, ResourceLimitError):
        return "resource-limit"
    return exc.kind if isinstance(exc, CorruptCheckpointError) else type(exc).__name__
