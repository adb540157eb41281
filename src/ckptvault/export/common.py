"""What every export format shares: the result and error types, and sizes.

Split out of ``ckptvault.export`` so that each format module (torch, hf, onnx) imports only the
small common ground -- the :class:`ExportResult` it returns and the errors it raises -- instead of
the other formats' code. The temporary-name-then-rename rule that keeps a failed export from leaving
a partial output is storage's (:mod:`ckptvault.storage.atomic_file` for one file,
:func:`ckptvault.storage.localfiles.publish_directory` for a directory): one implementation.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import CheckpointError

PathLike = str | os.PathLike[str]
Progress = Callable[[int], None]

DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default


class ExportError(CheckpointError):
    """The export cannot be made: unknown format, no recorded architecture or probe, a state the
    target format cannot hold, a missing optional dependency, or the exporter failed."""


class ExportMismatchError(ExportError):
    """The exported ONNX graph does not compute what the model computes on the probe.

    ``max_abs_diff`` is the largest difference seen; the output file was not written.
    """

    def __init__(self, message: str, max_abs_diff: float) -> None:
        super().__init__(message)
        self.max_abs_diff = max_abs_diff


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: ``files`` are relative to ``path`` when it is a directory (``hf``)."""

    path: str
    format: str
    files: tuple[str, ...]
    size_bytes: int
    num_tensors: int
    source: str  # where the exported tensors came from, in words
    max_abs_diff: float | None = None  # onnx: largest |onnxruntime - torch| on the probe

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["files"] = list(self.files)
        return doc


# -- sizes ----------------------------------------------------------------------------------------
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str | int) -> int:
    """Bytes in ``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"1000"``: decimal units as transformers reads
    them (``"5GB"`` is 5·10⁹), binary ones with ``i``. Raises ValueError for anything else."""
    if isinstance(text, int) and not isinstance(text, bool):
        value: float = text
    else:
        match = _SIZE.match(str(text))
        if match is None:
            raise ValueError(f"cannot read {text!r} as a size; use e.g. 5GB, 500MB, 2GiB or a byte count")
        unit = (match.group(2) or "").lower()
        scale = _UNITS[unit[:1]]
        if "i" in unit:
            scale = 1024 ** ("kmgt".index(unit[0]) + 1)
        value = float(match.group(1)) * scale
    if value < 1 or not math.isfinite(value):
        raise ValueError(f"a size must be at least one byte, got {text!r}")
    return int(value)
