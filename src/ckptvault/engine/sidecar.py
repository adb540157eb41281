"""The human-readable sidecar ``checkpoint_<step>.meta.json`` and the system facts it records.

The manifest keeps the user's metadata exactly (typed encoding); the sidecar is a plain-JSON rendering
meant for people and for tools that know nothing of ckptvault (``jq``, a file browser, a tracker).
System facts are gathered once per process: they do not change between saves, and the tiny-save
fixed cost matters.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import socket
import subprocess
import sys
from typing import Any

from ..version import __version__

SIDECAR_FIELDS = ("run_id", "git", "config", "metrics", "data_version")


def sidecar_name(step: int) -> str:
    return f"checkpoint_{step:08d}.meta.json"


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def _static_system_info() -> dict[str, Any]:
    import numpy

    return {
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "ckptvault": __version__,
        "numpy": numpy.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
    }


def system_info() -> dict[str, Any]:
    """Framework versions and hardware; torch facts only when torch is already imported."""
    info = dict(_static_system_info())
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = str(torch.__version__)
        cuda = getattr(torch.version, "cuda", None)
        info["cuda"] = cuda
        try:
            if torch.cuda.is_available():
                info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        except Exception:  # a broken driver must not fail a save
            info["gpus"] = None
    return info


def run_git(cwd: str, *args: str, timeout: float = 5.0) -> bytes | None:
    """Raw stdout of ``git <args>`` in ``cwd``; None when git is missing, fails or times out.

    ``GIT_OPTIONAL_LOCKS=0`` keeps ``git status`` from taking the index lock, so recording provenance
    never collides with a git command the user runs at the same moment.
    """
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, timeout=timeout, check=False, env=env
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def read_git_state(cwd: str) -> dict[str, Any] | None:
    """Commit and dirty flag of the repository holding ``cwd``, read now; None outside a repository.

    Untracked files do not make a checkout dirty: they are usually outputs (checkpoints, logs).
    """
    commit = run_git(cwd, "rev-parse", "--verify", "--quiet", "HEAD")
    if commit is None:
        return None
    status = run_git(cwd, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.decode("utf-8", "replace").strip(), "dirty": bool(status and status.strip())}


@functools.lru_cache(maxsize=8)
def git_state(cwd: str) -> dict[str, Any] | None:
    """:func:`read_git_state` once per process and directory: a sidecar per save must stay cheap."""
    return read_git_state(cwd)


def plain_json(value: Any) -> Any:
    """A JSON-safe rendering for people: tuples become lists, NaN a string, odd keys strings."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain_json(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "size", 2) == 1:
        return plain_json(value.item())
    return repr(value)


def build_sidecar(
    *,
    checkpoint_id: str,
    step: int,
    created_at: str,
    metadata: dict[str, Any],
    tensors: int,
    tensor_bytes: int,
) -> dict[str, Any]:
    git = metadata.get("git")
    if git is None:
        git = git_state(os.getcwd())
    doc: dict[str, Any] = {
        "checkpoint_id": checkpoint_id,
        "step": step,
        "created_at": created_at,
        "run_id": metadata.get("run_id"),
        "git": git,
        "config": metadata.get("config"),
        "metrics": metadata.get("metrics", {}),
        "data_version": metadata.get("data_version"),
        "system": system_info(),
        "contents": {"tensors": tensors, "tensor_bytes": tensor_bytes},
        "user": {k: v for k, v in metadata.items() if k not in (*SIDECAR_FIELDS, "step")},
    }
    return {k: plain_json(v) for k, v in doc.items()}
