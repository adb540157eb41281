"""A GAN: two models and two optimizers (model={"gen": ..., "disc": ...}), noise drawn from torch's
global RNG in the loop, a shuffled loader of "real" samples."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

import ckptvault as cv

EPOCHS, BATCH, SAMPLES, LATENT = 3, 8, 64, 4


def main() -> None:
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    real = torch.utils.data.TensorDataset(torch.randn(SAMPLES, 6) * 0.5 + 2.0)
    loader = torch.utils.data.DataLoader(real, batch_size=BATCH, shuffle=True)
    gen = nn.Sequential(nn.Linear(LATENT, 16), nn.ReLU(), nn.Linear(16, 6))
    disc = nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.Dropout(0.2), nn.Linear(16, 1))
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.999))
    state = cv.TrainState(
        model={"gen": gen, "disc": disc}, optimizer={"gen": opt_g, "disc": opt_d}, loader=loader
    )
    bce = nn.functional.binary_cross_entropy_with_logits
    with cv.CheckpointManager(every_n_steps=2, keep_last=2) as manager:
        manager.restore(state)
        for _epoch in state.epochs(EPOCHS):
            for (x,) in state.batches():
                fake = gen(torch.randn(len(x), LATENT))
                loss_d = bce(disc(x), torch.ones(len(x), 1)) + bce(
                    disc(fake.detach()), torch.zeros(len(x), 1)
                )
                opt_d.zero_grad()
                loss_d.backward()
                opt_d.step()
                loss_g = bce(disc(fake), torch.ones(len(x), 1))
                opt_g.zero_grad()
                loss_g.backward()
                opt_g.step()
                manager.step(state, metrics={"loss_d": loss_d.item(), "loss_g": loss_g.item()})
        manager.save(state)


if __name__ == "__main__":
    main()
