"""Run provenance: what a run was, captured once at its start and written to ``run.json``.

A checkpoint without its provenance answers "what are these weights?" only by guessing. At start we
record the run id, the command line, the code (git commit, branch, and a digest of uncommitted
changes), the software (every installed distribution's version), the machine (reusing the sidecar's
:func:`~ckptvault.engine.sidecar.system_info`), the hyperparameters and the data version.

Capture must stay cheap (well under a second, measured ~100 ms with 4 git calls and a scan of a few
hundred distributions), never touch the network, and never import torch or omegaconf: torch facts are
read only when torch is already imported, and an OmegaConf object can only reach us if omegaconf is.
Nothing here is cached per process, unlike the per-save sidecar: a long-lived process (a notebook)
may start several runs with different code in between.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import importlib.metadata
import math
import os
import re
import secrets
import subprocess
import sys
import threading
from argparse import Namespace
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from ..engine.sidecar import read_git_state, run_git, system_info
from ..format.digest import new_hasher

__all__ = ["PROVENANCE_VERSION", "capture_provenance", "installed_packages", "new_run_id", "normalize_config"]

PROVENANCE_VERSION = 1
_GIT_TIMEOUT_S = 5.0
_SMALL_ARRAY = 64  # arrays up to this many elements become lists; bigger ones a repr


def new_run_id() -> str:
    """A unique id whose lexicographic order is its creation order, to the second.

    ``"20261128T051200Z-3f9a2c1b"``: UTC time to the second, then 32 random bits. Two ids made within
    one second sort by their random suffix, i.e. arbitrarily; across seconds, string order is time
    order (the width is fixed until year 9999). 32 bits make a collision within one second negligible
    for any realistic number of runs started at once.
    """
    return _run_id_at(datetime.datetime.now(datetime.timezone.utc))


def _run_id_at(now: datetime.datetime) -> str:
    return f"{now:%Y%m%dT%H%M%S}Z-{secrets.token_hex(4)}"


def normalize_config(config: object) -> dict[str, object] | None:
    """The run's hyperparameters as plain JSON-able data (a ``dict`` of str keys), or None for None.

    Handled, recursively: mappings (keys become strings; an enum key becomes its value's string),
    dataclass instances (their fields, like :func:`dataclasses.asdict` but without its deep copy,
    which fails on uncopyable fields), :class:`argparse.Namespace`, OmegaConf ``DictConfig`` /
    ``ListConfig`` (resolved; detected by the type's module, so omegaconf is never imported by us),
    lists, tuples and sets (sets sorted, for a stable file), paths (strings), enums (their value),
    numpy and torch scalars (``item()``), small arrays and tensors (lists), non-finite floats (the
    strings ``"nan"``, ``"inf"``, ``"-inf"``, as in the sidecar, since strict JSON has no such number).
    Anything else becomes its ``repr()``: provenance must never fail a run. A config that is not a
    mapping at the top (a list, a number) is wrapped as ``{"value": ...}``.
    """
    if config is None:
        return None
    plain = _plain(config, frozenset())
    if isinstance(plain, dict):
        return plain
    return {"value": plain}


def _plain(value: object, seen: frozenset[int]) -> object:
    """One value as plain data; ``seen`` holds the containers above it, to cut reference cycles."""
    if isinstance(value, enum.Enum):  # before int/str: IntEnum and StrEnum members are both
        return _plain(value.value, seen)
    if value is None or type(value) in (bool, int, str):
        return value
    if isinstance(value, (bool, int, str)):  # a subclass: JSON wants the plain builtin
        return _exact_builtin(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else str(value)
    if isinstance(value, PurePath):
        return str(value)

    if id(value) in seen:
        return f"<cycle: {type(value).__name__}>"
    inner = seen | {id(value)}

    container = _container(value)
    if isinstance(container, Mapping):
        return {_plain_key(k): _plain(v, inner) for k, v in container.items()}
    if isinstance(container, (list, tuple)):
        return [_plain(v, inner) for v in container]
    if isinstance(value, (set, frozenset)):
        items = [_plain(v, inner) for v in value]
        return sorted(items, key=repr)
    array = _array_value(value)
    if array is not _NOT_ARRAY:
        return _plain(array, inner)
    return repr(value)


def _exact_builtin(value: bool | int | str) -> object:
    """Subclasses of bool/int/str (other than enums) as the plain builtin, so JSON writes them."""
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    return str(value)


def _plain_key(key: object) -> str:
    if isinstance(key, enum.Enum):
        key = key.value
    return key if isinstance(key, str) else str(key)


def _container(value: object) -> object:
    """The mapping or sequence a config object stands for, or ``value`` itself when it is none of those."""
    if isinstance(value, (Mapping, list, tuple)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Namespace):
        return vars(value)
    cls = type(value)
    if cls.__module__.split(".", 1)[0] == "omegaconf" and cls.__name__ in ("DictConfig", "ListConfig"):
        omegaconf = sys.modules.get("omegaconf")
        if omegaconf is not None:
            try:
                return omegaconf.OmegaConf.to_container(value, resolve=True)
            except Exception:  # an unresolvable interpolation: record it as written instead
                try:
                    return omegaconf.OmegaConf.to_container(value, resolve=False)
                except Exception:
                    return value
    return value


_NOT_ARRAY = object()


def _array_value(value: object) -> object:
    """numpy/torch scalars as Python numbers, small arrays as lists; ``_NOT_ARRAY`` otherwise.

    Detected by type module so that a numpy-only process never imports torch to ask.
    """
    module = type(value).__module__.split(".", 1)[0]
    if module not in ("numpy", "torch"):
        return _NOT_ARRAY
    item: Any = value
    try:
        if getattr(item, "ndim", None) == 0 and hasattr(item, "item"):
            return item.item()
        # torch: ``size()`` is a shape and ``numel()`` the count; numpy: ``size`` is the count.
        count = item.numel() if module == "torch" else getattr(item, "size", None)
        if isinstance(count, int) and count <= _SMALL_ARRAY and hasattr(item, "tolist"):
            return item.tolist()
    except Exception:  # an exotic array type (a meta tensor, a device error): fall back to repr
        return _NOT_ARRAY
    return _NOT_ARRAY


def _canonical_name(name: str) -> str:
    """PEP 503 normalisation, so ``PyYAML``/``pyyaml`` and ``typing_extensions``/``-`` are one key."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_packages() -> dict[str, str]:
    """``{canonical name: version}`` of installed distributions, sorted by name.

    When a name is installed twice (an editable checkout shadowing a site-packages copy), the first
    on ``sys.path`` wins: it is the one ``import`` finds.
    """
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        try:
            name = dist.metadata["Name"]
            version = dist.version
        except Exception:  # a broken .dist-info must not fail the run
            continue
        if not name or not version:
            continue
        found.setdefault(_canonical_name(name), str(version))
    return dict(sorted(found.items()))


def _diff_digest(cwd: str) -> str | None:
    """blake3 of ``git diff HEAD`` (tracked files only), streamed so a huge diff never sits in memory.

    External diff drivers and colour are switched off so the digest depends on the changes alone,
    not on the user's git configuration; ``--binary`` makes binary edits part of it.
    """
    command = ["git", "diff", "--no-ext-diff", "--no-color", "--binary", "--no-textconv", "HEAD"]
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    hasher = new_hasher("blake3")
    try:
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    except OSError:
        return None
    stdout = proc.stdout
    if stdout is None:  # impossible with stdout=PIPE; keeps the type checker honest
        proc.kill()
        proc.wait()
        return None
    timer = threading.Timer(_GIT_TIMEOUT_S, proc.kill)  # a hung git must not hang the run start
    timer.start()
    try:
        with stdout:
            while chunk := stdout.read(1 << 20):
                hasher.update(chunk)
        code = proc.wait()
    finally:
        timer.cancel()
    return f"blake3:{hasher.hexdigest()}" if code == 0 else None


def capture_git(cwd: str) -> dict[str, Any] | None:
    """``{commit, branch, dirty, diff_digest}`` of the checkout holding ``cwd``, read now.

    None outside a repository, in one without commits, or without git. ``branch`` is None on a
    detached HEAD. ``dirty`` and ``diff_digest`` cover tracked files only (untracked files are
    usually outputs); ``diff_digest`` is None when clean, or when the diff could not be read.
    """
    state = read_git_state(cwd)
    if state is None:
        return None
    branch_raw = run_git(cwd, "symbolic-ref", "--quiet", "--short", "HEAD", timeout=_GIT_TIMEOUT_S)
    branch = branch_raw.decode("utf-8", "replace").strip() if branch_raw else None
    dirty = bool(state["dirty"])
    return {
        "commit": state["commit"],
        "branch": branch or None,
        "dirty": dirty,
        "diff_digest": _diff_digest(cwd) if dirty else None,
    }


def capture_provenance(
    *,
    config: object = None,
    data_version: str | None = None,
    cwd: str | None = None,
) -> dict[str, object]:
    """Everything known about this run at its start, as plain JSON-able data for ``run.json``.

    Keys: ``provenance_version``, ``run_id`` (:func:`new_run_id`), ``created_at`` (ISO 8601 UTC),
    ``command`` (``sys.argv``), ``executable``, ``cwd`` (``cwd`` or the process's working directory,
    absolute: it is this machine's fact at run time), ``git`` (:func:`capture_git` of that directory),
    ``system`` (hostname, OS, Python, CPU, numpy; torch/CUDA versions and GPU names only when torch is
    already imported), ``packages`` (:func:`installed_packages`), ``config``
    (:func:`normalize_config`) and ``data_version`` (e.g. a :func:`~.fingerprint.fingerprint`).
    Environment variables are deliberately not recorded: they hold secrets.
    """
    where = os.path.abspath(cwd) if cwd is not None else os.getcwd()
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "provenance_version": PROVENANCE_VERSION,
        "run_id": _run_id_at(now),  # the same instant as created_at, even across a second boundary
        "created_at": now.isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "command": list(sys.argv),
        "executable": sys.executable,
        "cwd": where,
        "git": capture_git(where),
        "system": system_info(),
        "packages": installed_packages(),
        "config": normalize_config(config),
        "data_version": data_version,
    }
