"""MLflow for ckptvault runs: parameters, metrics, checkpoints and the Model Registry.

``MLflowTracker`` follows one ckptvault run in one MLflow run (the :class:`~ckptvault.integrations.
Tracker` protocol)::

    from ckptvault.integrations.mlflow import MLflowTracker
    tracker = MLflowTracker("http://mlflow:5000", experiment="resnet", log_checkpoints="artifact")

* **Run start**: the run's config becomes parameters (nested keys dotted: ``optimizer.lr``; values as
  text, cut to MLflow's 6,000 characters), its provenance becomes tags (``ckptvault.run_id``,
  ``ckptvault.version``, ``mlflow.source.git.commit`` and ``ckptvault.git.*``, ``ckptvault.data_version``).
  A resumed ckptvault run (same ``run_id``) continues the MLflow run that has its ``ckptvault.run_id``
  tag (``resume=False`` starts a new one each time).
* **Checkpoint**: its numeric metrics are logged at its step. With ``log_checkpoints="artifact"``
  (the default) the committed directory is uploaded as ``checkpoints/<name>``; an incremental or
  compressed checkpoint (one that references the run's ``.ckptvault-store``) is first rewritten as a
  standalone copy in a temporary directory (the state is loaded into memory for that), so every
  artifact loads on its own with ``ckptvault.load``; its metadata names the original under
  ``standalone_copy_of``. With ``"reference"`` nothing is copied; with either, a run tag
  ``ckptvault.checkpoint.<name>`` holds the path, checkpoint id, step and scope (and the artifact
  path). ``log_checkpoints=None`` logs metrics only. Uploads are synchronous: the training loop waits
  for them. MLflow keeps what it was given: retention deletes checkpoints in the run directory only.
* **Registration**: the registered model is created if missing; a model version is created whose
  source is the checkpoint's artifact when one was logged for it (by this tracker, or by the MLflow
  run of the checkpoint's ckptvault run found in this tracker's experiment, e.g. registration after
  training in another process; a checkpoint of the tracker's own open run that was not uploaded yet
  is uploaded now when artifacts are on), else the checkpoint's path as a ``file://`` URI. The model
  version records its MLflow run and the tags ``ckptvault.version``, ``ckptvault.checkpoint_id`` and
  ``ckptvault.path``. Calling again for the same version and checkpoint reuses that model version.
  The aliases given are set on it (moving them from any other version) and any other alias on it is
  removed: ckptvault's registry is the truth for the versions it registers. Names MLflow cannot
  hold as an alias (``latest``, ``v3``, anything but letters, digits, ``_`` and ``-``) are skipped
  with a warning. An MLflow *server* refuses local paths as model version sources, so registering a
  checkpoint that was not logged as an artifact needs a file or database registry URI.

MLflow is imported when a tracker is constructed; without it that raises ImportError naming
``pip install 'ckptvault[mlflow]'``. All calls go through one explicit ``MlflowClient``: the tracker
never touches MLflow's global active run. MLflow 3 refuses ``file:`` tracking stores unless
``MLFLOW_ALLOW_FILE_STORE=true`` is set (its own message says so), and its file-based model registry
reads model versions through a client on the *global* tracking URI (``MLFLOW_TRACKING_URI``; unset,
it creates ``./mlflow.db``): set that variable to the same store. A database (``sqlite:///``) or a
server works as is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..types import CheckpointInfo

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, Run, RunTag
    from mlflow.entities.model_registry import ModelVersion

__all__ = ["INSTALL_HINT", "MLflowTracker", "config_params", "standalone_copy"]

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


def _import_mlflow() -> Any:
    try:
        import mlflow
    except ImportError as exc:
        raise ImportError(f"MLflowTracker needs MLflow, which is not installed: {INSTALL_HINT}") from exc
    return mlflow


# -- names and values as MLflow takes them ---------------------------------------------------------
def _truncate(text: str, limit: int) -> str:
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
    return _truncate(text, MAX_PARAM_VALUE)


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


def _metric_value(value: Any) -> float | None:
    if isinstance(value, (str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def run_tags(run_dir: str, run: Mapping[str, Any]) -> dict[str, str]:
    """The MLflow tags of a ckptvault run: its id, directory and ckptvault version, the code's git
    state (also under MLflow's own ``mlflow.source.git.*``, which its UI shows), the data version
    and the host."""
    from .. import __version__

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
    return {key: _truncate(value, MAX_TAG_VALUE) for key, value in tags.items()}


def _alias_problem(alias: str) -> str | None:
    if not alias or not _ALIAS.fullmatch(alias):
        return "MLflow aliases may hold only letters, digits, '_' and '-'"
    if alias.lower() == "latest" or _VERSION_ALIAS.fullmatch(alias):
        return "MLflow reserves 'latest' and version-like aliases ('v1')"
    if len(alias) > MAX_ALIAS:
        return f"MLflow aliases have at most {MAX_ALIAS} characters"
    return None


def _quoted(text: str) -> str:
    """A string literal of MLflow's search syntax."""
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise ValueError(f"cannot search MLflow for a name holding both quote characters: {text!r}")


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", ""))


def _is_local_uri(uri: str) -> bool:
    return uri.startswith("file:") or "://" not in uri


# -- a standalone copy of a chunked checkpoint -----------------------------------------------------
def needs_store(path: str | os.PathLike[str]) -> bool:
    """Whether a committed checkpoint references its run's chunk store (incremental or compressed)."""
    from ..api import storage_for
    from ..engine.reader import CheckpointReader
    from ..format.manifest import CHUNKED_TENSORS

    storage, target = storage_for(path)
    with CheckpointReader(storage, target) as reader:
        return CHUNKED_TENSORS in reader.manifest.required_features


def standalone_copy(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> CheckpointInfo:
    """Rewrites a checkpoint as a self-contained one at ``target`` (every tensor in its data files,
    nothing in a chunk store): the same state, metadata and extra files, plus metadata
    ``standalone_copy_of`` naming the source's path and checkpoint id. Loads the whole state."""
    from .. import api
    from ..config import MANIFEST_NAME
    from ..engine.reader import CheckpointReader
    from ..engine.sidecar import sidecar_name

    storage, where = api.storage_for(source)
    with CheckpointReader(storage, where) as reader:
        manifest = reader.manifest
    reserved = {MANIFEST_NAME, sidecar_name(manifest.step)}
    extra = {
        name: (Path(source) / name).read_bytes()
        for name in manifest.files
        if name not in reserved and not name.startswith("data-")
    }
    info = api.info(source)
    metadata = dict(info.metadata)
    metadata["standalone_copy_of"] = {"path": os.path.abspath(source), "checkpoint_id": info.checkpoint_id}
    return api.save(target, api.load(source), metadata=metadata, extra_files=extra)


@dataclasses.dataclass(frozen=True)
class _Logged:
    checkpoint_id: str
    artifact_uri: str | None
    run_id: str | None


class MLflowTracker:
    """Follows a ckptvault run in MLflow (see the module doc). Not thread-safe: the manager calls
    it from the training loop's thread.

    ``tracking_uri`` and ``registry_uri`` default to MLflow's own defaults (``MLFLOW_TRACKING_URI``,
    ...); ``experiment`` is the experiment's name (created if missing; default
    ``MLFLOW_EXPERIMENT_NAME``, else ``MLFLOW_EXPERIMENT_ID``, else MLflow's default experiment);
    ``run_name`` defaults to the ckptvault run id. After :meth:`on_run_start`, :attr:`run_id` is the
    MLflow run's id.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        run_name: str | None = None,
        log_checkpoints: LogCheckpoints = "artifact",
        *,
        registry_uri: str | None = None,
        resume: bool = True,
    ) -> None:
        if log_checkpoints not in ("artifact", "reference", None):
            raise ValueError(
                f'log_checkpoints must be "artifact", "reference" or None, not {log_checkpoints!r}'
            )
        mlflow = _import_mlflow()
        self.client: MlflowClient = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
        self.experiment = experiment
        self.run_name = run_name
        self.log_checkpoints: LogCheckpoints = log_checkpoints
        self.resume = resume
        self.run_id: str | None = None
        self._ckptvault_run_id: str | None = None
        self._artifact_root = ""
        self._logged: dict[str, _Logged] = {}
        self._closed = False

    # -- the protocol ---------------------------------------------------------------------------
    def on_run_start(self, run_dir: str, run: Mapping[str, Any]) -> None:
        if self.run_id is not None and not self._closed:
            raise RuntimeError(
                f"this MLflowTracker already follows MLflow run {self.run_id}; close() it first"
            )
        experiment_id = self._experiment_id()
        assert experiment_id is not None
        ckptvault_run_id = str(run["run_id"]) if run.get("run_id") else None
        existing = (
            self._find_run(experiment_id, ckptvault_run_id) if self.resume and ckptvault_run_id else None
        )
        known: Mapping[str, str] = {}
        if existing is None:
            created = self.client.create_run(
                experiment_id,
                run_name=self.run_name or ckptvault_run_id,
                tags={RUN_ID_TAG: ckptvault_run_id} if ckptvault_run_id else None,
            )
            self.run_id, self._artifact_root = created.info.run_id, created.info.artifact_uri
        else:
            self.run_id, self._artifact_root = existing.info.run_id, existing.info.artifact_uri
            self.client.update_run(self.run_id, status="RUNNING")
            known = existing.data.params  # parameters cannot change: those logged before stay
        self._ckptvault_run_id = ckptvault_run_id
        self._closed = False
        self._logged = {}
        params = {k: v for k, v in config_params(run.get("config")).items() if k not in known}
        self._log_batch(params=params, tags=run_tags(run_dir, run))

    def on_checkpoint(
        self, path: str, info: CheckpointInfo, scope: str, step: int, metrics: Mapping[str, float]
    ) -> None:
        self._require_run()
        from mlflow.entities import Metric

        committed = info.metadata.get("committed_at")
        when = committed if isinstance(committed, (int, float)) else time.time()
        entities: dict[str, Metric] = {}
        for key, raw in metrics.items():
            value = _metric_value(raw)
            if value is not None:
                name = clean_key(str(key))
                entities[name] = Metric(name, value, int(when * 1000), int(step))
        self._log_batch(metrics=list(entities.values()))
        if self.log_checkpoints is None:
            return
        name = Path(path).name
        record: dict[str, Any] = {
            "path": os.path.abspath(path),
            "checkpoint_id": info.checkpoint_id,
            "step": int(step),
            "scope": scope,
        }
        artifact_uri = None
        if self.log_checkpoints == "artifact":
            record["artifact"], standalone = self._log_artifact(path, name)
            if standalone:
                record["standalone_copy"] = True
            artifact_uri = self._artifact_uri(record["artifact"])
        self._log_batch(tags={clean_key(CHECKPOINT_TAG + name): json.dumps(record)})
        self._logged[os.path.realpath(path)] = _Logged(info.checkpoint_id, artifact_uri, self.run_id)

    def on_register(self, name: str, version: int, path: str, aliases: Sequence[str]) -> None:
        from mlflow.exceptions import MlflowException

        from .. import api

        info = api.info(path)
        self._ensure_registered_model(name)
        model_version = self._find_version(name, version, info.checkpoint_id)
        if model_version is None:
            source, run_id = self._source(path, info)
            tags = {
                VERSION_TAG: str(version),
                CHECKPOINT_ID_TAG: info.checkpoint_id,
                PATH_TAG: os.path.abspath(path),
            }
            try:
                model_version = self.client.create_model_version(name, source, run_id=run_id, tags=tags)
            except MlflowException as exc:
                if _is_local_uri(source) and _error_code(exc) == "INVALID_PARAMETER_VALUE":
                    raise ValueError(
                        f"MLflow refused {source} as the source of a version of model {name!r}: an MLflow "
                        "server accepts a local path only inside a run's artifacts. Log the checkpoint as "
                        'an artifact (log_checkpoints="artifact", during its run) or use a file or '
                        "database registry_uri"
                    ) from exc
                raise
        self._set_aliases(name, str(model_version.version), aliases)

    def close(self, status: str = "FINISHED") -> None:
        """Ends the MLflow run (``status``: ``FINISHED``, ``FAILED`` or ``KILLED``). Idempotent."""
        if self.run_id is not None and not self._closed:
            self.client.set_terminated(self.run_id, status)
        self._closed = True

    def __enter__(self) -> MLflowTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self.close("FINISHED" if exc_type is None else "FAILED")

    # -- runs -----------------------------------------------------------------------------------
    def _require_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("MLflowTracker: on_run_start was not called")
        if self._closed:
            raise RuntimeError(f"MLflowTracker: MLflow run {self.run_id} is closed")
        return self.run_id

    def _experiment_id(self, *, create: bool = True) -> str | None:
        """The experiment's id (created if missing, or None when ``create`` is false)."""
        from mlflow.exceptions import MlflowException

        name = self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if not name:
            return os.environ.get("MLFLOW_EXPERIMENT_ID") or "0"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            if not create:
                return None
            try:
                return self.client.create_experiment(name)
            except MlflowException as exc:  # created meanwhile by another process
                if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            if not create:
                return None
            raise ValueError(f"MLflow experiment {name!r} is deleted: restore it or choose another name")
        return str(experiment.experiment_id)

    def _find_run(self, experiment_id: str, ckptvault_run_id: str) -> Run | None:
        """The newest active MLflow run of the experiment tagged with this ckptvault run id."""
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{RUN_ID_TAG}` = {_quoted(ckptvault_run_id)}",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return runs[0] if runs else None

    def _log_batch(
        self,
        *,
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
        metrics: Sequence[Metric] = (),
    ) -> None:
        """Logs in as many requests as MLflow's batch limits need (count per kind, total, bytes)."""
        from mlflow.entities import Metric, Param, RunTag

        run_id = self._require_run()
        pending: list[Param | RunTag | Metric] = [Param(k, v) for k, v in (params or {}).items()]
        pending += [RunTag(k, _truncate(v, MAX_TAG_VALUE)) for k, v in (tags or {}).items()]
        pending += list(metrics)
        for batch in _batches(pending):
            self.client.log_batch(
                run_id,
                metrics=[e for e in batch if isinstance(e, Metric)],
                params=[e for e in batch if isinstance(e, Param)],
                tags=[e for e in batch if isinstance(e, RunTag)],
            )

    # -- checkpoints as artifacts ---------------------------------------------------------------
    def _artifact_uri(self, artifact_path: str) -> str:
        return f"{self._artifact_root.rstrip('/')}/{artifact_path}"

    def _log_artifact(self, path: str, name: str) -> tuple[str, bool]:
        """Uploads the checkpoint as ``checkpoints/<name>``; a chunked one as a standalone copy."""
        run_id = self._require_run()
        artifact_path = f"{ARTIFACT_DIR}/{name}"
        if not needs_store(path):
            self.client.log_artifacts(run_id, path, artifact_path)
            return artifact_path, False
        with tempfile.TemporaryDirectory(prefix="ckptvault-mlflow-") as temp:
            copy = os.path.join(temp, name)
            standalone_copy(path, copy)
            self.client.log_artifacts(run_id, copy, artifact_path)
        return artifact_path, True

    # -- the registry ---------------------------------------------------------------------------
    def _ensure_registered_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
            return
        except MlflowException as exc:
            if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:  # created meanwhile by another process: fine
            if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise

    def _model_versions(self, name: str) -> Iterator[ModelVersion]:
        token: str | None = None
        while True:
            page = self.client.search_model_versions(f"name = {_quoted(name)}", page_token=token)
            yield from page
            token = page.token
            if not token:
                return

    def _find_version(self, name: str, version: int, checkpoint_id: str) -> ModelVersion | None:
        for model_version in self._model_versions(name):
            tags = model_version.tags or {}
            if tags.get(VERSION_TAG) == str(version) and tags.get(CHECKPOINT_ID_TAG) == checkpoint_id:
                return model_version
        return None

    def _source(self, path: str, info: CheckpointInfo) -> tuple[str, str | None]:
        """The model version's source and the MLflow run it came from.

        The checkpoint's artifact when one was logged for it: by this tracker, or by the MLflow run
        of its ckptvault run (this one before a resume, or another process's run in this tracker's
        experiment, as that run's ``ckptvault.checkpoint.<name>`` tag says). Else, when it is this
        run's checkpoint and artifacts are on, it is uploaded now. Else its path as a ``file://`` URI.
        """
        logged = self._logged.get(os.path.realpath(path))
        if logged is None:
            logged = self._logged_by_tag(path, info)
        if logged is not None and logged.checkpoint_id == info.checkpoint_id:
            return logged.artifact_uri or Path(path).resolve().as_uri(), logged.run_id
        ours = self._ckptvault_run_id is not None and info.metadata.get("run_id") == self._ckptvault_run_id
        if ours and self.log_checkpoints == "artifact" and not self._closed and self.run_id is not None:
            artifact_path, _ = self._log_artifact(path, Path(path).name)
            return self._artifact_uri(artifact_path), self.run_id
        return Path(path).resolve().as_uri(), self.run_id if ours else None

    def _logged_by_tag(self, path: str, info: CheckpointInfo) -> _Logged | None:
        """What the MLflow run of the checkpoint's ckptvault run recorded about it, if any."""
        ckptvault_run_id = info.metadata.get("run_id")
        if not isinstance(ckptvault_run_id, str) or not ckptvault_run_id:
            return None
        run: Run | None
        if ckptvault_run_id == self._ckptvault_run_id and self.run_id is not None:
            run = self.client.get_run(self.run_id)
        else:
            experiment_id = self._experiment_id(create=False)
            run = self._find_run(experiment_id, ckptvault_run_id) if experiment_id is not None else None
            if run is None:
                return None
        tag = run.data.tags.get(clean_key(CHECKPOINT_TAG + Path(path).name))
        try:
            record = json.loads(tag) if tag else None
        except ValueError:
            return None
        if not isinstance(record, dict) or record.get("checkpoint_id") != info.checkpoint_id:
            return None
        artifact = record.get("artifact")
        uri = None
        if isinstance(artifact, str):
            uri = f"{str(run.info.artifact_uri).rstrip('/')}/{artifact}"
        return _Logged(info.checkpoint_id, uri, str(run.info.run_id))

    def _set_aliases(self, name: str, version: str, aliases: Sequence[str]) -> None:
        wanted: list[str] = []
        for alias in dict.fromkeys(aliases):
            problem = _alias_problem(alias)
            if problem is not None:
                warnings.warn(f"alias {alias!r} of model {name!r} not set in MLflow: {problem}", stacklevel=3)
            else:
                wanted.append(alias)
        for alias in wanted:
            self.client.set_registered_model_alias(name, alias, version)
        for alias in self.client.get_model_version(name, version).aliases:
            if alias not in wanted:
                self.client.delete_registered_model_alias(name, alias)


def _entity_bytes(entity: Any) -> int:
    return len(str(entity.key).encode()) + len(str(entity.value).encode()) + 32


def _batches(entities: Sequence[Any]) -> Iterator[list[Any]]:
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
