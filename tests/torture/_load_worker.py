"""Helper processes for test_load.py (not a test module): real processes, because the run lock,
the chunk store lock and the staging sweep are per-process mechanisms that threads cannot exercise.

Every mode prints one JSON line on stdout (its report) and synchronizes through files in a
``sync`` directory (``touch`` / wait-for-file), never through sleeps:

``writers <run> <sync> <worker> <rounds> <free_sessions> <keep_last>``
    One of two processes sharing one run directory (scenario 1). First ``rounds`` handed-over rounds
    (round r belongs to worker r % 2, the other must be refused while it holds the run), then
    ``free_sessions`` sessions in a free race for the lock. Every session restores the latest
    checkpoint, saves again at that very step (an identical step number, overwriting the other
    writer's checkpoint) and then two more steps. Commits are stamped with CLOCK_MONOTONIC, which
    is one clock for every process of the machine, so the test can order both logs.

``inc-writer <run> <sync> <saves> <keep_last> <chunk_bytes>``
    Incremental saves with retention (scenario 2); waits for the readers' and the collector's
    ``ready`` files after its first save, so they really run while it saves.
``reader <run> <sync> <id>`` / ``gc <run> <sync>``
    Load listed checkpoints / run ``collect_garbage`` in a loop until ``<sync>/done`` exists.

``soak <run> <saves> <keep_last> <async 0|1> <warmup> <traced>``
    Many small saves through one manager; reports descriptors, threads, RSS and tracemalloc growth.
"""

from __future__ import annotations

import gc
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np

import ckptvault
from ckptvault import CheckpointError, CheckpointManager, CheckpointNotFoundError, ConcurrentWriteError

BOX_FLOATS = 512  # a few KB per state: the soak and the writers measure overhead, not bandwidth


class Box:
    """A stateful object for ``TrainState(extras=...)``: its state is whatever the test puts in."""

    def __init__(self, state: dict | None = None) -> None:
        self.state = state or {}

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def box_state(writer: int, step: int) -> dict:
    """The state writer ``writer`` saves at ``step``: anyone can recompute it from the two numbers."""
    rng = np.random.default_rng([writer, step])
    return {
        "writer": writer,
        "step": step,
        "w": rng.standard_normal(BOX_FLOATS).astype(np.float32),
        "b": rng.integers(-(2**40), 2**40, size=16),
    }


