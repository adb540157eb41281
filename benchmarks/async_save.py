"""Async save benchmark: how long the training loop is blocked, against what it could be.

For the same ~1 GiB state of fp32 tensors as ``save_load.py``, in one process, alternating within
each repetition (medians reported):

* **plain copy**: every tensor's bytes copied into one preallocated, already-touched buffer — the
  floor for any design that snapshots host memory;
* **ckptvault.save_async blocking**: the time until ``save_async`` returns (planning + staging into
  its reused buffer); the background commit is then waited for outside the timed region;
* **ckptvault.save**: the synchronous save (digests, fsync and commit included);
* **torch.distributed.checkpoint.async_save blocking** when it works without a process group.

Targets (from the project's issue): blocking <= 1.5x the plain copy and <= 0.25x the synchronous save.
Usage: ``python benchmarks/async_save.py [--size-mib 1024] [--reps 3] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ckptvault as cv
from _common import MIB, build_state, flatten, machine_info, make_spec, md_table, median, verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("benchmarks/out/async"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    state = build_state(make_spec(args.size_mib * MIB))
    tensors = list(flatten(state).values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    floor = np.empty(nbytes, dtype=np.uint8)
    floor[:] = 1  # touched once, as ckptvault's staging buffer is after its first save

    def plain_copy() -> None:
        cursor = 0
        for t in tensors:
            flat = t.reshape(-1).view(torch.uint8).numpy()
            floor[cursor : cursor + flat.nbytes] = flat
            cursor += flat.nbytes

    cv.save_async(args.dir / "warm", state).wait()  # grows the staging buffer once
    samples: dict[str, list[float]] = {"plain copy": [], "save_async blocking": [], "save (sync)": []}
    dcp = _dcp_async(args.dir)
    if dcp is not None:
        samples["DCP async_save blocking"] = []
    for rep in range(args.reps):
        for name in samples:
            gc.collect()
            gc.disable()
            target = args.dir / f"{name.split()[0]}_{rep}"
            started = time.perf_counter()
            pending: Any = None
            if name == "plain copy":
                plain_copy()
            elif name == "save_async blocking":
                pending = cv.save_async(target, state)
            elif name == "save (sync)":
                cv.save(target, state)
            else:
                pending = dcp(state, target)  # type: ignore[misc]
            samples[name].append(time.perf_counter() - started)
            gc.enable()
            if pending is not None:
                pending.wait() if hasattr(pending, "wait") else pending.result()
            shutil.rmtree(target, ignore_errors=True)
    med = {k: median(v) for k, v in samples.items()}
    info = machine_info(args.dir)
    print(
        f"# async save: {nbytes / 2**30:.2f} GiB, {len(tensors)} tensors, {args.reps} reps; "
        f"{info.get('cores_usable')} cores, torch {torch.__version__}"
    )
    rows = [
        [k, f"{v:.3f}", f"{v / med['plain copy']:.2f}x", ", ".join(f"{x:.3f}" for x in samples[k])]
        for k, v in med.items()
    ]
    print(md_table(["contender", "median s", "vs plain copy", "samples s"], rows))
    blocking = med["save_async blocking"]
    checks = [
        (
            "blocking <= 1.5x plain copy",
            f"{blocking / med['plain copy']:.2f}x",
            blocking <= 1.5 * med["plain copy"],
        ),
        (
            "blocking <= 0.25x sync save",
            f"{blocking / med['save (sync)']:.2f}x",
            blocking <= 0.25 * med["save (sync)"],
        ),
    ]
    print(md_table(["target", "measured", "verdict"], [[t, m, verdict(ok)] for t, m, ok in checks]))
    if args.json:
        args.json.write_text(json.dumps({"samples": samples, "medians": med}, indent=1))
    shutil.rmtree(args.dir, ignore_errors=True)


def _dcp_async(root: Path) -> Any:
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        def run(state: dict[str, Any], target: Path) -> Any:
            return dcp.async_save(state, storage_writer=FileSystemWriter(str(target)), no_dist=True)

        run(flatten({"probe": {"w": torch.ones(2)}}), root / "probe").result()
        return run
    except Exception as exc:
        print(f"note: torch.distributed.checkpoint.async_save omitted: {type(exc).__name__}: {exc}")
        return None


if __name__ == "__main__":
    main()
