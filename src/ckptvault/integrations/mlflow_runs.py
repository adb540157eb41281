"""One MLflow run as the tracker uses it: finding it, logging batches to it, checkpoints as its
artifacts.

Why a module of its own: everything here talks to one MLflow run through the tracker's explicit
``MlflowClient`` (never MLflow's global active run), and both the tracker's protocol calls
(:mod:`ckptvault.integrations.mlflow`) and the registry mirroring
(:mod:`ckptvault.integrations.mlflow_registry`) build on it. A chunked checkpoint (incremental or
compressed) is uploaded as a standalone copy (:func:`standalone_copy`), so every artifact loads on
its own.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..types import CheckpointInfo
from .mlflow_names import (
    ARTIFACT_DIR,
    MAX_TAG_VALUE,
    RUN_ID_TAG,
    batches,
    error_code,
    quoted,
    truncate,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, Run, RunTag


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
class Logged:
    checkpoint_id: str
    artifact_uri: str | None
    run_id: str | None


class MLflowRun:
    """The state of the MLflow run a tracker follows and the calls on it (set up by
    :class:`~ckptvault.integrations.mlflow.MLflowTracker`, which inherits this)."""

    client: MlflowClient
    experiment: str | None
    run_id: str | None
    _artifact_root: str
    _closed: bool

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
                if error_code(exc) != "RESOURCE_ALREADY_EXISTS":
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
            filter_string=f"tags.`{RUN_ID_TAG}` = {quoted(ckptvault_run_id)}",
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
        pending += [RunTag(k, truncate(v, MAX_TAG_VALUE)) for k, v in (tags or {}).items()]
        pending += list(metrics)
        for batch in batches(pending):
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
