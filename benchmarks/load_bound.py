"""What bounds a full load without verification (issue 18 item 4): ``load(verify=False)`` against
``safetensors.load_file`` and against the floor of the same work done bare.

The state: ``--tensors`` fp32 tensors of 5 MiB (1 GiB by default), saved once by each library, page
cache warm (the files were just written). Every contender's result has one element per 4 KiB page of
every tensor read inside the timed region (as in save_load.py), so mapped memory pays its page
faults like copied memory pays its copy. Contenders, alternating (order rotated), medians:

- ``safetensors load_file``: views of a shared mapping of the file (nothing copied);
- ``ckptvault.load(mmap=True, verify=False)``: the same kind of result (copy-on-write views);
- ``ckptvault.load(verify=False)``: the default kind of result, private memory that no later change
  to the file can alter;
- floor of that: one ``readinto`` of the whole data file into a fresh private buffer (no parsing, no
  tensors), which is what returning private memory costs at the least: the kernel must fault in and
  fill every fresh page.

Usage: ``python benchmarks/load_bound.py [--tensors 200] [--reps 7] [--dir DIR]``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import ckptvault as cv
from _common import median, rotated, touch_pages

ELEMENTS = 5 * 1024 * 1024 // 4  # 5 MiB of fp32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=200)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="load-bound-", dir=args.dir))
    try:
        state = {f"t{i}": torch.randn(ELEMENTS) for i in range(args.tensors)}
        cv.save(work / "ckpt", state)
        save_file(state, str(work / "s.safetensors"))
        (data,) = (work / "ckpt").glob("data-*.safetensors")
        del state

        def floor() -> dict[str, torch.Tensor]:
            buffer = torch.empty(data.stat().st_size, dtype=torch.uint8)
            with open(data, "rb", buffering=0) as handle:
                handle.readinto(memoryview(buffer.numpy()))
            return {"all": buffer}

        contenders: dict[str, Callable[[], Any]] = {
            "safetensors load_file (views)": lambda: load_file(str(work / "s.safetensors")),
            "ckptvault load(mmap=True, verify=False)": lambda: cv.load(
                work / "ckpt", mmap=True, verify=False
            ),
            "ckptvault load(verify=False) (private)": lambda: cv.load(work / "ckpt", verify=False),
            "floor: readinto a fresh buffer (private)": floor,
        }
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        for fn in contenders.values():
            touch_pages(fn())  # warm-up
        for rep in range(args.reps):
            for name in rotated(list(contenders), rep):
                start = time.perf_counter()
                touch_pages(contenders[name]())
                samples[name].append((time.perf_counter() - start) * 1e3)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gib = args.tensors * ELEMENTS * 4 / 2**30
    print(f"full load of {gib:.2f} GiB ({args.tensors} tensors), warm page cache, every page touched:")
    med = {name: median(values) for name, values in samples.items()}
    for name, values in samples.items():
        print(f"  {name:42s} {med[name]:8.1f} ms   runs {' '.join(f'{v:.0f}' for v in values)}")
    safe = med["safetensors load_file (views)"]
    print(f"mmap=True / load_file = {med['ckptvault load(mmap=True, verify=False)'] / safe:.2f}")
    print(f"verify=False / load_file = {med['ckptvault load(verify=False) (private)'] / safe:.2f}")
    floor_ms = med["floor: readinto a fresh buffer (private)"]
    print(f"verify=False / its floor = {med['ckptvault load(verify=False) (private)'] / floor_ms:.2f}")


if __name__ == "__main__":
    main()
