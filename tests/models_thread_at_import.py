"""A model whose module starts a thread when imported: forking a process after that is unsafe
(a lock that thread holds would stay held forever in the child), so the validation server must not
fork after importing it."""

from __future__ import annotations

import threading

import torch
from torch import nn

_STOP = threading.Event()
threading.Thread(target=_STOP.wait, name="started-at-import", daemon=True).start()


class Threaded(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)
