"""The fixed cost of a save: ``ckptvault.save`` of a tiny state vs ``torch.save`` + fsync (issue 18
item 1). ``{"step": 1, "w": torch.zeros(4)}`` saved to fresh paths, ``--per-rep`` saves per
repetition, the contenders alternating (order rotated every repetition), medians of ms per save.

Two more contenders measure the bound: ``torch.save`` made atomic and durable the usual way (temp
file, fsync, rename, fsync of the directory: what ckptvault's crash model asks of every save), and
the floor of a checkpoint *directory* committed that way in bare ``os`` calls (mkdir a staging dir,
write and fsync a data file and a manifest, fsync the staging dir, rename it into place, fsync the
parent; no encoding, no hashing, no locks). ``ckptvault.save`` / floor says how close the library
is to what its own crash model costs on this disk.
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
from _common import fsync_path


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

    def theirs_atomic(i: int) -> None:
        temp = work / f".a{i}.pt.tmp"
        with open(temp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, work / f"a{i}.pt")
        fsync_path(work)

    def floor(i: int) -> None:
        staging = work / f".f{i}.staging"
        os.mkdir(staging)
        for name, size in (("data-00000.safetensors", 96), ("manifest.json", 600)):
            fd = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, b"x" * size)
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_path(staging)
        os.rename(staging, work / f"f{i}")
        fsync_path(work)

    contenders: dict[str, Callable[[int], None]] = {
        "ckptvault.save": ours,
        "torch.save + fsync": theirs,
        "torch.save atomic": theirs_atomic,
        "floor: dir commit": floor,
    }
    try:
        for fn in contenders.values():
            fn(-1)  # warm-up: imports, pools, git state
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        for rep in range(args.reps):
            names = list(contenders)
            names = names[rep % len(names) :] + names[: rep % len(names)]
            for name in names:
                start = time.perf_counter()
                for i in range(rep * args.per_rep, (rep + 1) * args.per_rep):
                    contenders[name](i)
                samples[name].append((time.perf_counter() - start) / args.per_rep * 1e3)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {name: statistics.median(values) for name, values in samples.items()}
    for name, values in samples.items():
        print(f"{name:22s} median {med[name]:.2f} ms/save  runs {' '.join(f'{v:.2f}' for v in values)}")
    ours_ms = med["ckptvault.save"]
    for name in list(contenders)[1:]:
        print(f"ratio ckptvault / ({name}) = {ours_ms / med[name]:.2f}")


if __name__ == "__main__":
    main()
