"""Optuna studies with ckptvault runs: one checkpoint run per trial, resumable, prunable, findable.

::

    from ckptvault.integrations.optuna import trial_checkpoints, register_best

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-3, 1e-1, log=True)    # suggest first: params -> config
        with trial_checkpoints(trial, "studies/s1", keep_last=2, keep_best=1,
                               monitor="val_acc", mode="max") as manager:
            state = ckptvault.TrainState(model=model, optimizer=opt)
            manager.restore(state)          # a retried trial continues where the killed one stopped
            while state.step < 100:
                ...; acc = evaluate()
                manager.step(state, {"val_acc": acc})
                trial.report(acc, state.step)
                if trial.should_prune():
                    raise optuna.TrialPruned()
        return acc

* **One run per trial**: ``<study_root>/trial_<number:05d>`` is an ordinary
  :class:`~ckptvault.CheckpointManager` run. Its ``config`` (``run.json`` and every checkpoint's
  metadata) is the trial's params plus an ``optuna`` entry naming the study (name, id) and the trial
  (number, id), so ``ckptvault find ROOT 'config.lr < 0.01 and val_acc > 0.9'`` works across
  trials. The trial gets the user attribute ``ckptvault_run_dir``: Optuna's record says where its
  checkpoints are. Params suggested after the run opened are not in its config (suggest first).
* **Retried trials continue the original run**: a trial that :class:`optuna.storages.
  RetryFailedTrialCallback` created for a stale (killed) one opens the run directory of the first
  trial of its retry history, so ``manager.restore`` resumes from that run's newest valid
  checkpoint. Continuing in place rather than copying: a copy would cost a full checkpoint's I/O,
  would have to pick one checkpoint to copy (restore already picks the newest that *verifies*),
  and would leave two runs that claim the same training; the run's ``run.json`` notes each
  resume, and the run lock (released when the killed process died) keeps one writer.
  Retried trials do not get the failed trial's ``trial.report`` values unless the callback has
  ``inherit_intermediate_values=True``.
* **Ended trials' retention**: when the ``with`` block ends with :class:`optuna.TrialPruned`,
  ``pruned_keep`` decides what stays: ``"best"`` (default: the best checkpoint by the manager's
  ``monitor``, else the newest), ``"last"``, ``"best+last"`` or ``"none"``. A pruned trial is
  never continued by Optuna, so the newest checkpoint has no resume value; the best one is the
  evidence of how far the configuration got. When it ends with another exception, ``failed_keep``
  (default ``"last"``) decides: the newest valid checkpoint is what a retry or a debugger needs. A
  process killed mid-trial never reaches this point and keeps everything (a retry needs it).
  Checkpoints pinned with ``manager.pin`` or registered are never deleted.
* :func:`register_best` registers the best trial's best (or newest) checkpoint in the registry at
  the study root.

Optuna is imported only inside these functions: importing ckptvault does not import it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..catalog.registry import Registry
from ..errors import CheckpointError
from ..manager.core import CheckpointManager
from ..types import CheckpointInfo

if TYPE_CHECKING:
    import optuna

__all__ = [
    "INSTALL_HINT",
    "RUN_DIR_ATTR",
    "KeepRule",
    "original_trial_number",
    "register_best",
    "run_dir_for",
    "trial_checkpoints",
    "trial_config",
]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ckptvault[optuna]'"
RUN_DIR_ATTR = "ckptvault_run_dir"
RESUMED_FROM_ATTR = "ckptvault_resumed_from_trial"
CONFIG_KEY = "optuna"
KeepRule = Literal["best", "last", "best+last", "none"]
_RULES = ("best", "last", "best+last", "none")


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError as exc:  # pragma: no cover - the extra is installed in the test env
        raise ImportError(f"ckptvault.integrations.optuna needs Optuna: {INSTALL_HINT}") from exc
    return optuna


def _system_attrs(trial: Any) -> Mapping[str, Any]:
    """A trial's system attributes: a ``FrozenTrial`` has them; a live ``Trial`` (Optuna 5 has
    no public accessor) reads them from its storage, where the retry callback wrote them."""
    attrs = getattr(trial, "system_attrs", None)
    if isinstance(attrs, Mapping):
        return attrs
    storage, trial_id = getattr(trial, "storage", None), getattr(trial, "_trial_id", None)
    if storage is None or trial_id is None:
        return {}
    found = storage.get_trial_system_attrs(trial_id)
    return found if isinstance(found, Mapping) else {}


def original_trial_number(trial: optuna.trial.BaseTrial) -> int:
    """The number of the trial whose run this trial continues: the first of its retry history
    (``RetryHeartbeatStaleTrialCallback``, formerly ``RetryFailedTrialCallback``, appends every
    failed attempt), else its own number. A retry of a retry thus lands in the first attempt's run."""
    attrs = _system_attrs(trial)
    history = attrs.get("retry_history")
    if isinstance(history, list) and history:
        return int(history[0])
    failed = attrs.get("failed_trial")
    return int(failed) if failed is not None else int(trial.number)


def run_dir_for(trial: optuna.trial.BaseTrial, study_root: str | os.PathLike[str]) -> Path:
    """``<study_root>/trial_<number:05d>`` for the trial's original number (see
    :func:`original_trial_number`); zero-padded so that listings sort in trial order."""
    return Path(study_root) / f"trial_{original_trial_number(trial):05d}"


def _study_of(trial: Any) -> Any:
    return getattr(trial, "study", None)


