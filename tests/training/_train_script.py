"""A small but complete training run for the exact-resume tests (run as a subprocess).

Deterministic CPU ops, dropout, a shuffling 2-worker DataLoader, AdamW + OneCycleLR, gradient
clipping and a GradScaler; checkpoints every 3 steps through CheckpointManager, resumes from the
newest valid one, and at the end saves the complete final state to RUN_DIR/final.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

import ckptvault as cv

EPOCHS, BATCH, SAMPLES = 4, 8, 384


def main() -> None:
    run_dir = Path(os.environ[cv.manager.RUN_DIR_ENV])
    torch.manual_seed(0)
    random.seed(0)  # every RNG is seeded: the two runs must start alike to end alike
    np.random.seed(0)
    torch.use_deterministic_algorithms(True)
    data = torch.utils.data.TensorDataset(torch.randn(SAMPLES, 12), torch.randint(0, 3, (SAMPLES,)))
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True, num_workers=2)
    model = torch.nn.Sequential(
        torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 3)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.05, total_steps=EPOCHS * SAMPLES // BATCH
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    state = cv.TrainState(model, optimizer, scheduler, scaler=scaler, loader=loader)
    with cv.CheckpointManager(run_dir, every_n_steps=3, keep_last=2) as manager:
        manager.restore(state)
        (run_dir / "started").touch()
        for _epoch in state.epochs(EPOCHS):
            for x, y in state.batches():
                loss = torch.nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                manager.step(state, metrics={"loss": loss.item()})
                if manager.should_stop:
                    sys.exit(0)
    cv.save(run_dir / "final", state.capture(), overwrite=True)


if __name__ == "__main__":
    main()
