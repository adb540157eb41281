"""The deterministic objective of tests/integrations/test_optuna.py, importable by the subprocess
that is SIGKILLed mid-trial (``python -m tests.integrations.optuna_objective DB ROOT MARKER``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import optuna
import torch

import ckptvault
from ckptvault.integrations.optuna import trial_checkpoints

SEED = 7
STEPS = 8
STUDY = "preempt"


def _data() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = (x @ torch.tensor([1.0, -2.0, 0.5, 3.0])).unsqueeze(1)
    return x[:48], y[:48], x[48:], y[48:]


def objective(trial: optuna.Trial, root: Path, *, kill_marker: Path | None = None, **options: Any) -> float:
    """Full-batch SGD on a 4->1 linear model: bitwise deterministic, so a resumed trial must end
    with the value an uninterrupted one reaches. ``val_acc`` = 1 / (1 + val MSE)."""
    lr = trial.suggest_float("lr", 1e-3, 0.2, log=True)
    momentum = trial.suggest_float("momentum", 0.0, 0.9)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    xt, yt, xv, yv = _data()
    opts = {"every_n_steps": 2, "monitor": "val_acc", "mode": "max", "validate": "checksum", **options}
    acc = 0.0
    with trial_checkpoints(trial, root, **opts) as manager:
        state = ckptvault.TrainState(model=model, optimizer=opt)
        info = manager.restore(state)
        trial.set_user_attr("restored_step", info.step if info else 0)
        while state.step < STEPS:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(xt), yt).backward()  # type: ignore[no-untyped-call]
            opt.step()
            with torch.no_grad():
                acc = 1.0 / (1.0 + torch.nn.functional.mse_loss(model(xv), yv).item())
            manager.step(state, {"val_acc": acc})
            trial.report(acc, state.step)
            if kill_marker is not None and state.step == 5:
                kill_marker.write_text("checkpoint at step 4 committed")
                time.sleep(600)  # the test SIGKILLs us here
            if trial.should_prune():
                raise optuna.TrialPruned()
    return acc


def storage(db: Path) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(
        f"sqlite:///{db}",
        heartbeat_interval=1,
        grace_period=2,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
            inherit_intermediate_values=True
        ),
    )


def main() -> None:
    db, root, marker = (Path(a) for a in sys.argv[1:4])
    study = optuna.load_study(
        study_name=STUDY, storage=storage(db), sampler=optuna.samplers.TPESampler(seed=SEED)
    )
    study.optimize(lambda t: objective(t, root, kill_marker=marker), n_trials=1)


if __name__ == "__main__":
    main()
