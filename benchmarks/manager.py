"""CheckpointManager benchmark: the per-step cost when no save is due, and restore among 1,000 checkpoints.

What is measured (one process, one scratch run directory on the same disk as the other benchmarks):

1. **``manager.step(state)`` when no save is due**, the call a training loop makes after every
   optimizer step. ``TrainState(model=torch.nn.Linear(64, 64))``; a tight loop of ``--calls`` calls
   (200,000 by default) timed with ``time.perf_counter_ns``, reported as ns per call. Rows:
   ``every_n_steps=10**9``; ``every_seconds=3600, keep_last=3`` (a clock read and a time check per
   call); ``every_n_steps=10**9`` with ``metrics={"loss": 1.0}`` passed every call (the metrics
   history grows one row per call, as in a real run). Anchor: the same loop calling an empty Python
   function, i.e. the loop's own overhead. Each row's run directory must still hold no checkpoint
   afterwards (checked), so nothing was saved inside the timed loop.
2. **Restore among 1,000 checkpoints.** A run directory with 1,000 committed checkpoints is built with
   the manager itself (``every_n_steps=1``, no retention, ``TrainState(model=torch.nn.Linear(2, 2))``),
   then closed. Measured: (a) ``CheckpointManager(run_dir)`` construction (lock, run.json rewrite,
   index read and reconciled with the directory listing); (b) ``manager.restore(state)`` in total on an
   already open manager; (c) ``ckptvault.load`` of the newest checkpoint alone. Reported: (b) - (c), the
   "picking" cost (ordering the records, choosing the newest valid one, restoring the state and reading
   its info back). Then, informational: construction after ``.ckptvault-index.json`` is deleted (the
   index rebuilt from 1,000 manifests; page cache warm), and construction again once one more save has
   rewritten the index.

Why it is fair: every timed call gets an untimed warm-up; the garbage collector runs before and is
paused during each timed region; within each repetition the rows alternate and their order rotates
every repetition, so slow drift on a noisy machine hits all of them alike; a fresh TrainState is used
for every step-loop repetition (its history does not accumulate across repetitions); medians of
``--reps`` repetitions are reported with the raw samples.

Usage: ``python benchmarks/manager.py [--calls 200000] [--checkpoints 1000] [--reps 5] [--dir DIR]
[--json OUT]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import fmt_samples, machine_info, md_table, median, remove, rotated, timed, verdict

TARGET_STEP_US = 20.0
TARGET_PICK_MS = 50.0

ANCHOR = "anchor"
STEP_ROWS: dict[str, tuple[str, dict[str, Any], bool]] = {
    # key: (label, manager options, pass metrics every call)
    "n_steps": ("step(state), every_n_steps=10**9", {"every_n_steps": 10**9}, False),
    "seconds": (
        "step(state), every_seconds=3600, keep_last=3",
        {"every_seconds": 3600.0, "keep_last": 3},
        False,
    ),
    "metrics": ("step(state, {'loss': 1.0}), every_n_steps=10**9", {"every_n_steps": 10**9}, True),
}
METRICS = {"loss": 1.0}

CONSTRUCT, RESTORE, LOAD = "construct", "restore", "load"
RESTORE_LABELS = {
    CONSTRUCT: "(a) CheckpointManager(run_dir)",
    RESTORE: "(b) manager.restore(state)",
    LOAD: "(c) ckptvault.load(newest)",
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- 1. step()


def _empty(state: Any) -> None:
    return None


def _loop1(fn: Callable[[Any], Any], state: Any, calls: int) -> int:
    """ns for ``calls`` calls of ``fn(state)``, gc collected before and paused during."""
    rng = range(calls)
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in rng:
            fn(state)
        return time.perf_counter_ns() - start
    finally:
        gc.enable()


def _loop2(fn: Callable[[Any, Any], Any], state: Any, metrics: Mapping[str, Any], calls: int) -> int:
    """As :func:`_loop1`, for ``fn(state, metrics)``."""
    rng = range(calls)
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in rng:
            fn(state, metrics)
        return time.perf_counter_ns() - start
    finally:
        gc.enable()


def phase_step(work: Path, calls: int, reps: int) -> dict[str, list[float]]:
    """ns per call, per row, one sample per repetition."""
    from ckptvault import CheckpointManager, TrainState

    def new_state() -> TrainState:
        return TrainState(model=torch.nn.Linear(64, 64))

    managers = {
        key: CheckpointManager(work / f"step_{key}", **opts) for key, (_, opts, _) in STEP_ROWS.items()
    }
    try:
        warm = max(1, calls // 20)
        for key, (_, _, with_metrics) in STEP_ROWS.items():
            if with_metrics:
                _loop2(managers[key].step, new_state(), METRICS, warm)
            else:
                _loop1(managers[key].step, new_state(), warm)
        _loop1(_empty, new_state(), warm)

        samples: dict[str, list[float]] = {k: [] for k in [ANCHOR, *STEP_ROWS]}
        for rep in range(reps):
            for key in rotated(list(samples), rep):
                state = new_state()
                if key == ANCHOR:
                    elapsed = _loop1(_empty, state, calls)
                elif STEP_ROWS[key][2]:
                    elapsed = _loop2(managers[key].step, state, METRICS, calls)
                else:
                    elapsed = _loop1(managers[key].step, state, calls)
                samples[key].append(elapsed / calls)
                if key != ANCHOR and state.step != calls:
                    raise AssertionError(f"{key}: state.step is {state.step}, expected {calls}")
            log(f"step rep {rep + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.0f} ns" for k, v in samples.items()))
        for key, manager in managers.items():
            if manager.checkpoints():
                raise AssertionError(f"{key}: a checkpoint was saved inside the timed loop")
    finally:
        for manager in managers.values():
            manager.close()
    return samples


# --------------------------------------------------------------------------- 2. restore among N


def build_run(run: Path, count: int) -> float:
    """A run directory with ``count`` committed checkpoints (steps 1..count); returns seconds taken."""
    from ckptvault import CheckpointManager, TrainState

    state = TrainState(model=torch.nn.Linear(2, 2))
    start = time.perf_counter()
    manager = CheckpointManager(run, every_n_steps=1)
    try:
        for i in range(count):
            manager.step(state)
            if (i + 1) % 250 == 0:
                log(f"built {i + 1}/{count} checkpoints ({time.perf_counter() - start:.1f} s)")
        if len(manager.checkpoints()) != count:
            raise AssertionError(
                f"expected {count} checkpoints, the manager lists {len(manager.checkpoints())}"
            )
    finally:
        manager.close()
    return time.perf_counter() - start


def _construct_s(run: Path) -> float:
    from ckptvault import CheckpointManager

    elapsed, manager = timed(lambda: CheckpointManager(run))
    manager.close()
    return elapsed


def phase_restore(run: Path, count: int, reps: int) -> dict[str, list[float]]:
    """ms per call of construction, restore and load of the newest checkpoint."""
    import ckptvault
    from ckptvault import CheckpointManager, TrainState
    from ckptvault.manager import checkpoint_name

    newest = run / checkpoint_name("full", count)

    def restore() -> float:
        manager = CheckpointManager(run)
        try:
            state = TrainState(model=torch.nn.Linear(2, 2))
            elapsed, info = timed(lambda: manager.restore(state))
        finally:
            manager.close()
        if info is None or Path(info.path).name != newest.name or state.step != count:
            raise AssertionError(f"restore picked {info and info.path} (step {state.step}), not {newest}")
        return elapsed

    def load() -> float:
        elapsed, tree = timed(lambda: ckptvault.load(newest))
        if tree["step"] != count:
            raise AssertionError(f"load of {newest} gave step {tree['step']}")
        return elapsed

    fns: dict[str, Callable[[], float]] = {CONSTRUCT: lambda: _construct_s(run), RESTORE: restore, LOAD: load}
    for fn in fns.values():
        fn()  # warm-up
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps):
        for kind in rotated(list(fns), rep):
            samples[kind].append(fns[kind]() * 1000)
    return samples


def phase_rebuild(run: Path, count: int, reps: int) -> dict[str, Any]:
    """Construction without the index (rebuilt from manifests), then with it again after one save."""
    from ckptvault import CheckpointManager, TrainState
    from ckptvault.manager import INDEX_NAME

    index = run / INDEX_NAME
    index.unlink()
    without = [_construct_s(run) * 1000 for _ in range(reps)]
    rewritten_by_open = index.exists()

    # One more save (what a resumed run does first) writes the index again.
    manager = CheckpointManager(run, every_n_steps=1)
    try:
        state = TrainState(model=torch.nn.Linear(2, 2))
        manager.restore(state)
        manager.step(state)
    finally:
        manager.close()
    if not index.exists():
        raise AssertionError("a save did not write the index back")
    _construct_s(run)  # warm-up
    again = [_construct_s(run) * 1000 for _ in range(reps)]
    return {
        "without_index": {"samples": without, "median": median(without)},
        "index_again": {"samples": again, "median": median(again), "checkpoints": count + 1},
        "index_rewritten_by_construction": rewritten_by_open,
    }


# --------------------------------------------------------------------------- report


def report(results: dict[str, Any]) -> tuple[str, list[tuple[str, str, bool]]]:
    """The printed report and the list of (target, measured, ok)."""
    out: list[str] = []
    checks: list[tuple[str, str, bool]] = []

    step = results["step"]
    anchor = step[ANCHOR]["median"]
    rows = [["empty function call (loop overhead)", f"{anchor:.0f}", f"{anchor / 1000:.3f}", "-",
             fmt_samples(step[ANCHOR]["samples"], 0), ""]]  # fmt: skip
    for key, (label, _, _) in STEP_ROWS.items():
        med = step[key]["median"]
        us = med / 1000
        ok = us < TARGET_STEP_US
        checks.append((f"{label}: < {TARGET_STEP_US:g} us per call", f"{us:.2f} us", ok))
        rows.append(
            [
                label,
                f"{med:.0f}",
                f"{us:.3f}",
                f"{(med - anchor) / 1000:.3f}",
                fmt_samples(step[key]["samples"], 0),
                f"< {TARGET_STEP_US:g} us: {verdict(ok)}",
            ]
        )
    out.append(f"## 1. manager.step() when no save is due ({results['args']['calls']:,} calls per sample)\n")
    out.append(md_table(["call", "median ns", "median us", "us minus anchor", "samples ns", "target"], rows))

    restore = results["restore"]
    count = results["checkpoints"]
    rows = []
    for kind, label in RESTORE_LABELS.items():
        rows.append([label, f"{restore[kind]['median']:.2f}", fmt_samples(restore[kind]["samples"], 2), ""])
    pick = restore[RESTORE]["median"] - restore[LOAD]["median"]
    ok = pick < TARGET_PICK_MS
    checks.append(
        (f"restore picking among {count:,} (restore - load) < {TARGET_PICK_MS:g} ms", f"{pick:.2f} ms", ok)
    )
    rows.append(["picking = (b) - (c)", f"{pick:.2f}", "", f"< {TARGET_PICK_MS:g} ms: {verdict(ok)}"])
    rebuild = results["rebuild"]
    no_index = rebuild["without_index"]
    again = rebuild["index_again"]
    rows.append(
        [
            f"(info) CheckpointManager(run_dir), index deleted: rebuilt from {count:,} manifests",
            f"{no_index['median']:.2f}",
            fmt_samples(no_index["samples"], 2),
            "",
        ]
    )
    rows.append(
        [
            f"(info) CheckpointManager(run_dir), index written again ({again['checkpoints']:,} checkpoints)",
            f"{again['median']:.2f}",
            fmt_samples(again["samples"], 2),
            "",
        ]
    )
    out.append(
        f"\n## 2. Restore among {count:,} checkpoints "
        f"(run built in {results['build_s']:.1f} s; page cache warm)\n"
    )
    out.append(md_table(["operation", "median ms", "samples ms", "target"], rows))

    out.append("\n## Acceptance targets\n")
    out.append(md_table(["target", "measured", "verdict"], [[t, m, verdict(ok)] for t, m, ok in checks]))
    return "\n".join(out), checks


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_dir = Path(__file__).resolve().parent / "out"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--calls", type=int, default=200_000, help="step() calls per timed loop")
    p.add_argument("--checkpoints", type=int, default=1000, help="checkpoints in the restore run")
    p.add_argument("--reps", type=int, default=5, help="repetitions of every measurement")
    p.add_argument("--dir", type=Path, default=default_dir, help="parent of the scratch dir (not tmpfs)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write raw samples and medians")
    return p.parse_args(argv)


def summarize(samples: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    return {k: {"samples": v, "median": median(v)} for k, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    info = machine_info(args.dir)
    print("# ckptvault CheckpointManager benchmark\n")
    print(
        f"machine: {info['cores_usable']} usable cores ({info['cores_logical']} logical), "
        f"{info['ram_gib']} GiB RAM, {info['platform']}"
    )
    print(
        f"python {info['python']}, torch {info['torch']} ({info['torch_threads']} threads), "
        f"numpy {info['numpy']}, ckptvault {info['ckptvault']}"
    )
    print(f"scratch filesystem: {info['work_dir_fs']} ({info['work_dir_free_gib']} GiB free)")
    if info["work_dir_fs"] in ("tmpfs", "ramfs"):
        print("WARNING: the scratch dir is in RAM; fsync costs nothing there. Pass --dir on a real disk.")
    print(f"reps {args.reps} (row order rotates each rep), medians reported; gc paused in timed regions\n")

    results: dict[str, Any] = {
        "machine": info,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "checkpoints": args.checkpoints,
    }
    work = Path(tempfile.mkdtemp(prefix="manager_", dir=args.dir))
    try:
        log(f"step loops: {args.calls:,} calls x {args.reps} reps x {len(STEP_ROWS) + 1} rows")
        results["step"] = summarize(phase_step(work, args.calls, args.reps))
        run = work / "run"
        log(f"building a run of {args.checkpoints:,} checkpoints")
        results["build_s"] = build_run(run, args.checkpoints)
        log("restore phase")
        results["restore"] = summarize(phase_restore(run, args.checkpoints, args.reps))
        log("index rebuild phase")
        results["rebuild"] = phase_rebuild(run, args.checkpoints, args.reps)
    finally:
        remove(work)

    text, checks = report(results)
    print(text)
    notes = []
    if not results["rebuild"]["index_rewritten_by_construction"]:
        notes.append(
            "constructing a manager over a run without an index does not write one back: every "
            "construction rebuilds it from the manifests until the next save"
        )
    for note in notes:
        print(f"\nnote: {note}")
    results["notes"] = notes
    results["checks"] = [{"target": t, "measured": m, "ok": ok} for t, m, ok in checks]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"\nraw samples and medians written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
