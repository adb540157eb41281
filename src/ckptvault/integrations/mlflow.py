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

The code is split by job: :mod:`ckptvault.integrations.mlflow_names` (MLflow's limits, keys,
parameters, tags, batches), :mod:`ckptvault.integrations.mlflow_runs` (the MLflow run: finding it,
logging to it, checkpoints as artifacts), :mod:`ckptvault.integrations.mlflow_registry` (the Model
Registry mirroring) and this module (:class:`MLflowTracker`, the protocol calls; every old name is
still importable from here).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..types import CheckpointInfo
from .mlflow_names import ARTIFACT_DIR as ARTIFACT_DIR
from .mlflow_names import CHECKPOINT_ID_TAG as CHECKPOINT_ID_TAG
from .mlflow_names import (
    CHECKPOINT_TAG,
    INSTALL_HINT,
    RUN_ID_TAG,
    LogCheckpoints,
    alias_problem,
    batches,
    clean_key,
    config_params,
    import_mlflow,
    metric_value,
    run_tags,
)
from .mlflow_names import MAX_ALIAS as MAX_ALIAS
from .mlflow_names import MAX_BATCH_BYTES as MAX_BATCH_BYTES
from .mlflow_names import MAX_ENTITIES_PER_BATCH as MAX_ENTITIES_PER_BATCH
from .mlflow_names import MAX_KEY as MAX_KEY
from .mlflow_names import MAX_PARAM_VALUE as MAX_PARAM_VALUE
from .mlflow_names import MAX_PARAMS_PER_BATCH as MAX_PARAMS_PER_BATCH
from .mlflow_names import MAX_TAG_VALUE as MAX_TAG_VALUE
from .mlflow_names import MAX_TAGS_PER_BATCH as MAX_TAGS_PER_BATCH
from .mlflow_names import PATH_TAG as PATH_TAG
from .mlflow_names import VERSION_TAG as VERSION_TAG
from .mlflow_registry import RegistryMirror
from .mlflow_runs import Logged, standalone_copy
from .mlflow_runs import needs_store as needs_store

if TYPE_CHECKING:
    from mlflow import MlflowClient

# The old private names stay importable from here: tests/integrations/test_mlflow.py imports them.
_alias_problem = alias_problem
_batches = batches

__all__ = ["INSTALL_HINT", "MLflowTracker", "config_params", "standalone_copy"]


class MLflowTracker(RegistryMirror):
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
        mlflow = import_mlflow()
        self.client: MlflowClient = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
        self.experiment = experiment
        self.run_name = run_name
        self.log_checkpoints: LogCheckpoints = log_checkpoints
        self.resume = resume
        self.run_id: str | None = None
        self._ckptvault_run_id: str | None = None
        self._artifact_root = ""
        self._logged: dict[str, Logged] = {}
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
            value = metric_value(raw)
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
        self._logged[os.path.realpath(path)] = Logged(info.checkpoint_id, artifact_uri, self.run_id)

    def close(self, status: str = "FINISHED") -> None:
        """Ends the MLflow run (``status``: ``FINISHED``, ``FAILED`` or ``KILLED``). Idempotent."""
        if self.run_id is not None and not self._closed:
            self.client.set_terminated(self.run_id, status)
        self._closed = True

    def __enter__(self) -> MLflowTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self.close("FINISHED" if exc_type is None else "FAILED")