def same(a: object, b: object) -> bool:
    """Bit-for-bit equality of nested numpy/torch states (torch only if the state holds any)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.tobytes() == b.tobytes()
        )
    if type(a).__module__ == "torch" or type(b).__module__ == "torch":
        return (
            type(a) is type(b)
            and a.dtype == b.dtype  # type: ignore[attr-defined]
            and a.shape == b.shape  # type: ignore[attr-defined]
            and a.numpy().tobytes() == b.numpy().tobytes()  # type: ignore[attr-defined]
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


def touch(path: Path, text: str = "") -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # the file appears with its content, never empty


def wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {path}")
        time.sleep(0.0005)


def step_of(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


# -- scenario 1: two writers on one run ----------------------------------------------------------
def _open(run: Path, keep_last: int) -> CheckpointManager:
    return CheckpointManager(run, every_n_steps=1, keep_last=keep_last)


def _session(manager: CheckpointManager, worker: int, log: list) -> None:
    """Restore the latest, save again at that step (as this writer), then two more steps."""
    box = Box()
    state = ckptvault.TrainState(extras={"box": box})
    opened = time.monotonic_ns()
    info = manager.restore(state)
    restored = None
    if info is not None:
        got = box.state
        consistent = (
            isinstance(got, dict)
            and got.get("step") == state.step
            and same(got, box_state(int(got.get("writer", -1)), state.step))
        )
        restored = {"name": Path(info.path).name, "writer": got.get("writer"), "ok": bool(consistent)}
        box.state = box_state(worker, state.step)
        manager.save(state)  # the identical step number: overwrites the other writer's checkpoint
        log.append(["commit", Path(info.path).name, worker, time.monotonic_ns()])
    log.append(["open", opened, restored])
    for _ in range(2):
        box.state = box_state(worker, state.step + 1)
        saved = manager.step(state)
        if saved is None:
            raise AssertionError(f"every_n_steps=1 did not save at step {state.step}")
        log.append(["commit", Path(saved.path).name, worker, time.monotonic_ns()])


def writers(run: Path, sync: Path, worker: int, rounds: int, free_sessions: int, keep_last: int) -> dict:
    log: list = []
    handover_refusals: list[str] = []
    unexpected_opens = 0
    for r in range(rounds):
        if r % 2 == worker:
            if r:
                wait_for(sync / f"released.{r - 1}")
            manager = _open(run, keep_last)
            try:
                touch(sync / f"held.{r}", str(os.getpid()))
                wait_for(sync / f"tried.{r}")
                _session(manager, worker, log)
            finally:
                manager.close()
            touch(sync / f"released.{r}")
        else:
            wait_for(sync / f"held.{r}")
            holder = (sync / f"held.{r}").read_text()
            try:
                intruder = _open(run, keep_last)
            except ConcurrentWriteError as exc:
                handover_refusals.append(f"{holder}|{exc}")
            else:
                unexpected_opens += 1
                intruder.close()
            touch(sync / f"tried.{r}")
            wait_for(sync / f"released.{r}")
    touch(sync / f"free.{worker}")
    wait_for(sync / f"free.{1 - worker}")
    free_refusals = other_errors = sessions = 0
    errors: list[str] = []
    while sessions < free_sessions:
        try:
            manager = _open(run, keep_last)
        except ConcurrentWriteError:
            free_refusals += 1
            os.sched_yield()  # let the holder run; the lock, not this yield, orders the writers
            continue
        except CheckpointError as exc:  # any other error while opening is a finding
            other_errors += 1
            errors.append(f"{type(exc).__name__}: {exc}")
            if other_errors > 5:
                break
            continue
        try:
            _session(manager, worker, log)
        finally:
            manager.close()
        sessions += 1
    return {
        "log": log,
        "handover_refusals": handover_refusals,
        "unexpected_opens": unexpected_opens,
        "free_refusals": free_refusals,
        "other_errors": errors,
    }


# -- scenario 2: writer + readers + garbage collector --------------------------------------------
INC_FLOATS = 8192  # 32 KiB per array: two chunks of 16 KiB each
FROZEN_EVERY = 10  # the torch tensor changes in place every 10 steps, else the hint cache skips it


def inc_state(step: int) -> dict:
    """What the incremental writer saves at ``step``: shared, half-shared and fresh chunks."""
    const = np.random.default_rng(7).standard_normal(INC_FLOATS).astype(np.float32)
    fresh = np.random.default_rng([9, step]).standard_normal(INC_FLOATS).astype(np.float32)
    return {
        "step": step,
        "const": const,  # the same chunks every step: deduplicated, live as long as any checkpoint
        "moving": fresh,  # new chunks every step: garbage once retention deleted the checkpoint
        "half": np.concatenate([const[: INC_FLOATS // 2], fresh[INC_FLOATS // 2 :]]),
    }


def frozen_tensor(step: int):  # a torch.Tensor: torch is imported only by the modes that need it
    import torch

    generator = torch.Generator().manual_seed(1000 + step // FROZEN_EVERY)
    return torch.randn(INC_FLOATS, generator=generator)


def inc_writer(run: Path, sync: Path, saves: int, keep_last: int, chunk_bytes: int) -> dict:
    import torch

    box = Box()
    state = ckptvault.TrainState(extras={"box": box})
    frozen = frozen_tensor(1)
    started = time.perf_counter()
    with CheckpointManager(
        run, every_n_steps=1, keep_last=keep_last, incremental=True, chunk_bytes=chunk_bytes
    ) as manager:
        for step in range(1, saves + 1):
            if step % FROZEN_EVERY == 0:
                with torch.no_grad():
                    frozen.copy_(frozen_tensor(step))  # in place: bumps the version counter
            box.state = {**inc_state(step), "frozen": frozen}
            if manager.step(state) is None:
                raise AssertionError(f"no save at step {step}")
            if step == 1:
                for name in ("ready.reader0", "ready.reader1", "ready.gc"):
                    wait_for(sync / name)
        hints = manager._hints
        report = {
            "saves": saves,
            "hint_hits": hints.hits if hints else 0,
            "hint_misses": hints.misses if hints else 0,
        }
    report["seconds"] = time.perf_counter() - started
    touch(sync / "done")
    return report


def expected_inc(step: int) -> dict:
    return {**inc_state(step), "frozen": frozen_tensor(step)}


def reader(run: Path, sync: Path, ident: int) -> dict:
    rng = random.Random(ident)
    loads = vanished = 0
    corrupt: list[str] = []
    done = sync / "done"
    while not done.exists():
        names = ckptvault.list_checkpoints(run)
        if not names:
            continue
        path = names[-1] if rng.random() < 0.5 else rng.choice(names)
        step = step_of(Path(path).name)
        try:
            tree = ckptvault.load(path)
        except CheckpointNotFoundError:
            vanished += 1  # deleted by retention after we listed it: legal
            continue
        except CheckpointError as exc:
            corrupt.append(f"{Path(path).name}: {type(exc).__name__}: {exc}")
            continue
        got = tree.get("extras", {}).get("box") if isinstance(tree, dict) else None
        if tree.get("step") != step or not same(got, expected_inc(step)):
            corrupt.append(f"{Path(path).name}: loaded a state that was never saved under that name")
        loads += 1
        if loads == 1:
            touch(sync / f"ready.reader{ident}")
    return {"loads": loads, "vanished": vanished, "corrupt": corrupt[:20], "n_corrupt": len(corrupt)}


def collector(run: Path, sync: Path) -> dict:
    from ckptvault.engine.gc import collect_garbage

    passes = deleted = 0
    done = sync / "done"
    while not done.exists():
        report = collect_garbage(run)
        passes += 1
        deleted += report.deleted_chunks
        if passes == 1:
            touch(sync / "ready.gc")
    return {"passes": passes, "deleted_chunks": deleted}


# -- scenario 4: the soak ------------------------------------------------------------------------
def own_threads() -> int:
    """Live threads other than the process's shared I/O pools (``ckptvault.storage.pools``), which
    are started once and kept by design: those are counted apart and must stay within the pools'
    sizes, whatever the number of saves."""
    from ckptvault.storage.pools import SIZES

    prefixes = tuple(f"ckptvault-{kind}_" for kind in SIZES)
    return sum(1 for thread in threading.enumerate() if not thread.name.startswith(prefixes))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def soak(run: Path, saves: int, keep_last: int, async_save: bool, warmup: int, traced: int) -> dict:
    """``saves`` saves; RSS is sampled after ``warmup`` saves and before the last ``traced`` ones,
    which run under tracemalloc (it slows a save several times, so it watches a window only: a leak
    of one object per save shows there as a site that gained about ``traced`` blocks)."""
    import tracemalloc

    import psutil

    if not 0 < warmup < saves - traced:
        raise SystemExit(f"soak: need 0 < warmup ({warmup}) < saves - traced ({saves - traced})")
    process = psutil.Process()
    gc.collect()
    base_fds, base_threads = open_fds(), own_threads()
    box = Box()
    state = ckptvault.TrainState(extras={"box": box})
    samples: dict[str, dict] = {}

    def sample(label: str, manager: CheckpointManager) -> None:
        manager.wait_validation()  # nothing in flight: what remains is what the manager keeps
        gc.collect()
        samples[label] = {
            "rss": process.memory_info().rss,
            "fds": open_fds(),
            "threads": own_threads(),
            "at": time.perf_counter(),
        }

    manager = CheckpointManager(run, every_n_steps=1, keep_last=keep_last, async_save=async_save)
    started = time.perf_counter()
    first = middle = None
    for step in range(1, saves + 1):
        box.state = box_state(0, step)
        manager.step(state)
        if step == warmup:
            sample("warm", manager)
        if step == saves - traced:
            sample("untraced_end", manager)
            tracemalloc.start()
            first = tracemalloc.take_snapshot()
        if step == saves - traced // 2:
            manager.wait_validation()
            gc.collect()
            middle = tracemalloc.take_snapshot()
    sample("end", manager)
    last = tracemalloc.take_snapshot()
    tracemalloc.stop()
    growth = last.compare_to(first, "lineno") if first is not None else []
    # A leak grows in both halves of the window; a free list that filled up (CPython keeps freed
    # floats, tuples and dicts for reuse, still counted as allocated where they were first made)
    # grows in the first half only.
    halves = {str(s.traceback): [s.count_diff, 0] for s in middle.compare_to(first, "lineno")}
    for s in last.compare_to(middle, "lineno"):
        halves.setdefault(str(s.traceback), [0, 0])[1] = s.count_diff
    steady = sorted(([site, *counts] for site, counts in halves.items()), key=lambda r: -min(r[1], r[2]))
    records = len(manager.checkpoints())
    manager.close()
    del manager
    gc.collect()
    warm, mid, end = samples["warm"], samples["untraced_end"], samples["end"]
    return {
        "saves": saves,
        "seconds": time.perf_counter() - started,
        "ms_per_save_untraced": 1000 * (mid["at"] - warm["at"]) / max(1, saves - traced - warmup),
        "base_fds": base_fds,
        "warm_fds": warm["fds"],
        "end_fds": end["fds"],
        "closed_fds": open_fds(),
        "base_threads": base_threads,
        "warm_threads": warm["threads"],
        "end_threads": end["threads"],
        "closed_threads": own_threads(),
        "pool_threads": len(threading.enumerate()) - own_threads(),
        "rss_growth_mb": (mid["rss"] - warm["rss"]) / 2**20,
        "top_growth": [[str(s.traceback), s.size_diff, s.count_diff] for s in growth[:8]],
        "steady_growth": steady[:8],  # [site, blocks gained in the first half, in the second half]
        "traced_growth_bytes": sum(s.size_diff for s in growth),
        "records": records,
    }


def main(argv: list[str]) -> None:
    mode, run, *rest = argv
    if mode == "writers":
        sync, worker, rounds, free, keep = rest
        out = writers(Path(run), Path(sync), int(worker), int(rounds), int(free), int(keep))
    elif mode == "inc-writer":
        sync, saves, keep, chunk = rest
        out = inc_writer(Path(run), Path(sync), int(saves), int(keep), int(chunk))
    elif mode == "reader":
        sync, ident = rest
        os.nice(10)  # the writer keeps its core on a small machine; the others still overlap it
        out = reader(Path(run), Path(sync), int(ident))
    elif mode == "gc":
        (sync,) = rest
        os.nice(10)
        out = collector(Path(run), Path(sync))
    elif mode == "soak":
        saves, keep, async_save, warmup, traced = rest
        out = soak(Path(run), int(saves), int(keep), async_save == "1", int(warmup), int(traced))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
