"""Mixed precision with torch.amp.GradScaler: float16 autocast on CPU and a large initial scale, so
the scaler skips steps and halves its scale, and grows it again after 3 good steps -- state that a
resume must carry exactly (the scaler goes in scaler=)."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

import ckptvault as cv

EPOCHS, BATCH, SAMPLES = 3, 8, 64


def main() -> None:
    torch.manual_seed(4)
    np.random.seed(4)
    random.seed(4)
    data = torch.utils.data.TensorDataset(torch.randn(SAMPLES, 10), torch.randint(0, 3, (SAMPLES,)))
    loader = torch.utils.data.DataLoader(
        data, batch_size=BATCH, shuffle=True, num_workers=2, persistent_workers=True
    )
    model = nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=3)
    state = cv.TrainState(model, optimizer, scaler=scaler, loader=loader)
    with cv.CheckpointManager(every_n_steps=2, keep_last=2) as manager:
        manager.restore(state)
        for _epoch in state.epochs(EPOCHS):
            for x, y in state.batches():
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                manager.step(state, metrics={"loss": loss.item(), "scale": scaler.get_scale()})
        manager.save(state)


if __name__ == "__main__":
    main()
