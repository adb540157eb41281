"""Small models for the export tests, importable by name (``tests.models_for_export:Name``) so
that a checkpoint can record them as its architecture and ``load_model`` can rebuild them."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Linear, batch norm (an int64 buffer among the float weights), ReLU, linear."""

    def __init__(self, in_features: int = 4, hidden: int = 8, out_features: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


class TiedLM(nn.Module):
    """A token model whose output head shares the embedding's weight (tied weights)."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


class TwoHeads(nn.Module):
    """Two inputs, a dict of two outputs whose insertion order is not sorted order."""

    def __init__(self, dim: int = 5) -> None:
        super().__init__()
        self.a = nn.Linear(dim, 2)
        self.b = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"z_sum": self.b(x + y), "a_diff": self.a(x - y)}
