"""Names and values as MLflow takes them: its limits, cleaned keys, parameters, tags, batches.

Why a module of its own: MLflow refuses keys, values, aliases and requests beyond its limits, and
the rules for fitting ckptvault's config, metrics and provenance into them are pure functions of
the data -- no MLflow import at module level, no client, testable alone. The tracker
(:mod:`ckptvault.integrations.mlflow`), its runs (:mod:`ckptvault.integrations.mlflow_runs`) and
its registry mirroring (:mod:`ckptvault.integrations.mlflow_registry`) all use them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

from ..policy.metrics import as_number

INSTALL_HINT = "pip install 'ckptvault[mlflow]'"
ARTIFACT_DIR = "checkpoints"
CHECKPOINT_TAG = "ckptvault.checkpoint."
RUN_ID_TAG = "ckptvault.run_id"
VERSION_TAG = "ckptvault.version"
CHECKPOINT_ID_TAG = "ckptvault.checkpoint_id"
PATH_TAG = "ckptvault.path"

# MLflow's limits (mlflow.utils.validation), fixed here so the tracker never depends on private names.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_ALIAS = 255
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
MAX_BATCH_BYTES = 900_000  # MLflow refuses a log_batch request over 1 MB; keep a margin for framing

_BAD_KEY_CHARS = re.compile(r"[^\w.\- ]")  # MLflow allows these (and "/" and ":", not taken here)
_ALIAS = re.compile(r"[\w\-]+")
_VERSION_ALIAS = re.compile(r"[vV]\d+")
_ELLIPSIS = "..."

LogCheckpoints = Literal["artifact", "reference"] | None


def import_mlflow() -> Any:
    try:
        import mlflow
    except ImportError as exc:
        raise ImportError(f"MLflowTracker needs MLflow, which is not installed: {INSTALL_HINT}") from exc
    return mlflow


# -- names and values as MLflow takes them ---------------------------------------------------------
def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_ELLIPSIS)] + _ELLIPSIS


def clean_key(raw: str) -> str:
    """A parameter, metric or tag key MLflow accepts: other characters become ``_``, a key that
    path normalisation would change gets a ``_`` in front, and one over 250 characters is cut and
    ends in a digest of the whole, so distinct long keys stay distinct."""
    key = _BAD_KEY_CHARS.sub("_", raw) or "_"
    if key.startswith(".."):
        key = "_" + key
    elif key == ".":
        key = "_"
    if len(key) > MAX_KEY:
        digest = hashlib.blake2b(raw.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
        key = f"{key[: MAX_KEY - len(digest) - 1]}_{digest}"
    return key


def _param_text(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif value is None or isinstance(value, (bool, int, float)):
        text = str(value)
    else:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    return truncate(text, MAX_PARAM_VALUE)


def config_params(config: Any) -> dict[str, str]:
    """A run's config as MLflow parameters: nested mappings flattened to dotted keys, every other
    value (lists too) as text, cut to 6,000 characters. Keys MLflow would refuse are cleaned
    (:func:`clean_key`); two that clean to one key are kept apart by a ``_2``, ``_3`` suffix."""
    flat: list[tuple[str, str]] = []

    def walk(value: Any, key: str) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif key or value is not None:
            flat.append((key or "config", _param_text(value)))

    walk(config, "")
    params: dict[str, str] = {}
    for raw, text in flat:
        key = base = clean_key(raw)
        n = 1
        while key in params:
            n += 1
            key = clean_key(f"{base}_{n}")
        params[key] = text
    return params


def metric_value(value: Any) -> float | None:
    """A metric as MLflow logs it, by the package's one rule (:func:`~ckptvault.policy.metrics.
    as_number`: bools and strings are not metrics); an int beyond any float is left out."""
    try:
        return as_number(value)
    except OverflowError:
        return None


def run_tags(run_dir: str, run: Mapping[str, Any]) -> dict[str, str]:
    """The MLflow tags of a ckptvault run: its id, directory and ckptvault version, the code's git
    state (also under MLflow's own ``mlflow.source.git.*``, which its UI shows), the data version
    and the host."""
    from ..version import __version__

    tags = {"ckptvault.version": __version__, "ckptvault.run_dir": os.path.abspath(run_dir)}
    if run.get("run_id"):
        tags[RUN_ID_TAG] = str(run["run_id"])
    git = run.get("git")
    if isinstance(git, Mapping):
        if git.get("commit"):
            tags["mlflow.source.git.commit"] = tags["ckptvault.git.commit"] = str(git["commit"])
        if git.get("branch"):
            tags["mlflow.source.git.branch"] = tags["ckptvault.git.branch"] = str(git["branch"])
        if git.get("dirty") is not None:
            tags["ckptvault.git.dirty"] = str(bool(git["dirty"])).lower()
        if git.get("diff_digest"):
            tags["ckptvault.git.diff_digest"] = str(git["diff_digest"])
    if run.get("data_version") is not None:
        tags["ckptvault.data_version"] = str(run["data_version"])
    system = run.get("system")
    if isinstance(system, Mapping) and system.get("hostname"):
        tags["ckptvault.host"] = str(system["hostname"])
    return {key: truncate(value, MAX_TAG_VALUE) for key, value in tags.items()}


def alias_problem(alias: str) -> str | None:
    if not alias or not _ALIAS.fullmatch(alias):
        return "MLflow aliases may hold only letters, digits, '_' and '-'"
    if alias.lower() == "latest" or _VERSION_ALIAS.fullmatch(alias):
        return "MLflow reserves 'latest' and version-like aliases ('v1')"
    if len(alias) > MAX_ALIAS:
        return f"MLflow aliases have at most {MAX_ALIAS} characters"
    return None


def quoted(text: str) -> str:
    """A string literal of MLflow's search syntax."""
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise ValueError(f"cannot search MLflow for a name holding both quote characters: {text!r}")


def error_code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", ""))


def is_local_uri(uri: str) -> bool:
    return uri.startswith("file:") or "://" not in uri


def _entity_bytes(entity: Any) -> int:
    return len(str(entity.key).encode()) + len(str(entity.value).encode()) + 32


def batches(entities: Sequence[Any]) -> Iterator[list[Any]]:
    """Splits entities into log_batch requests within MLflow's limits: at most 100 parameters,
    100 tags and 1,000 entities per request, and well under its 1 MB request size."""
    from mlflow.entities import Param, RunTag

    batch: list[Any] = []
    counts = {Param: 0, RunTag: 0}
    size = 0
    for entity in entities:
        kind = type(entity)
        cost = _entity_bytes(entity)
        full = (
            len(batch) >= MAX_ENTITIES_PER_BATCH
            or (kind is Param and counts[Param] >= MAX_PARAMS_PER_BATCH)
            or (kind is RunTag and counts[RunTag] >= MAX_TAGS_PER_BATCH)
            or (batch and size + cost > MAX_BATCH_BYTES)
        )
        if full:
            yield batch
            batch, counts, size = [], {Param: 0, RunTag: 0}, 0
        batch.append(entity)
        if kind in counts:
            counts[kind] += 1
        size += cost
    if batch:
        yield batch
