"""Module-level models for the validation and architecture tests.

They live in an importable module (``tests.models_for_validation``) because full validation and
``load_model`` rebuild the model in another process from a recorded ``module:Class`` reference.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch
from torch import nn

import ckptvault as cv


class MLP(nn.Module):
    """A small MLP with a BatchNorm (buffers, an int64 counter) and a Dropout (eval mode matters)."""

    def __init__(self, sizes: list[int], bias: bool = True) -> None:
        super().__init__()
        self.sizes = list(sizes)
        self.layers = nn.ModuleList(
            nn.Linear(a, b, bias=bias) for a, b in zip(self.sizes[:-1], self.sizes[1:], strict=True)
        )
        self.norm = nn.BatchNorm1d(self.sizes[1])
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == 0:
                x = self.norm(x)
            if i < len(self.layers) - 1:
                x = self.drop(torch.tanh(x))
        return x


class DeclaredMLP(MLP):
    """Declares its own constructor arguments: no ``model_kwargs`` needed."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__(sizes)
        self.ckptvault_kwargs = {"sizes": list(sizes)}


class TwoHeads(nn.Module):
    """Returns a tuple of outputs (full validation compares every one)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Linear(width, width)
        self.a = nn.Linear(width, 2)
        self.b = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.body(x))
        return self.a(h), self.b(h)


@cv.model_factory
def make_mlp(sizes: list[int]) -> MLP:
    """A marked factory function: a checkpoint may name it."""
    return MLP(sizes)


def unmarked_factory(sizes: list[int]) -> MLP:
    """Not marked with @model_factory: a checkpoint naming it must be refused."""
    return MLP(sizes)


def trained_mlp(sizes: list[int], seed: int = 0, steps: int = 3) -> MLP:
    """An MLP after a few SGD steps (so BatchNorm's running stats are not the defaults)."""
    torch.manual_seed(seed)
    model = MLP(sizes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        loss = model(torch.randn(16, sizes[0])).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def output_of(model: Any, probe: torch.Tensor) -> torch.Tensor:
    """The model's eval-mode output, single-threaded (as validation computes it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.eval()
        with torch.no_grad():
            return model(probe)
    finally:
        torch.set_num_threads(threads)


class Misbehaving(nn.Module):
    """A model that misbehaves when it is rebuilt in a process other than ``home`` (the one that made
    it), i.e. inside a validation child: it logs its pid, prints, aborts or sleeps. It tests how the
    validation server contains what a model's own code does."""

    def __init__(self, width: int, action: str = "", arg: str = "", home: int = 0) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        # load_model builds every model twice: on the meta device to check shapes without memory,
        # then for real; the misbehaviour belongs to the real one (one per validation).
        if os.getpid() == home or self.lin.weight.is_meta:
            return
        if action == "log_pid":
            with open(arg, "a", encoding="utf-8") as log:
                log.write(f"{os.getpid()} {os.getppid()}\n")
        elif action == "print":
            print(arg, flush=True)
            print(arg, file=sys.stderr, flush=True)
        elif action == "abort":
            print("about to abort", file=sys.stderr, flush=True)
            os.abort()
        elif action == "sleep":
            time.sleep(float(arg))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)
