"""What seeded loading (per batch, per sample) and iterable replay cost (issue 19).

1. Throughput of ``TrainState.batches()`` with per-batch RNG (the default), per-sample RNG and none
   against a
   plain ``DataLoader`` over the same dataset: 3x64x64 uint8 images with torchvision-style random
   transforms written in torch (random resized crop, horizontal flip, brightness/contrast/saturation
   jitter, noise), one epoch per measurement, with 0 and 2 workers. The contenders alternate within
   each repetition; medians.
   Target: overhead <= 3 %.
2. The seeding itself (torch CPU + numpy + random), in microseconds, and one sample's load without it,
   with it before every sample and with it before every 64th, as a worker runs them (rotating chunks:
   the least noisy figures here).
3. Resume latency of the iterable-dataset replay path per 10,000 skipped samples: time to the first
   batch after restoring a position 10,000 samples into an epoch, minus the time to the first batch
   of a fresh epoch; for the image stream above and for a cheap stream of small tensors.

Run: ``.venv/bin/python benchmarks/loader_rng.py [--reps 7] [--json benchmarks/out/loader_rng.json]``
(about 3 minutes on 2 cores). Throughput ratios are medians of per-repetition ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset

import ckptvault as cv
from ckptvault.training.sample_rng import sample_seed, seed_global_rngs

SIZE, BATCH = 64, 64


def augment(image: torch.Tensor) -> torch.Tensor:
    """RandomResizedCrop(64, scale=(0.5, 1)) + RandomHorizontalFlip + ColorJitter(0.4, 0.4, 0.4) +
    Gaussian noise, on one uint8 CHW image, drawing from torch's global RNG as torchvision does."""
    x = image.float().div_(255)
    scale = float(torch.empty(()).uniform_(0.5, 1.0))
    side = max(8, int(SIZE * scale**0.5))
    top, left = (int(v) for v in torch.randint(0, SIZE - side + 1, (2,)))
    x = F.interpolate(x[None, :, top : top + side, left : left + side], size=(SIZE, SIZE), mode="bilinear")[0]
    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    brightness, contrast, saturation = (float(v) for v in torch.empty(3).uniform_(0.6, 1.4))
    x = x * brightness
    mean = x.mean()
    x = (x - mean) * contrast + mean
    gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
    x = (x - gray) * saturation + gray
    x = x + 0.02 * torch.randn_like(x)
    return x.clamp_(0, 1)


class Images(Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, n: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return augment(self.images[i]), i % 10


class ImageStream(IterableDataset[torch.Tensor]):
    def __init__(self, n: int) -> None:
        self.images = Images(n)

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        shard, shards = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(shard, len(self.images), shards):
            yield self.images[i][0]


class SmallStream(IterableDataset[torch.Tensor]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(self.n):
            yield torch.full((16,), float(i))


def _cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the loader's workers are joined at the end
    of each epoch): on a shared machine the steadier measure of the work an epoch costs."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _epoch(batches: Callable[[], Any]) -> tuple[float, float]:
    """(wall, CPU) seconds of one epoch."""
    started, cpu = time.perf_counter(), _cpu_seconds()
    count = 0
    for x, _ in batches():
        count += len(x)
    return time.perf_counter() - started, _cpu_seconds() - cpu


def _ratios(times: dict[str, list[float]], base: str) -> dict[str, float]:
    """The ratio to ``base`` within each repetition (same minute of a noisy machine), then its median."""
    return {
        name: statistics.median(a / b for a, b in zip(t, times[base], strict=True))
        for name, t in times.items()
    }


def throughput(samples: int, workers: int, reps: int) -> dict[str, Any]:
    dataset = Images(samples)

    def loader() -> DataLoader[Any]:
        return DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers)

    def plain() -> Any:
        return iter(loader())

    def with_state(granularity: str) -> Callable[[], Any]:
        return lambda: cv.TrainState(loader=loader(), loader_rng=granularity).batches()

    contenders = {"plain DataLoader": plain, "batches(), per-batch RNG (default)": with_state("batch")}
    contenders["batches(), per-sample RNG"] = with_state("sample")
    contenders['batches(), loader_rng="off"'] = with_state("off")
    _epoch(plain)  # warm-up: page in the images, start the allocator
    times: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    for rep in range(reps):
        names = list(contenders)
        for name in names[rep % len(names) :] + names[: rep % len(names)]:  # rotate the order
            wall, used = _epoch(contenders[name])
            times[name].append(wall)
            cpu[name].append(used)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "workers": workers,
        "samples": samples,
        "seconds": times,
        "cpu_seconds": cpu,
        "median_s": medians,
        "samples_per_s": {name: samples / m for name, m in medians.items()},
        "time_ratio_vs_plain": _ratios(times, "plain DataLoader"),
        "cpu_ratio_vs_plain": _ratios(cpu, "plain DataLoader"),
    }


