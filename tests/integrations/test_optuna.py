"""ckptvault.integrations.optuna against real Optuna studies: per-trial runs with the trial's
params and ids, ``ckptvault find`` across trials, ``register_best``, pruned trials' retention, and
a trial SIGKILLed mid-run that Optuna's heartbeat + RetryFailedTrialCallback retries: the retry
must resume from the killed trial's checkpoint and the study must end as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from tests.integrations.optuna_objective import SEED, STUDY, objective, storage
from typer.testing import CliRunner

import ckptvault
from ckptvault.catalog.registry import Registry
from ckptvault.cli.main import app
from ckptvault.integrations.optuna import (
    RUN_DIR_ATTR,
    KeepRule,
    register_best,
    run_dir_for,
    trial_checkpoints,
)

REPO = Path(__file__).resolve().parents[2]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _sampler() -> optuna.samplers.TPESampler:
    return optuna.samplers.TPESampler(seed=SEED)


def _steps(run_dir: Path) -> list[int]:
    return sorted(ckptvault.info(p).step for p in ckptvault.list_checkpoints(run_dir))


def test_study_runs_find_and_register_best(tmp_path: Path) -> None:
    root = tmp_path / "study"
    study = optuna.create_study(study_name="s", direction="maximize", sampler=_sampler())
    study.optimize(lambda t: objective(t, root), n_trials=5)

    for trial in study.trials:
        run_dir = root / f"trial_{trial.number:05d}"
        assert trial.user_attrs[RUN_DIR_ATTR] == str(run_dir)
        assert _steps(run_dir) == [2, 4, 6, 8]
        run = json.loads((run_dir / "run.json").read_text())
        config = dict(run["config"])
        ids = config.pop("optuna")
        assert config == trial.params
        assert ids["study_name"] == "s" and ids["trial_number"] == trial.number
        assert ids["trial_id"] == trial._trial_id and ids["study_id"] == study._study_id
        meta = ckptvault.info(ckptvault.list_checkpoints(run_dir)[-1]).metadata
        assert meta["config"]["optuna"]["trial_number"] == trial.number  # in every checkpoint too

    runner = CliRunner()
    result = runner.invoke(app, ["find", str(root), "val_acc > 0 and step = 8", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert sorted(Path(r["path"]).parent.name for r in rows) == [f"trial_{n:05d}" for n in range(5)]
    lr2 = study.trials[2].params["lr"]
    result = runner.invoke(
        app, ["find", str(root), f"config.lr = {lr2!r} and config.optuna.trial_number = 2", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert {Path(r["path"]).parent.name for r in json.loads(result.output)} == {"trial_00002"}

    entry = register_best(study, root, "regressor")
    registered = Registry(root).resolve("regressor", "best")
    assert Path(registered).parent.name == f"trial_{study.best_trial.number:05d}"
    assert entry["step"] == 8
    assert ckptvault.info(registered).metrics["val_acc"] == study.best_value
    by_metric = register_best(study, root, "regressor", alias="top", monitor="val_acc")
    assert by_metric["version"] == 2
    assert ckptvault.info(Registry(root).resolve("regressor", "top")).metrics["val_acc"] >= study.best_value


def test_pruned_trials_keep_only_their_best(tmp_path: Path) -> None:
    root = tmp_path / "study"
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
    study = optuna.create_study(direction="maximize", sampler=_sampler(), pruner=pruner)
    study.optimize(lambda t: objective(t, root), n_trials=6)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert pruned and complete
    for trial in complete:
        assert _steps(run_dir_for(trial, root)) == [2, 4, 6, 8]  # a finished trial keeps them all
    for trial in pruned:
        paths = ckptvault.list_checkpoints(run_dir_for(trial, root))
        assert len(paths) == 1, paths
        saved = {s: v for s, v in trial.intermediate_values.items() if s % 2 == 0}
        assert ckptvault.info(paths[0]).metrics["val_acc"] == max(saved.values())


def test_pruned_keep_none_and_last(tmp_path: Path) -> None:
    cases: list[tuple[KeepRule, list[int]]] = [("none", []), ("last", [8])]
    for rule, expected in cases:

        class Always(optuna.pruners.BasePruner):
            def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
                return trial.last_step == 8

        study = optuna.create_study(sampler=_sampler(), pruner=Always())
        study.optimize(lambda t: objective(t, tmp_path / rule, pruned_keep=rule), n_trials=1)  # noqa: B023
        assert study.trials[0].state == optuna.trial.TrialState.PRUNED
        assert _steps(tmp_path / rule / "trial_00000") == expected


def test_killed_trial_is_retried_from_its_checkpoint(tmp_path: Path) -> None:
    db, root, marker = tmp_path / "study.db", tmp_path / "study", tmp_path / "marker"
    optuna.create_study(study_name=STUDY, storage=storage(db), direction="maximize")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.integrations.optuna_objective", str(db), str(root), str(marker)],
        cwd=REPO,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert worker.poll() is None, "the worker exited before the kill point"
            assert time.monotonic() < deadline, "the worker never reached step 5"
            time.sleep(0.05)
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.wait(timeout=30)
    assert worker.returncode == -signal.SIGKILL
    assert _steps(root / "trial_00000") == [2, 4]
    time.sleep(3.0)  # past the grace period: the killed trial's heartbeat is stale

    n = 3
    study = optuna.load_study(study_name=STUDY, storage=storage(db), sampler=_sampler())
    study.optimize(lambda t: objective(t, root), n_trials=n + 1)
    killed, retry = study.trials[0], study.trials[1]
    assert killed.state == optuna.trial.TrialState.FAIL
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 0
    assert retry.state == optuna.trial.TrialState.COMPLETE
    assert retry.user_attrs["restored_step"] == 4  # continued, not restarted
    assert retry.user_attrs[RUN_DIR_ATTR] == str(root / "trial_00000")
    assert not (root / "trial_00001").exists()
    assert _steps(root / "trial_00000") == [2, 4, 6, 8]

    reference = optuna.create_study(direction="maximize", sampler=_sampler())
    reference.optimize(lambda t: objective(t, tmp_path / "reference"), n_trials=n)
    assert retry.params == reference.trials[0].params
    assert retry.value == reference.trials[0].value  # bitwise: the resume was exact
    assert study.best_value == reference.best_value


def test_importing_ckptvault_does_not_import_optuna() -> None:
    code = "import sys, ckptvault, ckptvault.integrations.optuna; print('optuna' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


def test_bad_rule_and_config_are_refused(tmp_path: Path) -> None:
    trial = optuna.create_study().ask()
    with pytest.raises(ValueError, match="keep rule"), trial_checkpoints(trial, tmp_path, pruned_keep="x"):  # type: ignore[arg-type]
        pass
    with pytest.raises(TypeError, match="config"), trial_checkpoints(trial, tmp_path, config={}):
        pass
    assert not (tmp_path / "trial_00000").exists()  # refused before anything was written
