"""Models for the benchmarks, in an importable module (not ``__main__``).

Full validation rebuilds the model in a separate process from the factory reference recorded in the
checkpoint (``_models:MLP`` here, with its constructor kwargs). That process gets the parent's
``sys.path`` as ``PYTHONPATH``; a script run as ``python benchmarks/<name>.py`` has ``benchmarks/``
first on its path, so this module is importable there too.
"""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """``depth`` fp32 Linear layers with GELU between them: in -> hidden x (depth - 1) -> out."""

    def __init__(self, in_features: int, hidden: int, depth: int, out_features: int) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError("depth must be at least 2")
        dims = [in_features, *([hidden] * (depth - 1)), out_features]
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < depth - 1:
                layers.append(nn.GELU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


def mlp_params(in_features: int, hidden: int, depth: int, out_features: int) -> int:
    """The parameter count of ``MLP(...)`` without building it."""
    dims = [in_features, *([hidden] * (depth - 1)), out_features]
    return sum(dims[i] * dims[i + 1] + dims[i + 1] for i in range(depth))
