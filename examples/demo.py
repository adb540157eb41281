"""The `make demo` job: a real training script, preempted and resumed, ends bit-identical.

(a) trains ``examples/plain_loop.py`` to completion in OUT/reference (the uninterrupted run);
(b) starts it again in OUT/preempted and, once a checkpoint exists and training is inside an epoch,
    sends SIGTERM, as a cluster scheduler does: the script must exit 0 and its newest checkpoint must
    be a full one with reason "preemption", taken mid-epoch;
(c) runs the same command again, which resumes at the next unseen batch and finishes;
(d) shows the run with the ``ckptvault`` command (``ls`` with its "kept because" column, ``verify``
    of every checkpoint, ``diff`` of the two final checkpoints) and proves the final state of the
    preempted run (weights, optimizer, scheduler, every RNG, data position, metrics history) equals
    the uninterrupted run's bit for bit;
(e) runs ``examples/seed_recipe.py`` (full state every 10 epochs, weights every epoch, top 3 kept).

Exits non-zero if any proof fails.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ckptvault as cv

EXAMPLES = Path(__file__).resolve().parent
OWN_DIRS = ("reference", "preempted", "seed-recipe", "mlp")  # "mlp": the previous demo's
ENV = {"COLUMNS": "150", **os.environ}  # wide enough for `ckptvault ls` when stdout is not a terminal
SAVED_LINE = re.compile(r"step (\d+) \(epoch (\d+), batch (\d+)/(\d+)\): saved")


class ProofFailed(Exception):
    pass


def check(condition: bool, what: str) -> None:
    if not condition:
        raise ProofFailed(what)
    print(f"   ok: {what}", flush=True)


def train_command(run_dir: Path) -> list[str]:
    return [sys.executable, str(EXAMPLES / "plain_loop.py"), "--run-dir", str(run_dir)]


def run_to_end(run_dir: Path, label: str) -> None:
    child = subprocess.run(train_command(run_dir), env=ENV, capture_output=True, text=True)
    for line in child.stdout.splitlines():
        print(f"   {label}| {line}")
    if child.returncode != 0:
        sys.stderr.write(child.stderr)
    check(child.returncode == 0, f"{label}: exit status 0 (got {child.returncode})")


def preempt(run_dir: Path) -> None:
    """Starts the script and sends SIGTERM once a checkpoint exists and an epoch is well under way."""
    child = subprocess.Popen(train_command(run_dir), env=ENV, stdout=subprocess.PIPE, text=True, bufsize=1)
    assert child.stdout is not None
    sent = False
    for line in child.stdout:
        print(f"   B| {line.rstrip()}", flush=True)
        match = SAVED_LINE.search(line)
        if not sent and match and int(match[2]) >= 1 and 0 < int(match[3]) <= int(match[4]) // 2:
            child.send_signal(signal.SIGTERM)
            sent = True
            print("   >>> SIGTERM", flush=True)
    returncode = child.wait()
    check(sent, "B: SIGTERM was sent while an epoch was under way")
    check(returncode == 0, f"B: exit status 0 after SIGTERM (got {returncode})")


def newest(run_dir: Path) -> cv.CheckpointInfo:
    infos = [cv.info(path) for path in cv.list_checkpoints(run_dir)]
    return max(infos, key=lambda info: (info.step, info.metadata.get("committed_at", 0)))


def cli(*args: str) -> int:
    print(f"\n$ ckptvault {' '.join(args)}", flush=True)
    return subprocess.run([sys.executable, "-m", "ckptvault.cli.main", *args], env=ENV).returncode


def first_difference(a: Any, b: Any, path: str) -> str | None:
    """Where two loaded trees differ: types, keys, order, shapes, dtypes and every bit of every value."""
    if type(a) is not type(b):
        return f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        if list(a) != list(b):
            return f"{path}: keys {list(a)} vs {list(b)}"
        return next((d for k in a if (d := first_difference(a[k], b[k], f"{path}.{k}"))), None)
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: length {len(a)} vs {len(b)}"
        return next(
            (
                d
                for i, (x, y) in enumerate(zip(a, b, strict=True))
                if (d := first_difference(x, y, f"{path}[{i}]"))
            ),
            None,
        )
    if isinstance(a, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        same = torch.equal(
            a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
        )
        return None if same else f"{path}: tensor bits differ"
    if isinstance(a, np.ndarray):
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        return None if a.tobytes() == b.tobytes() else f"{path}: array bits differ"
    if isinstance(a, float):
        return None if struct.pack("<d", a) == struct.pack("<d", b) else f"{path}: {a!r} vs {b!r}"
    return None if a == b else f"{path}: {a!r} vs {b!r}"


def prove_identical(a_path: str, b_path: str) -> None:
    a, b = cv.load(a_path), cv.load(b_path)  # every byte verified on the way
    check(list(a) == list(b), f"same parts in both final checkpoints: {', '.join(a)}")
    for part in a:
        difference = first_difference(a[part], b[part], part)
        if difference is not None:
            raise ProofFailed(f"final states differ at {difference}")
        detail = ""
        if part == "metrics_history":
            detail = f" ({len(a[part]['step'])} rows: {', '.join(a[part]['metrics'])})"
        elif isinstance(a[part], int):
            detail = f" ({a[part]})"
        print(f"   identical: {part}{detail}")


def seed_recipe(run_dir: Path) -> None:
    child = subprocess.run(
        [sys.executable, str(EXAMPLES / "seed_recipe.py"), "--run-dir", str(run_dir)], env=ENV
    )
    check(child.returncode == 0, "seed recipe: exit status 0")
    infos = [cv.info(path) for path in cv.list_checkpoints(run_dir)]
    full = sorted(i.metadata["epoch"] for i in infos if i.metadata["scope"] == "full")
    check(full == [10, 20], f"full-state checkpoints after epochs {full} (every 10 epochs)")
    weights = [i for i in infos if i.metadata["scope"] == "weights"]
    ranked = sorted(weights, key=lambda i: (-i.metrics["val_acc"], -i.step))
    latest = max(weights, key=lambda i: i.step)
    check(
        len(weights) <= 4 and {i.path for i in weights} == {i.path for i in ranked[:3]} | {latest.path},
        f"{len(weights)} weights-only checkpoints left: the top 3 by val_acc and the newest",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo-runs"))
    parser.add_argument("--skip-seed-recipe", action="store_true")
    args = parser.parse_args()
    for name in OWN_DIRS:
        shutil.rmtree(args.out / name, ignore_errors=True)  # the demo's own directories only
    a, b = args.out / "reference", args.out / "preempted"
    started = time.monotonic()
    try:
        print(f"(a) the uninterrupted reference run -> {a}", flush=True)
        run_to_end(a, "A")

        print(f"\n(b) the same script in {b}, preempted with SIGTERM mid-epoch", flush=True)
        preempt(b)
        info = newest(b)
        tree = cv.load(info.path)
        config = info.metadata["config"]
        per_epoch = math.ceil(config["samples"] / config["batch"])
        done = tree["data"]["batches_done"]
        name = Path(info.path).name
        check(info.metadata["reason"] == "preemption", f"newest checkpoint {name}: reason 'preemption'")
        check(tree["scope"] == "full" and "optimizer" in tree and "rng" in tree, f"{name} is a full state")
        check(0 < done < per_epoch, f"{name} is mid-epoch: epoch {tree['epoch']}, batch {done}/{per_epoch}")

        print(f"\n(c) the same command again: resumes from {name}", flush=True)
        run_to_end(b, "B")

        print("\n(d) the run from the shell, and the proof", flush=True)
        failures = cli("ls", str(b))
        failures |= cli("verify", *cv.list_checkpoints(a), *cv.list_checkpoints(b))
        final_a, final_b = newest(a), newest(b)
        failures |= cli("diff", final_a.path, final_b.path)
        check(failures == 0, "ckptvault ls, verify and diff succeeded")
        print(f"\ncomparing {final_a.path} with {final_b.path} bit for bit:")
        prove_identical(final_a.path, final_b.path)
        print(
            f"PASS: preempted at step {info.step} (epoch {tree['epoch']}, batch {done}/{per_epoch}) and "
            f"resumed; final state at step {final_b.step} bit-identical to the uninterrupted run",
            flush=True,
        )

        if not args.skip_seed_recipe:
            print(f"\n(e) the seed recipe -> {args.out / 'seed-recipe'}", flush=True)
            seed_recipe(args.out / "seed-recipe")
    except (ProofFailed, cv.CheckpointError) as exc:
        print(f"\nFAIL: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"\nall proofs passed in {time.monotonic() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
