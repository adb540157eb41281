"""Mirroring ckptvault's model registry into MLflow's Model Registry.

Why a module of its own: a registration has its own rules (which source a model version gets --
the checkpoint's artifact when one was logged, by this tracker or by another process's run, else
its path; reusing the version of an earlier call; aliases moved to match ckptvault's registry,
which is the truth) that have nothing to do with following a training run. The tracker
(:class:`~ckptvault.integrations.mlflow.MLflowTracker`) inherits :class:`RegistryMirror`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..types import CheckpointInfo
from .mlflow_names import (
    CHECKPOINT_ID_TAG,
    CHECKPOINT_TAG,
    PATH_TAG,
    VERSION_TAG,
    LogCheckpoints,
    alias_problem,
    clean_key,
    error_code,
    is_local_uri,
    quoted,
)
from .mlflow_runs import Logged, MLflowRun

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion


class RegistryMirror(MLflowRun):
    """``on_register`` of the tracker and what it needs (see the module docstring)."""

    log_checkpoints: LogCheckpoints
    _ckptvault_run_id: str | None
    _logged: dict[str, Logged]

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
                if is_local_uri(source) and error_code(exc) == "INVALID_PARAMETER_VALUE":
                    raise ValueError(
                        f"MLflow refused {source} as the source of a version of model {name!r}: an MLflow "
                        "server accepts a local path only inside a run's artifacts. Log the checkpoint as "
                        'an artifact (log_checkpoints="artifact", during its run) or use a file or '
                        "database registry_uri"
                    ) from exc
                raise
        self._set_aliases(name, str(model_version.version), aliases)

    # -- the registry ---------------------------------------------------------------------------
    def _ensure_registered_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
            return
        except MlflowException as exc:
            if error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:  # created meanwhile by another process: fine
            if error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise

    def _model_versions(self, name: str) -> Iterator[ModelVersion]:
        token: str | None = None
        while True:
            page = self.client.search_model_versions(f"name = {quoted(name)}", page_token=token)
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

    def _logged_by_tag(self, path: str, info: CheckpointInfo) -> Logged | None:
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
        return Logged(info.checkpoint_id, uri, str(run.info.run_id))

    def _set_aliases(self, name: str, version: str, aliases: Sequence[str]) -> None:
        wanted: list[str] = []
        for alias in dict.fromkeys(aliases):
            problem = alias_problem(alias)
            if problem is not None:
                warnings.warn(f"alias {alias!r} of model {name!r} not set in MLflow: {problem}", stacklevel=3)
            else:
                wanted.append(alias)
        for alias in wanted:
            self.client.set_registered_model_alias(name, alias, version)
        for alias in self.client.get_model_version(name, version).aliases:
            if alias not in wanted:
                self.client.delete_registered_model_alias(name, alias)
