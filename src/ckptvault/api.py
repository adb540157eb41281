"""L3: the functional API — ``save``, ``save_async``, ``load``, ``open``, ``verify``, ``info``.

These are the contract every higher layer (the manager, the CLI) is built on; they choose the
storage backend from the path and hand work to the engine.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import TYPE_CHECKING, Any

from .catalog import registry
from .config import Settings
from .engine.background import BackgroundWriter, PendingSave, SaveRequest
from .engine.checkpoint_info import info_from_manifest as info_from_manifest  # its old home
from .engine.chunks import MIN_CHUNKED_BYTES, ChunkOptions, HintCache
from .engine.lazy import CheckpointView
from .engine.loading import read_checkpoint
from .engine.reader import CheckpointReader
from .engine.staging import StagingBuffer
from .engine.verify import verify_checkpoint
from .errors import CheckpointNotFoundError, UnsafeCheckpointError
from .storage.base import Storage
from .storage.resolve import storage_for as storage_for_location
from .types import CheckpointInfo, VerifyReport

if TYPE_CHECKING:
    from .validation import ValidationResult

# ``validation`` (the rebuild-in-a-subprocess machinery) is imported inside the functions that need
# it, never at import time: ``import ckptvault.api`` stays cheap and validation sits beside api in
# the layers, not below it.

PathLike = str | os.PathLike[str]


def storage_for(path: PathLike) -> tuple[Storage, str]:
    """The backend that owns ``path`` and the path in that backend's terms.

    ``registry://NAME@ALIAS`` (or ``@VERSION``, or no ``@`` for the newest version) is resolved in
    the registry of ``CKPTVAULT_ROOT`` (else the current directory) first; the location it names,
    like any other, goes to the storage layer's resolver (:mod:`ckptvault.storage.resolve`).
    """
    text = os.fspath(path)
    if text.startswith(registry.SCHEME):
        text = os.fspath(registry.resolve_reference(text))
    return storage_for_location(text)


def chunk_options(incremental: bool, compression: str | None, chunk_bytes: int | None) -> ChunkOptions | None:
    """How a save chunks large tensors; None for a plain self-contained checkpoint."""
    if not incremental and compression is None:
        return None
    if chunk_bytes is None:
        return ChunkOptions(compression=compression)
    return ChunkOptions(chunk_bytes, min(MIN_CHUNKED_BYTES, chunk_bytes // 4), compression)


def save_request(
    path: PathLike,
    *,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    digest: str | None = None,
    incremental: bool = False,
    compression: str | None = None,
    chunk_bytes: int | None = None,
    hints: HintCache | None = None,
    validate: str = "checksum",
    extra_files: dict[str, bytes] | None = None,
    storage: Storage | None = None,
) -> SaveRequest:
    """The :class:`~ckptvault.engine.background.SaveRequest` :func:`save`, :func:`save_async` and the
    manager run: where their options become a save (``storage``: ``path`` is in its terms)."""
    from .validation import check_level

    check_level(validate)
    if storage is None:
        storage, target = storage_for(path)
    else:
        target = os.fspath(path)
    return SaveRequest(
        storage,
        target,
        metadata=metadata,
        overwrite=overwrite,
        digest=digest,
        chunking=chunk_options(incremental, compression, chunk_bytes),
        hints=hints,
        extra_files=extra_files,
        after_commit=None if validate == "checksum" else functools.partial(_check_after_commit, validate),
    )


def _check_after_commit(level: str, target: str) -> None:
    """``validate=level``: validates the committed checkpoint, records and raises a failure."""
    from .validation import ValidationFailedError, record_result
    from .validation import validate as run_validation

    result = run_validation(target, level)
    record_result(result)
    if not result.passed:
        raise ValidationFailedError(result)


def save(
    path: PathLike,
    state: Any,
    *,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    digest: str | None = None,
    incremental: bool = False,
    compression: str | None = None,
    chunk_bytes: int | None = None,
    hints: HintCache | None = None,
    validate: str = "checksum",
    extra_files: dict[str, bytes] | None = None,
    storage: Storage | None = None,
) -> CheckpointInfo:
    """Saves any nested training state as one atomically committed checkpoint directory.

    ``state`` may nest dicts, lists, tuples, sets and scalars around numpy arrays and torch tensors
    of any dtype; everything comes back from :func:`load` with the same types and bits, tensors that
    shared storage still sharing it. ``metadata`` (plain values) goes to the manifest exactly and to
    the human-readable sidecar; its keys ``step``, ``run_id``, ``config``, ``metrics``,
    ``data_version`` and ``git`` fill the sidecar's fields. Raises :class:`UnsupportedStateError`
    naming the first value that cannot be saved safely, :class:`CheckpointExistsError` when
    ``path`` is a checkpoint and ``overwrite`` is false, :class:`StorageError` when the disk fails.
    When this returns, the checkpoint is durable; when it raises, nothing was committed.

    ``incremental`` stores every tensor of at least 64 KiB as ``chunk_bytes`` chunks
    (default 4 MiB) in the chunk store beside the checkpoint (``.ckptvault-store``): a chunk already
    there, from any checkpoint of the run, is referenced instead of written. ``compression``
    (``"auto"``, ``"zstd"``, ``"lz4"``) also chunks, compressing byte planes where that pays. Such
    checkpoints need their store (``ckptvault export`` makes a standalone copy, ``ckptvault gc``
    frees unreferenced chunks). ``hints``, a :class:`~ckptvault.engine.chunks.HintCache` kept
    across saves of one run, skips tensors it proves unchanged (neither hashed nor written).

    ``validate="readback"`` reads the committed files back and re-hashes them before returning;
    ``"full"`` also rebuilds the model in a separate process (see :func:`save_model` and
    ``ckptvault.validation``). A checkpoint that fails is committed but raises
    :class:`~ckptvault.validation.ValidationFailedError`, and the failure is recorded beside it.
    ``storage`` saves through that backend, ``path`` in its terms (the manager passes its run's).
    """
    request = save_request(
        path,
        metadata=metadata,
        overwrite=overwrite,
        digest=digest,
        incremental=incremental,
        compression=compression,
        chunk_bytes=chunk_bytes,
        hints=hints,
        validate=validate,
        extra_files=extra_files,
        storage=storage,
    )
    _raise_unobserved_async_failure()
    return request.run(state)


def save_model(
    path: PathLike,
    model: Any,
    *,
    factory: str | Any = None,
    kwargs: dict[str, Any] | None = None,
    probe: Any = None,
    metadata: dict[str, Any] | None = None,
    validate: str = "checksum",
    export_program: bool = False,
    overwrite: bool = False,
) -> CheckpointInfo:
    """Saves a model so that :func:`load_model` can rebuild it without the training script.

    ``factory`` is ``"package.module:Callable"`` (or the callable) and ``kwargs`` its JSON
    arguments; with only ``kwargs`` (or a ``ckptvault_kwargs`` attribute on the model) the factory is
    the model's own module-level class. Both are checked importable now. ``probe`` (a tensor or a
    tuple of them) is run through the model now and kept with the output, so ``validate="full"``
    (here or later with ``ckptvault validate``) can prove the saved model computes the same thing.
    ``export_program=True`` also stores a ``torch.export`` program (read only by :func:`load_program`).
    """
    from .training.architecture import spec_for
    from .validation import PROBE_FILE, make_probe_file

    spec = spec_for(model, factory, kwargs, ("model",))
    metadata = {**(metadata or {}), "architecture": spec.to_metadata()}
    extra: dict[str, bytes] = {}
    if probe is not None:
        extra[PROBE_FILE] = make_probe_file(model, probe, metadata.get("metrics"))
    if export_program:
        extra[PROGRAM_FILE] = export_program_bytes(model, probe)
    return save(
        path,
        {"model": model.state_dict()},
        metadata=metadata,
        overwrite=overwrite,
        validate=validate,
        extra_files=extra,
    )


PROGRAM_FILE = "program.pt2"


def export_program_bytes(model: Any, probe: Any) -> bytes:
    """A ``torch.export`` program of ``model`` traced on ``probe``, as the bytes of a .pt2 file."""
    import io

    import torch

    if probe is None:
        raise ValueError("export_program needs a probe to trace the model with")
    inputs = tuple(probe) if isinstance(probe, (tuple, list)) else (probe,)
    program = torch.export.export(model, inputs)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def load_program(path: PathLike, *, trusted: bool = False) -> Any:
    """The stored ``torch.export`` program (digest checked), only with ``trusted=True``.

    ``torch.export.load`` is not data-only: a ``.pt2`` archive may mark weights and constants as
    pickled, and torch then calls ``torch.load`` with ``weights_only=False`` or ``pickle.loads`` on them (its
    sample inputs even fall back to ``weights_only=False`` when the safe load fails). A checkpoint is
    untrusted input, so reading its program is refused unless the caller says it trusts the file;
    the digest check only proves the file is the one the manifest names, not who wrote it.
    """
    import io

    storage, target = storage_for(path)
    with CheckpointReader(storage, target) as reader:
        try:
            data = reader.read_file(PROGRAM_FILE)
        except KeyError:
            raise CheckpointNotFoundError(
                f"{target} stores no exported program (save with export_program=True)"
            ) from None
    if not trusted:
        raise UnsafeCheckpointError(
            f"{target}: loading its torch.export program runs torch's deserializer, which may unpickle "
            "(and so run code); pass trusted=True only for a checkpoint you trust",
            path=target,
            file=PROGRAM_FILE,
        )
    import torch

    return torch.export.load(io.BytesIO(data))


def load_model(
    path: PathLike,
    *,
    map_location: Any = "cpu",
    verify: bool = True,
    trusted_modules: list[str] | None = None,
    allowed_modules: list[str] | None = None,
) -> Any:
    """Rebuilds the checkpoint's model from its recorded factory and loads its weights (eval mode).

    The factory's module is imported only if this program trusts it: it is imported already, or
    ``trusted_modules`` (default: ``CKPTVAULT_TRUSTED_MODULES``, comma-separated) names it or a
    package above it -- and even then never from the current directory or the checkpoint's
    directories. ``allowed_modules`` narrows instead: only those modules, imported or not. The
    model is first built on the meta device and every shape compared with the checkpoint's before
    any real memory is allocated; the checkpoint is decoded as strictly as by :func:`load`.

    Raises :class:`~ckptvault.training.architecture.ArchitectureError` when no factory is recorded,
    its module is not trusted (the message says how to trust it) or fails to import, it is not a
    model class or marked factory, or building raises (``SystemExit`` included);
    :class:`~ckptvault.training.architecture.ModelMismatchError` listing missing/unexpected keys and
    shape mismatches when the weights do not fit; :class:`CorruptCheckpointError` as :func:`load`.
    """
    from .training.rebuild import rebuild_model
    from .training.trust import TrustPolicy

    policy = TrustPolicy.create(trusted_modules, allowed_modules)
    storage, target = storage_for(path)
    return rebuild_model(storage, target, map_location=map_location, verify=verify, policy=policy)


def validate(
    path: PathLike, level: str = "full", *, trusted_modules: list[str] | None = None
) -> ValidationResult:
    """Validates a committed checkpoint now at ``level`` and records the result beside it.

    ``"full"`` rebuilds the model in another process, which imports the factory's module only when
    this process trusts it (imported here, or in ``trusted_modules``; see :func:`load_model`).
    """
    from .validation import record_result
    from .validation import validate as run_validation

    _, target = storage_for(path)
    result = run_validation(target, level, trusted_modules=trusted_modules)
    record_result(result)
    return result


def load(
    path: PathLike,
    *,
    map_location: Any = "cpu",
    verify: bool = True,
    mmap: bool = False,
    max_bytes: int | None = None,
) -> Any:
    """Loads a whole checkpoint; with ``verify`` (the default) every byte is checked first.

    What comes back is exactly the bytes that were verified: each tensor is read (``pread``) into
    fresh anonymous memory, hashed there and returned, so a later change to the files cannot alter
    it and truncating them cannot crash the process.

    ``mmap=True`` opts into zero-copy tensors backed by private copy-on-write maps of the data
    files (like ``safetensors.load_file`` or torch.load with ``mmap=True``): less memory and no copy,
    but pages the program has not written still show the *file*, so a later overwrite of the file in
    place changes the tensor after it was verified, and truncating the file turns the next access
    into SIGBUS. Use it only for files nobody else writes.

    ``max_bytes`` caps what the load may allocate, and the logical size of every tensor it returns
    (a stride-0 view included); past it :class:`~ckptvault.errors.ResourceLimitError` is raised before
    anything is allocated. The default is the larger of 64 GiB and the bytes the checkpoint actually
    stores (its files plus each distinct chunk it references once): an honest checkpoint always
    loads, a hostile manifest cannot turn a few stored bytes into more than 64 GiB.

    ``map_location`` is a device (``"cpu"``, ``"cuda:0"``, a ``torch.device``), ``None`` for each
    tensor's original device, or a dict mapping saved device strings to new ones. Raises
    :class:`CheckpointNotFoundError` when ``path`` holds no committed checkpoint and
    :class:`CorruptCheckpointError` (with ``file``, ``tensor`` and ``kind``) when bytes disagree
    with the manifest. Nothing in a checkpoint is ever executed.
    """
    storage, target = storage_for(path)
    return read_checkpoint(
        storage,
        target,
        map_location=map_location,
        verify=verify,
        threads=Settings.from_env().io_threads,
        mapped=mmap,
        max_bytes=max_bytes,
    )


def open(
    path: PathLike,
    *,
    map_location: Any = "cpu",
    verify: bool = True,
    mmap: bool = False,
    max_bytes: int | None = None,
) -> CheckpointView:
    """A lazy read-only view: the manifest is read (and its whole tree checked) now, each tensor when
    it is indexed.

    ``with ckptvault.open(p) as ck: w = ck["model"]["fc.weight"]`` reads only that tensor's bytes into
    fresh memory and checks their digest; ``mmap`` and ``max_bytes`` mean what they mean for
    :func:`load` (the cap counts every tensor the view reads).
    """
    storage, target = storage_for(path)
    return CheckpointView(
        storage, target, map_location=map_location, verify=verify, mmap=mmap, max_bytes=max_bytes
    )


def verify(path: PathLike) -> VerifyReport:
    """Checks every file and tensor digest and the format's rules; reports all problems, raises none.

    Memory stays one block or chunk whatever the checkpoint declares, and a chunk referenced many
    times is read once. Also reported: metrics in the manifest that disagree with the digested
    sidecar (``metadata-mismatch``), and tensors a default :func:`load` would refuse to allocate
    (``resource-limit``)."""
    storage, target = storage_for(path)
    return verify_checkpoint(storage, target)


def info(path: PathLike) -> CheckpointInfo:
    """Facts about a committed checkpoint from its manifest alone (no tensor bytes read)."""
    storage, target = storage_for(path)
    with CheckpointReader(storage, target) as reader:
        return info_from_manifest(target, reader.manifest, reader.decode_metadata())


def list_checkpoints(root: PathLike) -> list[str]:
    """Committed checkpoints under ``root`` (staging leftovers and hidden directories skipped)."""
    storage, target = storage_for(root)
    return list(storage.iter_checkpoints(target))


_ASYNC_LOCK = threading.Lock()
_ASYNC_WRITER: BackgroundWriter | None = None
_ASYNC_STAGING = StagingBuffer()


def _raise_unobserved_async_failure() -> None:
    """Raises (once) the failure of a finished :func:`save_async` nobody waited on; never blocks."""
    if _ASYNC_WRITER is not None:  # once set, never unset
        _ASYNC_WRITER.raise_unobserved()


def save_async(
    path: PathLike,
    state: Any,
    *,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    digest: str | None = None,
    incremental: bool = False,
    compression: str | None = None,
    chunk_bytes: int | None = None,
    hints: HintCache | None = None,
    validate: str = "checksum",
    extra_files: dict[str, bytes] | None = None,
    storage: Storage | None = None,
    max_staging_bytes: int | None = None,
) -> PendingSave:
    """Like :func:`save` (the same options, the same checkpoint), but returns once the state's bytes
    are copied to host staging memory; the rest (and a requested validation) runs in a background
    thread. ``wait()`` on the returned :class:`PendingSave` gives the :class:`CheckpointInfo` or
    re-raises the background failure. One async save is in flight at a time (a new one first waits),
    so staging memory is one reused buffer of at most ``max_staging_bytes``: a larger state is
    staged in pieces through it (the call then also waits for the bytes beyond the budget, and
    raises a background failure meanwhile); a budget under two pieces (4 KiB, or two chunks)
    raises ``StagingBudgetError`` before anything is written. Pending saves finish at exit.
    A failure nobody saw (``wait()``, ``exception()``) is raised once by the next ``save_async``
    (which then saves nothing) or finished :func:`save`, and printed on stderr if unseen at exit.
    """
    global _ASYNC_WRITER
    with _ASYNC_LOCK:
        if _ASYNC_WRITER is None:
            _ASYNC_WRITER = BackgroundWriter()
        _ASYNC_STAGING.max_bytes = max_staging_bytes
        # The previous save's unseen failure is raised before the path is resolved, as it always was.
        _ASYNC_WRITER.wait_idle()
        request = save_request(
            path,
            metadata=metadata,
            overwrite=overwrite,
            digest=digest,
            incremental=incremental,
            compression=compression,
            chunk_bytes=chunk_bytes,
            hints=hints,
            validate=validate,
            extra_files=extra_files,
            storage=storage,
        )
        return _ASYNC_WRITER.submit_save(request, state, _ASYNC_STAGING)