def trial_config(trial: optuna.trial.BaseTrial) -> dict[str, Any]:
    """The run's config: the trial's params, and under ``"optuna"`` the study's name and id and
    the trial's number and id (ids are the storage's; Optuna keeps them private, read defensively)."""
    params = dict(trial.params)
    if CONFIG_KEY in params:
        raise ValueError(f"a param named {CONFIG_KEY!r} would collide with the run's Optuna record")
    study = _study_of(trial)
    return {
        **params,
        CONFIG_KEY: {
            "study_name": getattr(study, "study_name", None),
            "study_id": getattr(study, "_study_id", None),
            "trial_number": trial.number,
            "trial_id": getattr(trial, "_trial_id", None),
            "original_trial_number": original_trial_number(trial),
        },
    }


def _check_same_study(run_dir: Path, config: Mapping[str, Any]) -> None:
    """Refuses to continue a run that another study wrote: two studies sharing a root would
    otherwise resume each other's trials (same numbers, different params)."""
    try:
        record = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return  # a fresh run (or one the manager will report on itself)
    previous = (record.get("config") or {}).get(CONFIG_KEY) or {}
    ours = config[CONFIG_KEY]
    if previous.get("study_name") not in (None, ours["study_name"]):
        raise ValueError(
            f"{run_dir} belongs to study {previous.get('study_name')!r}, not {ours['study_name']!r}:"
            " give each study its own root"
        )


def _keep_names(manager: CheckpointManager, rule: str) -> set[str]:
    """Names of the checkpoints ``rule`` keeps (empty for ``"none"``)."""
    keep: set[str] = set()
    latest = manager.latest()
    best = manager.best() or latest
    if rule in ("best", "best+last") and best is not None:
        keep.add(Path(best.path).name)
    if rule in ("last", "best+last") and latest is not None:
        keep.add(Path(latest.path).name)
    return keep


def _apply_end_rule(manager: CheckpointManager, rule: str) -> list[str]:
    """Deletes the run's checkpoints that ``rule`` does not keep; returns their names. Pinned
    and registered checkpoints stay (the manager refuses them, and they are skipped here)."""
    manager.wait()
    keep = _keep_names(manager, rule)
    deleted = []
    for record in manager.checkpoints():
        if record.name in keep or record.pinned:
            continue
        try:
            manager.delete(record.name)
        except CheckpointError as exc:  # registered meanwhile, or gone: never a reason to fail the trial
            log.info("keeping %s: %s", record.name, exc)
            continue
        deleted.append(record.name)
    return deleted


@contextlib.contextmanager
def trial_checkpoints(
    trial: optuna.trial.BaseTrial,
    study_root: str | os.PathLike[str],
    *,
    pruned_keep: KeepRule = "best",
    failed_keep: KeepRule = "last",
    **manager_options: Any,
) -> Iterator[CheckpointManager]:
    """A :class:`~ckptvault.CheckpointManager` for this trial's run (see the module doc); every
    keyword but the two rules goes to the manager (``keep_last=``, ``monitor=``, ``validate=``, ...;
    ``config`` is the trial's). On exit the manager waits for its saves and closes; a pruned or
    failed trial's checkpoints are then reduced to what ``pruned_keep``/``failed_keep`` keep."""
    optuna = _import_optuna()
    for rule in (pruned_keep, failed_keep):
        if rule not in _RULES:
            raise ValueError(f"keep rule {rule!r}: one of {', '.join(_RULES)}")
    if "config" in manager_options:
        raise TypeError("the run's config is the trial's params: suggest them before opening the run")
    run_dir = run_dir_for(trial, study_root)
    config = trial_config(trial)
    _check_same_study(run_dir, config)
    trial.set_user_attr(RUN_DIR_ATTR, str(run_dir))
    original = original_trial_number(trial)
    if original != trial.number:
        trial.set_user_attr(RESUMED_FROM_ATTR, original)
    manager = CheckpointManager(run_dir, config=config, **manager_options)
    try:
        yield manager
    except optuna.TrialPruned:
        _apply_end_rule(manager, pruned_keep)
        raise
    except Exception:
        with contextlib.suppress(Exception):  # the objective's own error is the one to report
            _apply_end_rule(manager, failed_keep)
        raise
    finally:
        manager.close()


def _checkpoints_of(run_dir: Path) -> list[CheckpointInfo]:
    from ..api import info, list_checkpoints

    found = [info(path) for path in list_checkpoints(run_dir)]
    return [c for c in found if c.metadata.get("scope", "full") == "full"] or found


def register_best(
    study: optuna.study.Study,
    study_root: str | os.PathLike[str],
    name: str,
    *,
    alias: str | None = "best",
    monitor: str | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    """Registers the best trial's checkpoint as the next version of ``name`` in the registry at
    ``study_root`` (so it is pinned: retention never deletes it) and points ``alias`` at it.

    With ``monitor`` the checkpoint whose metric ``monitor`` is best in the study's direction is
    chosen (the checkpoint that scored the trial's value, when the objective returns that metric),
    else the trial's newest. Returns the registry's version entry."""
    optuna = _import_optuna()
    best = study.best_trial
    run_dir = Path(best.user_attrs.get(RUN_DIR_ATTR) or run_dir_for(best, study_root))
    checkpoints = _checkpoints_of(run_dir)
    if not checkpoints:
        raise FileNotFoundError(f"trial {best.number}'s run {run_dir} has no committed checkpoint")
    if monitor is None:
        chosen = max(checkpoints, key=lambda c: c.step)
    else:
        scored = [c for c in checkpoints if isinstance(c.metrics.get(monitor), int | float)]
        if not scored:
            raise ValueError(f"no checkpoint of trial {best.number} recorded the metric {monitor!r}")
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        sign = 1.0 if maximize else -1.0
        chosen = max(scored, key=lambda c: (sign * float(c.metrics[monitor]), c.step))
    why = note or f"study {study.study_name!r}: trial {best.number}, value {best.value}"
    return Registry(study_root).register(name, chosen.path, alias=alias, note=why)