def worker_side_cost(samples: int, reps: int) -> dict[str, Any]:
    """What seeded loading adds where it runs in a worker: ``dataset[i]`` plain, seeded before every
    sample (``"sample"``) and seeded before every BATCH-th (``"batch"``), in rotating chunks of 256
    samples (median per-sample microseconds, wall and CPU time; ratios are medians of the ratios to
    the plain chunk run next to it)."""
    dataset = Images(samples)
    seeds = [sample_seed(1, i) for i in range(samples)]
    modes = ("plain", "sample", "batch")
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(reps * 4):
        for i0 in range(0, samples, 256):
            chunk = range(i0, min(samples, i0 + 256))
            for mode in modes[rep % 3 :] + modes[: rep % 3]:
                every = {"plain": 0, "sample": 1, "batch": BATCH}[mode]
                started, used = time.perf_counter(), time.process_time()
                for i in chunk:
                    if every and i % every == 0:
                        seed_global_rngs(seeds[i])
                    dataset[i]
                cpu[mode].append((time.process_time() - used) / len(chunk) * 1e6)
                wall[mode].append((time.perf_counter() - started) / len(chunk) * 1e6)
    out: dict[str, Any] = {}
    for mode in modes:
        out[mode] = {
            "us": statistics.median(wall[mode]),
            "cpu_us": statistics.median(cpu[mode]),
            "ratio": statistics.median(q / p for p, q in zip(wall["plain"], wall[mode], strict=True)),
            "cpu_ratio": statistics.median(q / p for p, q in zip(cpu["plain"], cpu[mode], strict=True)),
        }
    return out


def seeding_cost(reps: int) -> float:
    """Microseconds per seed_global_rngs call (median of ``reps`` runs of 20,000)."""
    runs, seeds = [], [sample_seed(1, i) for i in range(20_000)]
    for _ in range(reps):
        started = time.perf_counter()
        for i in range(20_000):
            seed_global_rngs(seeds[i])
        runs.append((time.perf_counter() - started) / 20_000 * 1e6)
    return statistics.median(runs)


def _first_batch_seconds(make: Callable[[], IterableDataset[Any]], workers: int, skip_batches: int) -> float:
    torch.manual_seed(0)
    state = cv.TrainState(loader=DataLoader(make(), batch_size=BATCH, num_workers=workers))
    state.position.epoch_seed = 1
    state.position.batches_done = skip_batches
    state.position.workers = workers
    started = time.perf_counter()
    next(iter(state.batches()))
    return time.perf_counter() - started


def replay(name: str, make: Callable[[], IterableDataset[Any]], workers: int, reps: int) -> dict[str, Any]:
    skip = 10_000 // BATCH  # 156 batches: 9,984 samples
    fresh, skipped = [], []
    for _ in range(reps):
        fresh.append(_first_batch_seconds(make, workers, 0))
        skipped.append(_first_batch_seconds(make, workers, skip))
    cost = (statistics.median(skipped) - statistics.median(fresh)) * 10_000 / (skip * BATCH)
    return {
        "stream": name,
        "workers": workers,
        "first_batch_fresh_s": fresh,
        "first_batch_after_skip_s": skipped,
        "replay_s_per_10k_samples": cost,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one sample at a time per process, as in loader workers
    out: dict[str, Any] = {"torch": torch.__version__, "reps": args.reps}
    out["throughput"] = [throughput(args.samples, w, args.reps) for w in (0, 2)]
    for row in out["throughput"]:
        print(
            f"\nthroughput, {row['workers']} workers, {row['samples']} samples "
            f"of 3x{SIZE}x{SIZE}, batch {BATCH}:"
        )
        for name, median in row["median_s"].items():
            ratio = row["time_ratio_vs_plain"][name]
            print(
                f"  {name:34s} {median:7.3f} s  {row['samples_per_s'][name]:8.0f} samples/s  "
                f"time x{ratio:.3f}  CPU x{row['cpu_ratio_vs_plain'][name]:.3f}"
            )
    out["seed_us_per_sample"] = seeding_cost(args.reps)
    print(f"\nseeding torch+numpy+random per sample: {out['seed_us_per_sample']:.2f} us")
    out["worker_side"] = worker_side_cost(args.samples, args.reps)
    for mode, side in out["worker_side"].items():
        print(
            f"one sample as a worker loads it, seeded {mode:6s}: {side['us']:.0f} us "
            f"(x{side['ratio']:.3f}); CPU {side['cpu_us']:.0f} us (x{side['cpu_ratio']:.3f})"
        )
    out["replay"] = [
        replay("3x64x64 augmented images", lambda: ImageStream(12_000), 2, args.reps),
        replay("16-float tensors", lambda: SmallStream(12_000), 0, args.reps),
    ]
    for row in out["replay"]:
        print(
            f"replay, {row['stream']}, {row['workers']} workers: "
            f"{row['replay_s_per_10k_samples']:.3f} s per 10,000 skipped samples"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
