"""The loop of issue 19: a BatchNorm CNN, AdamW with two parameter groups, warmup+decay LambdaLR built
from functools.partial, bf16 autocast on CPU, gradient clipping and accumulation (2 micro-batches), an
EMA AveragedModel in extras=, and a shuffled 2-worker DataLoader whose dataset draws random flips,
crops and noise from torch, numpy and Python's RNGs in __getitem__."""

from __future__ import annotations

import functools
import math
import random

import numpy as np
import torch
from torch import nn

import ckptvault as cv

EPOCHS, BATCH, SAMPLES, ACCUMULATE = 3, 8, 128, 2


class Images(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(SAMPLES, 3, 8, 8, generator=generator)
        self.labels = torch.randint(0, 4, (SAMPLES,), generator=generator)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        top, left = np.random.randint(0, 3, size=2)
        image = image[:, top : top + 6, left : left + 6]
        image = image * random.uniform(0.8, 1.2) + 0.05 * torch.randn_like(image)
        return image, int(self.labels[i])


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def main() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    loader = torch.utils.data.DataLoader(
        Images(), batch_size=BATCH, shuffle=True, num_workers=2, persistent_workers=True
    )
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=3e-3
    )
    total = EPOCHS * SAMPLES // (BATCH * ACCUMULATE)
    schedule = functools.partial(warmup_cosine, warmup=3, total=total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9)
    )
    state = cv.TrainState(model, optimizer, scheduler, loader=loader, extras={"ema": ema})
    with cv.CheckpointManager(every_n_steps=1, keep_last=2) as manager:
        manager.restore(state)
        for _epoch in state.epochs(EPOCHS):
            for x, y in state.batches():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = nn.functional.cross_entropy(model(x), y) / ACCUMULATE
                loss.backward()
                if state.position.batches_done % ACCUMULATE:
                    continue  # counted from the epoch's start, so it survives a resume
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
                scheduler.step()
                ema.update_parameters(model)
                manager.step(state, metrics={"loss": loss.item()})
            manager.save(state)


if __name__ == "__main__":
    main()
