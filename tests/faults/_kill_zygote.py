"""Helper process for test_kill.py (not a test module).

Imports torch and ckptvault once, builds the state, then waits for commands on stdin so the test
does not pay the torch import for every kill:

* ``go <base>``: forks a child that saves ``state`` to ``<run>/step_<base+i:08d>`` for i = 0, 1, ...
  until it is killed; prints ``pid <pid>``, then waits for the child and prints ``dead <status>``.
* ``quit``: exits.

On start it prints ``ready <seconds per save>`` (measured on warm-up saves outside the run dir).
"""

import os
import shutil
import sys
import time

import torch

import ckptvault


def make_state(seed):
    gen = torch.Generator().manual_seed(seed)
    model = {f"layers.{i}.weight": torch.randn(192, 256, generator=gen) for i in range(18)}
    model["embed.weight"] = torch.randn(512, 64, generator=gen).to(torch.bfloat16)
    model["steps"] = torch.arange(1000, dtype=torch.int64)
    return {"model": model, "optimizer": {"lr": 1e-3, "betas": (0.9, 0.999)}, "seed": seed}


def main():
    run_dir, scratch = sys.argv[1], sys.argv[2]
    state = make_state(1234)
    timings = []
    for i in range(4):  # warm caches (system info, git) and measure a save
        target = os.path.join(scratch, f"warm_{i}")
        started = time.perf_counter()
        ckptvault.save(target, state, metadata={"step": i})
        timings.append(time.perf_counter() - started)
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"ready {sorted(timings)[len(timings) // 2]:.6f}", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        base = int(words[1])
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                i = 0
                while True:
                    ckptvault.save(os.path.join(run_dir, f"step_{base + i:08d}"), state)
                    i += 1
            except BaseException as exc:
                print(f"child error: {exc!r}", file=sys.stderr, flush=True)
                code = 3
            os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"dead {status}", flush=True)


if __name__ == "__main__":
    main()
