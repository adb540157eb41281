"""Importing legacy checkpoints (``torch.save`` files) without ever running their pickle code.

``torch.load(weights_only=True)`` uses torch's restricted unpickler: only tensors, containers and
an allow-list of torch types can be built. When a file needs anything else we do not widen the
allow-list; we name the globals it wants (found by torch's scanner, which reads opcodes and executes
nothing) so the user can decide, outside ckptvault, whether to trust the file.
"""

from __future__ import annotations

import os
from typing import Any

from .api import PathLike, save
from .errors import CheckpointError, UnsafeLegacyFileError
from .types import CheckpointInfo


def read_legacy(path: PathLike) -> Any:
    """The object in a ``.pt``/``.pth``/``.bin`` torch file, or a ``.safetensors`` file's tensors."""
    source = os.fspath(path)
    if source.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(source)
        except Exception as exc:  # the safetensors library raises its own single error type
            raise CheckpointError(f"{source}: not a valid safetensors file: {exc}") from exc
    import torch
    import torch.serialization

    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=False)
    except FileNotFoundError:
        raise
    except Exception as exc:
        if type(exc).__name__ != "UnpicklingError":
            raise CheckpointError(f"{source}: cannot read as a torch file: {exc}") from exc
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(source)
        except Exception:  # scanning itself failed: still refuse, just without names
            unsafe = []
        names = ", ".join(unsafe) if unsafe else "(could not list them)"
        raise UnsafeLegacyFileError(
            f"{source} needs Python globals that a safe load refuses to construct: {names}. "
            "ckptvault never unpickles arbitrary code; convert the file in a trusted environment "
            "(e.g. save its state_dict()) and import that."
        ) from exc


def import_legacy(source: PathLike, target: PathLike, *, overwrite: bool = False) -> CheckpointInfo:
    """Converts a legacy torch (or safetensors) file into a verified ckptvault checkpoint."""
    state = read_legacy(source)
    return save(
        target, state, metadata={"imported_from": os.path.basename(os.fspath(source))}, overwrite=overwrite
    )
