"""An Optuna study whose trials are ckptvault runs (CPU, a few seconds).

    python examples/optuna_study.py [STUDY_ROOT]

Each trial trains a tiny regressor in ``STUDY_ROOT/trial_<n>``; a pruned trial keeps only its best
checkpoint; the best trial's checkpoint is registered as ``regressor@best``. Afterwards:

    ckptvault find STUDY_ROOT 'val_acc > 0.5' --sort -val_acc
    ckptvault registry history regressor --root STUDY_ROOT
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import optuna
import torch

import ckptvault
from ckptvault.integrations.optuna import register_best, trial_checkpoints

STEPS = 20


def objective(trial: optuna.Trial, root: Path) -> float:
    lr = trial.suggest_float("lr", 1e-3, 0.3, log=True)  # suggest first: the params are the run's config
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = (x @ torch.tensor([1.0, -2.0, 0.5, 3.0])).unsqueeze(1)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    acc = 0.0
    with trial_checkpoints(
        trial, root, every_n_steps=5, keep_last=2, keep_best=1, monitor="val_acc", mode="max"
    ) as mgr:
        state = ckptvault.TrainState(model=model, optimizer=opt)
        mgr.restore(state)  # a retried (killed) trial continues here instead of starting over
        while state.step < STEPS:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x[:192]), y[:192]).backward()  # type: ignore[no-untyped-call]
            opt.step()
            with torch.no_grad():
                acc = 1.0 / (1.0 + torch.nn.functional.mse_loss(model(x[192:]), y[192:]).item())
            mgr.step(state, {"val_acc": acc})
            trial.report(acc, state.step)
            if trial.should_prune():
                raise optuna.TrialPruned()  # its checkpoints are cut to the best one on the way out
    return acc


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="optuna-study-"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="example",
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=0),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=5),
    )
    study.optimize(lambda t: objective(t, root), n_trials=6)
    entry = register_best(study, root, "regressor", monitor="val_acc")
    states = [t.state.name for t in study.trials]
    print(f"trials: {states}; best value {study.best_value:.4f} (trial {study.best_trial.number})")
    print(f"registered regressor v{entry['version']} -> {entry['checkpoint']} under {root}")


if __name__ == "__main__":
    main()
