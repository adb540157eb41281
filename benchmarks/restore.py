"""End-to-end restore of a model + AdamW training state: ``CheckpointManager.restore`` vs the usual
``torch.load`` + ``load_state_dict`` (issue 18 item 4).

The state: an MLP of ``--model-mib`` MiB of fp32 parameters (``_models.MLP``), stepped once with
AdamW so its two moment buffers exist (about 3x the model in all). Saved once each way, untimed:

- **ckptvault**: ``CheckpointManager(run).save(TrainState(model, optimizer))`` (verified, atomic).
- **torch**: ``torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)``.

Timed, alternating the two in every repetition (order rotated), each on a freshly built model and
optimizer whose tensors already exist (so neither side pays for allocating the model):

- **ckptvault**: ``CheckpointManager(run)`` (lock, index) + ``manager.restore(state)`` -- every byte
  digest-checked, RNG and counters restored too -- + ``close()``;
- **torch**: ``torch.load(f, weights_only=True, mmap=False)`` + ``model.load_state_dict`` +
  ``optimizer.load_state_dict`` (nothing checked).

Warm page cache by default (both files were just written and read once); with ``--cold`` (root,
``/proc/sys/vm/drop_caches`` writable) caches are dropped before each timed load. Both results are
compared tensor by tensor with the saved state once per run. Ratio printed: torch time / ours (> 1:
ckptvault is faster). Usage::

    python benchmarks/restore.py [--model-mib 1024] [--reps 5] [--cold] [--dir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ckptvault as cv
from _common import machine_info
from _models import MLP

HIDDEN = 4096


def build(model_mib: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """An MLP of about ``model_mib`` MiB of fp32 parameters and its AdamW, stepped once."""
    layer_bytes = (HIDDEN * HIDDEN + HIDDEN) * 4
    depth = max(2, round(model_mib * 2**20 / layer_bytes))
    torch.manual_seed(seed)
    model = MLP(HIDDEN, HIDDEN, depth, HIDDEN)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as fh:
        fh.write("3\n")


def same(a: Any, b: Any, what: str) -> None:
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and torch.equal(a, b)):
            raise AssertionError(f"{what}: tensors differ")
    elif isinstance(a, dict):
        if set(a) != set(b):
            raise AssertionError(f"{what}: keys differ")
        for k in a:
            same(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{what}[{i}]")
    elif a != b:
        raise AssertionError(f"{what}: {a!r} != {b!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-mib", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="restore-", dir=args.dir))
    try:
        model, optimizer = build(args.model_mib, seed=0)
        expected = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        state_bytes = sum(
            t.numel() * t.element_size()
            for t in [*expected["model"].values()]
            + [v for s in expected["optimizer"]["state"].values() for v in s.values()]
            if isinstance(t, torch.Tensor)
        )
        run, torch_file = work / "run", work / "state.pt"
        manager = cv.CheckpointManager(run)
        manager.save(cv.TrainState(model=model, optimizer=optimizer))
        manager.close()
        with open(torch_file, "wb") as fh:
            torch.save(expected, fh)
            fh.flush()
            os.fsync(fh.fileno())
        # The timed restores overwrite a second model/optimizer pair, built once (allocation is not
        # what is compared), with other values so a no-op restore would be caught.
        target_model, target_opt = build(args.model_mib, seed=1)

        def ours() -> None:
            m = cv.CheckpointManager(run)
            try:
                if m.restore(cv.TrainState(model=target_model, optimizer=target_opt)) is None:
                    raise AssertionError("nothing restored")
            finally:
                m.close()

        def theirs() -> None:
            loaded = torch.load(torch_file, weights_only=True, mmap=False)
            target_model.load_state_dict(loaded["model"])
            target_opt.load_state_dict(loaded["optimizer"])

        contenders: dict[str, Callable[[], None]] = {"ckptvault": ours, "torch": theirs}
        for name, fn in contenders.items():  # warm-up and correctness, untimed
            fn()
            same(expected["model"], target_model.state_dict(), f"{name} model")
            same(expected["optimizer"], target_opt.state_dict(), f"{name} optimizer")
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        for rep in range(args.reps):
            order = list(contenders) if rep % 2 == 0 else list(reversed(contenders))
            for name in order:
                if args.cold:
                    drop_caches()
                gc.collect()
                gc.disable()
                start = time.perf_counter()
                contenders[name]()
                samples[name].append(time.perf_counter() - start)
                gc.enable()
        med = {name: statistics.median(values) for name, values in samples.items()}
        ratio = med["torch"] / med["ckptvault"]
        gib = state_bytes / 2**30
        print(f"state {gib:.2f} GiB (model {args.model_mib} MiB + AdamW), reps {args.reps}, "
              f"{'cold' if args.cold else 'warm'} page cache")  # fmt: skip
        for name, values in samples.items():
            runs = " ".join(f"{v:.3f}" for v in values)
            print(f"{name:10s} median {med[name]:.3f} s  ({gib / med[name]:.2f} GiB/s)  runs {runs}")
        print(f"torch.load + load_state_dict time / manager.restore time = {ratio:.2f}x")
        result = {
            "machine": machine_info(args.dir),
            "args": {k: str(v) for k, v in vars(args).items()},
            "state_bytes": state_bytes,
            "samples": samples,
            "median": med,
            "ratio_torch_over_ours": ratio,
        }
        out = args.json or args.dir / f"restore{'_cold' if args.cold else ''}.json"
        out.write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
