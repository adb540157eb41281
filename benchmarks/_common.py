"""Shared helpers for the benchmarks: deterministic states, page touching, timing, memory probes.

Nothing here knows about ckptvault; the contenders live in the benchmark scripts.
"""

from __future__ import annotations

import gc
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
PAGE = 4096


# --------------------------------------------------------------------------- machine


def _fs_type(path: Path) -> str:
    """The filesystem type of the mount holding ``path`` (longest mount-point prefix), or '?'."""
    try:
        target = str(path.resolve())
        best, best_type = "", "?"
        with open("/proc/mounts", encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) > len(best):
                    best, best_type = mount, parts[2]
        return best_type
    except OSError:
        return "?"


def machine_info(work_dir: Path) -> dict[str, Any]:
    """What a reader needs to judge the numbers: CPU, memory, versions, and where the files went."""
    import blake3
    import safetensors

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cores_logical": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
        "blake3": getattr(blake3, "__version__", "?"),
        "work_dir_fs": _fs_type(work_dir),
        "work_dir_free_gib": round(shutil.disk_usage(work_dir).free / GIB, 1),
    }
    try:
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / GIB, 1)
    except ImportError:  # pragma: no cover - psutil is a dev dependency
        info["ram_gib"] = None
    try:
        import ckptvault

        info["ckptvault"] = getattr(ckptvault, "__version__", "?")
    except ImportError:
        info["ckptvault"] = "not importable"
    return info


# --------------------------------------------------------------------------- states


@dataclass(frozen=True)
class StateSpec:
    """The shape of the benchmark state, fixed by (seed, target size, tensor count)."""

    shapes: dict[str, tuple[int, ...]]

    @property
    def nbytes(self) -> int:
        return sum(4 * int(np.prod(s)) for s in self.shapes.values())

    def median_tensor(self) -> str:
        """The name of a mid-sized tensor (median by size)."""
        ordered = sorted(self.shapes, key=lambda n: (int(np.prod(self.shapes[n])), n))
        return ordered[len(ordered) // 2]


def make_spec(
    target_bytes: int,
    *,
    count: int = 200,
    seed: int = 0,
    min_bytes: int = 4 * KIB,
    max_bytes: int = 48 * MIB,
) -> StateSpec:
    """Tensor sizes drawn log-uniformly from [min, max] by a seeded RNG, then scaled to ``target_bytes``.

    Shapes are 2-D (rows x a power-of-two width) where the tensor is big enough, like real layers.
    """
    rng = np.random.default_rng(seed)
    raw = np.exp(rng.uniform(np.log(min_bytes), np.log(max_bytes), size=count))
    scaled = raw * (target_bytes / raw.sum())
    widths = (256, 512, 1024, 2048, 4096)
    shapes: dict[str, tuple[int, ...]] = {}
    for i, nbytes in enumerate(scaled):
        numel = max(1, int(nbytes) // 4)
        width = widths[int(rng.integers(len(widths)))]
        shape: tuple[int, ...] = (numel // width, width) if numel >= width else (numel,)
        shapes[f"layer_{i}.weight"] = shape
    return StateSpec(shapes)


def build_state(spec: StateSpec, *, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """``{"model": {name: fp32 tensor}}`` with seeded random contents (incompressible, deterministic)."""
    gen = torch.Generator().manual_seed(seed)
    model = {
        name: torch.randn(shape, generator=gen, dtype=torch.float32) for name, shape in spec.shapes.items()
    }
    return {"model": model}


def iter_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested dict/list/tuple, with a dotted key ("model.layer_0.weight")."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from iter_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from iter_tensors(value, f"{prefix}.{i}" if prefix else str(i))


def flatten(obj: Any) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(obj))


def touch_pages(obj: Any) -> float:
    """Read one element per 4 KiB page of every tensor, so lazily mapped memory is really faulted in.

    Returns a float that depends on the reads, so the work cannot be skipped.
    """
    total = 0.0
    for _, t in iter_tensors(obj):
        if t.numel() == 0:
            continue
        step = max(1, PAGE // t.element_size())
        total += float(t.reshape(-1)[::step].sum())
    return total


def assert_same_tensors(expected: Any, got: Any, what: str) -> None:
    """Raise if ``got`` does not hold exactly the tensors of ``expected`` (same dotted keys)."""
    exp, act = flatten(expected), flatten(got)
    if exp.keys() != act.keys():
        missing, extra = sorted(exp.keys() - act.keys())[:3], sorted(act.keys() - exp.keys())[:3]
        raise AssertionError(f"{what}: keys differ (missing {missing}, unexpected {extra})")
    for key, tensor in exp.items():
        other = act[key]
        if other.dtype != tensor.dtype or other.shape != tensor.shape or not torch.equal(other, tensor):
            raise AssertionError(f"{what}: tensor {key!r} differs")


# --------------------------------------------------------------------------- timing


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """Wall time of ``fn()`` with the garbage collector run before and paused during it."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
    return elapsed, result


def rotated(items: Sequence[T], rep: int) -> list[T]:
    """``items`` rotated by ``rep``: each contender goes first in turn, so drift hits all alike."""
    k = rep % len(items) if items else 0
    return [*items[k:], *items[:k]]


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def fsync_path(path: Path) -> None:
    """fsync a file someone else wrote and closed (open read-only, fsync, close)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- memory


def proc_status_kib(*fields: str) -> dict[str, int]:
    """Selected ``/proc/self/status`` fields (VmRSS, VmHWM, ...) in KiB."""
    out: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in fields:
                out[key] = int(rest.split()[0])
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, ``clear_refs`` value 5). False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    status = proc_status_kib("VmHWM", "VmRSS")
    # Allow a little slack: RSS can grow between the reset and the read.
    return status.get("VmHWM", 1 << 62) <= status.get("VmRSS", 0) + 1024


# --------------------------------------------------------------------------- report helpers


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def fmt_samples(values: list[float], digits: int) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)
