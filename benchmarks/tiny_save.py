"""The fixed cost of a save: ``ckptvault.save`` of a tiny state vs ``torch.save`` + fsync (issue 18
item 1). ``{"step": 1, "w": torch.zeros(4)}`` saved to fresh paths, ``--per-rep`` saves per
repetition, the two contenders alternating (order flipped every repetition), medians of ms per save.
Usage: ``python benchmarks/tiny_save.py [--reps 5] [--per-rep 30] [--dir DIR]``."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import ckptvault as cv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--per-rep", type=int, default=30)
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tiny-", dir=args.dir))
    state = {"step": 1, "w": torch.zeros(4)}

    def ours(i: int) -> None:
        cv.save(work / f"c{i}", state)

    def theirs(i: int) -> None:
        with open(work / f"t{i}.pt", "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())

    contenders: dict[str, Callable[[int], None]] = {"ckptvault.save": ours, "torch.save + fsync": theirs}
    try:
        for fn in contenders.values():
            fn(-1)  # warm-up: imports, pools, git state
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        for rep in range(args.reps):
            names = list(contenders) if rep % 2 == 0 else list(reversed(contenders))
            for name in names:
                start = time.perf_counter()
                for i in range(rep * args.per_rep, (rep + 1) * args.per_rep):
                    contenders[name](i)
                samples[name].append((time.perf_counter() - start) / args.per_rep * 1e3)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {name: statistics.median(values) for name, values in samples.items()}
    for name, values in samples.items():
        print(f"{name:20s} median {med[name]:.2f} ms/save  runs {' '.join(f'{v:.2f}' for v in values)}")
    print(f"ratio ckptvault / (torch.save + fsync) = {med['ckptvault.save'] / med['torch.save + fsync']:.2f}")


if __name__ == "__main__":
    main()
