"""The distributed tests' shared checkpoints: one chain of real multi-rank jobs, run once.

Each rank start costs seconds, so the N->M matrix, the FSDP2 resharding and the single-process
checks share the checkpoints of one chain of five jobs (worlds 1, 2, 4, 1, 2): every job saves what
later jobs load and loads what earlier jobs saved, so every pair of world sizes in {1, 2, 4} is
covered with 1+2+4+1+2 process starts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests.distributed import rank_fns

from ckptvault.testing.ranks import run_ranks

# Seeds of the layout checkpoints: L<world> holds seed <world>; "L4same" is seed 2 saved at world 4.
CHAIN: list[tuple[int, list[tuple[Any, ...]]]] = [
    (1, [("save", "L1", 1)]),
    (2, [("save", "L2", 2), ("load", "L1", 1), ("save_fsdp", "F2")]),
    (
        4,
        [
            ("save", "L4", 4),
            ("save", "L4same", 2),
            ("load", "L1", 1),
            ("load", "L2", 2),
            ("save_fsdp", "F4"),
            ("load_fsdp", "F2", True),
        ],
    ),
    (1, [("load", "L2", 2), ("load", "L4", 4), ("load_fsdp", "F2", False)]),
    (2, [("load", "L4", 4), ("load_fsdp", "F4", True)]),
]


@dataclass
class Chain:
    """The chain's checkpoints (by name) and each op's rank-0 result, keyed (world, op, name)."""

    root: Path
    results: dict[tuple[int, str, str], Any] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)

    def path(self, name: str) -> Path:
        return self.root / "ckpts" / name


@pytest.fixture(scope="session")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    out = Chain(tmp_path_factory.mktemp("chain"))
    (out.root / "ckpts").mkdir()
    for world, ops in CHAIN:
        resolved = [(op, str(out.path(name)), *rest) for op, name, *rest in ops]
        started = time.monotonic()
        outcomes = run_ranks(rank_fns.job, world, resolved, timeout=150, collective_timeout=60)
        out.seconds.append(time.monotonic() - started)
        for (op, name, *_), value in zip(ops, outcomes[0].value, strict=True):
            out.results[(world, op, name)] = value
    return out
