"""num_workers changes between the killed run and the resumed one: a fresh run loads with 2 workers,
every restart with none (as when a job moves to a smaller machine). The dataset augments with torch's
and numpy's RNGs in __getitem__; seeded loading makes a sample's augmentation independent of where it
is loaded, and loading in the main process leaves the loop's own dropout stream alone. This loop runs
with per-sample seeding (loader_rng="sample"), the rest of the gallery with the per-batch default, so
check-resume covers both."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

import ckptvault as cv

EPOCHS, BATCH, SAMPLES = 3, 8, 64


class Noisy(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(5)
        self.x = torch.randn(SAMPLES, 10, generator=generator)
        self.y = torch.randn(SAMPLES, 1, generator=generator)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale = float(np.random.uniform(0.9, 1.1))
        return self.x[i] * scale + 0.1 * torch.randn(10), self.y[i]


def main() -> None:
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    run_dir = Path(os.environ[cv.manager.RUN_DIR_ENV])
    fresh = not (run_dir.exists() and cv.list_checkpoints(run_dir))
    loader = torch.utils.data.DataLoader(
        Noisy(), batch_size=BATCH, shuffle=True, num_workers=2 if fresh else 0, persistent_workers=fresh
    )
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = cv.TrainState(model, optimizer, loader=loader, loader_rng="sample")
    with cv.CheckpointManager(every_n_steps=2, keep_last=2) as manager:
        manager.restore(state)
        for _epoch in state.epochs(EPOCHS):
            for x, y in state.batches():
                loss = nn.functional.mse_loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                manager.step(state, metrics={"loss": loss.item()})
        manager.save(state)


if __name__ == "__main__":
    main()
