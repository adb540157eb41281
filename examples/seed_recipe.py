"""The recipe ckptvault was started for, as written:

    "a full state checkpoint every 10 epochs and a weights-only checkpoint every epoch,
     automatically deleting any checkpoint not in the top 3 by validation accuracy"

Two scopes on one run directory: the manager's own settings are the full-state stream (every 10
epochs, nothing deleted), ``weights=Scope(...)`` a weights-only stream saved every epoch after
evaluation, of which only the 3 best by ``val_acc`` (and the newest, which restore would load) are
kept. At the end it prints ``ckptvault ls`` of the run, whose "kept because" column says why each
checkpoint is still there.

    python examples/seed_recipe.py --run-dir runs/seed-recipe
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import ckptvault

EPOCHS = 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=None, help="default: $CKPTVAULT_RUN_DIR")
    args = parser.parse_args()
    run_dir = args.run_dir or Path(os.environ.get("CKPTVAULT_RUN_DIR", "runs/seed-recipe"))

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(7)  # a small, noisy 3-class problem
    x = torch.randn(3072, 16, generator=generator)
    y = (x[:, :3] + 0.8 * torch.randn(3072, 3, generator=generator)).argmax(dim=1)
    train = torch.utils.data.TensorDataset(x[:1024], y[:1024])
    x_val, y_val = x[1024:], y[1024:]
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5 * len(loader), gamma=0.5)

    manager = ckptvault.CheckpointManager(
        run_dir,
        every_n_epochs=10,  # full state (optimizer, scheduler, RNGs, data position) every 10 epochs
        weights=ckptvault.Scope(every_n_epochs=1, keep_best=3, monitor="val_acc", mode="max"),
        config={"epochs": EPOCHS, "lr": 3e-3, "batch": 64},
    )
    state = ckptvault.TrainState(model=model, optimizer=opt, scheduler=sched, loader=loader)
    manager.restore(state)
    for epoch in state.epochs(EPOCHS):
        for xb, yb in state.batches():
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            manager.step(state, metrics={"loss": loss.item()})
            if manager.should_stop:
                break
        if manager.should_stop:
            manager.close()
            return 0
        model.eval()
        with torch.no_grad():
            acc = (model(x_val).argmax(dim=1) == y_val).float().mean().item()
        model.train()
        manager.save(state, metrics={"val_acc": acc}, scope="weights")  # weights-only, ranked by val_acc
        print(f"epoch {epoch:2d}: val_acc {acc:.4f}", flush=True)
    manager.wait()
    manager.close()

    print(f"\n$ ckptvault ls {run_dir}", flush=True)
    env = {"COLUMNS": "150", **os.environ}
    return subprocess.run(
        [sys.executable, "-m", "ckptvault.cli.main", "ls", str(run_dir)], env=env
    ).returncode


if __name__ == "__main__":
    sys.exit(main())
