"""Gradient accumulation (4 micro-batches per optimizer step) with a time trigger (every_seconds).

The decision (README, "making your loop exact"): a save happens only at an optimizer step, because
``manager.step`` is where triggers are checked and it is called once per optimizer step; the time
trigger that fires mid-accumulation therefore waits for the accumulation boundary, and partial
gradients are never saved. A run killed mid-accumulation resumes at the last boundary saved and loads
those micro-batches again (the data position counts micro-batches, a multiple of 4 at every save)."""

from __future__ import annotations

import random
import time

import numpy as np
import torch
from torch import nn

import ckptvault as cv

EPOCHS, BATCH, SAMPLES, ACCUMULATE = 3, 4, 96, 4


def main() -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(SAMPLES, 16), torch.randn(SAMPLES, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state = cv.TrainState(model, optimizer, loader=loader)
    with cv.CheckpointManager(every_seconds=0.05, keep_last=2) as manager:
        manager.restore(state)
        for _epoch in state.epochs(EPOCHS):
            for x, y in state.batches():
                loss = nn.functional.mse_loss(model(x), y) / ACCUMULATE
                loss.backward()
                time.sleep(0.004)  # a micro-batch takes time, so the time trigger fires mid-epoch
                if state.position.batches_done % ACCUMULATE:
                    continue
                optimizer.step()
                optimizer.zero_grad()
                manager.step(state, metrics={"loss": loss.item()})
        manager.save(state)


if __name__ == "__main__":
    main()
