"""Lightning fit with VaultCheckpointIO vs Lightning's default (torch.save) checkpointing.

Both runs are the same tiny deterministic fit (tests/integrations/lightning_fit_script.py) with
ModelCheckpoint(every_n_train_steps=EVERY, save_top_k=2, save_last=True); each rep runs both, in
alternating order, in this one process (imports paid once); the figure is
median(vault wall) / median(default wall). Then, to show what bounds the ratio, one save of the
same fit's checkpoint dict through each CheckpointIO alone: wall time and CPU time of the whole
process (every thread, kernel time included), medians of 100. Usage::

    .venv/bin/python -m benchmarks.lightning_overhead [--reps 5] [--steps 200] [--every 10]
        [--hidden 512] [--async]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
import warnings

import lightning as L
from tests.integrations.lightning_fit_script import TinyModule, loader, make_trainer

from ckptvault.integrations.lightning import VaultCheckpointIO


def one_fit(root: str, steps: int, every: int, hidden: int, vault: bool, async_save: bool) -> float:
    """Wall seconds of one fit (trainer construction included, imports not)."""
    L.seed_everything(0, workers=True)
    start = time.perf_counter()
    plugin = VaultCheckpointIO(async_save=async_save) if vault else None
    trainer = make_trainer(root, steps, plugin, every)
    trainer.fit(TinyModule(hidden=hidden), loader(n=256))
    return time.perf_counter() - start


def per_save_cost(hidden: int, saves: int = 100) -> dict[str, tuple[float, float]]:
    """(wall ms, CPU ms) of one ``save_checkpoint`` of a real fit's checkpoint dict, per plugin."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    root = tempfile.mkdtemp(prefix="lt-io-")
    try:
        trainer = make_trainer(root, 20, None, 10)
        trainer.fit(TinyModule(hidden=hidden), loader(n=256))
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(False)
        out: dict[str, tuple[float, float]] = {}
        for name, plugin in (("default", TorchCheckpointIO()), ("vault", VaultCheckpointIO())):
            walls, cpus = [], []
            for i in range(saves + 5):
                wall, cpu = time.perf_counter(), time.process_time()
                plugin.save_checkpoint(checkpoint, f"{root}/{name}-{i % 3}.ckpt")
                if i >= 5:  # the first saves warm up imports and pools
                    walls.append(time.perf_counter() - wall)
                    cpus.append(time.process_time() - cpu)
            out[name] = (statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3)
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--async", dest="async_save", action="store_true")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    times: dict[str, list[float]] = {"vault": [], "default": []}
    for rep in range(args.reps + 1):  # rep 0 warms both paths up and is not counted
        order = ["vault", "default"] if rep % 2 else ["default", "vault"]
        for name in order:
            root = tempfile.mkdtemp(prefix=f"lt-{name}-")
            try:
                took = one_fit(root, args.steps, args.every, args.hidden, name == "vault", args.async_save)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            if rep:
                times[name].append(took)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"steps={args.steps} every={args.every} hidden={args.hidden} async={args.async_save} reps={args.reps}"
    )
    for name, values in times.items():
        print(f"{name:8s} median {med[name]:.3f}s  runs {' '.join(f'{t:.3f}' for t in values)}")
    print(f"ratio vault/default = {med['vault'] / med['default']:.3f}")
    for name, (wall, cpu) in per_save_cost(args.hidden).items():
        print(f"one save_checkpoint, {name:8s} wall {wall:.2f} ms  CPU (all threads) {cpu:.2f} ms")


if __name__ == "__main__":
    main()
