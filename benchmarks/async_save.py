"""Async save benchmark: how long the training loop is blocked, against what it could be.

For the same ~1 GiB state of fp32 tensors as ``save_load.py``, in one process, alternating within
each repetition (medians reported):

* **plain copy**: every tensor's bytes copied into one preallocated, already-touched buffer — the
  floor for any design that snapshots host memory;
* **ckptvault.save_async blocking**: the time until ``save_async`` returns (planning + staging into
  its reused buffer); the background commit is then waited for outside the timed region;
* **ckptvault.save**: the synchronous save (digests, fsync and commit included);
* **torch.distributed.checkpoint.async_save blocking** when it works without a process group.

Then **peak extra resident memory**, each contender in a fresh subprocess (so the parent's
allocations neither hide nor inflate it): the child builds the state, resets the kernel's high-water
mark (``/proc/self/clear_refs`` = 5) and records VmRSS as the baseline, starts a thread sampling RSS
every ~2 ms, and saves the state twice to fresh paths (``save_async(...).wait()`` twice, the second
reusing the staging buffer; or ``ckptvault.save`` twice; or ``torch.save`` + fsync twice). Reported:
(peak - baseline) / state bytes, peak = max(VmHWM after, sampled maximum), after the first save and
after both. ``save_async`` with ``max_staging_bytes`` = ``--budget-mib`` (256) is measured the same
way (a state above the budget is staged in pieces, so blocking grows and memory should stay near the
budget; if the call raises instead, e.g. ``StagingBudgetError`` in older versions, that is reported).

Targets (from the project's issue): blocking <= 1.5x the plain copy and <= 0.25x the synchronous save;
peak extra RSS of save_async <= 1.1x the state size.
Usage: ``python benchmarks/async_save.py [--size-mib 1024] [--reps 3] [--budget-mib 256] [--no-rss]
[--json OUT]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ckptvault as cv
from _common import (
    MIB,
    build_state,
    flatten,
    machine_info,
    make_spec,
    md_table,
    median,
    proc_status_kib,
    reset_peak_rss,
    verdict,
)

RSS_TARGET = 1.1  # peak extra RSS of save_async, as a multiple of the state size
RSS_KINDS = ("save_async", "save_async_budget", "save (sync)", "torch.save")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("benchmarks/out/async"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--budget-mib", type=int, default=256, help="max_staging_bytes for the RSS run")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--child-rss", choices=RSS_KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_rss:
        rss_child(args)
        return
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
    rss: dict[str, dict[str, Any]] = {}
    if not args.no_rss:
        del state, tensors, floor  # not needed by the children; frees the parent's share of RAM
        gc.collect()
        rss = {kind: measure_rss(args, kind) for kind in RSS_KINDS}
        print(f"\n## peak extra RSS, fresh subprocess each ({nbytes / MIB:.0f} MiB state, two saves each)")
        print(md_table(RSS_HEADERS, [rss_row(kind, rss[kind]) for kind in RSS_KINDS]))
        main_rss = rss["save_async"]
        if "error" in main_rss:
            checks.append((f"save_async peak extra RSS <= {RSS_TARGET}x state", "error", False))
        else:
            ratio = main_rss["peak_extra_x"]
            checks.append(
                (f"save_async peak extra RSS <= {RSS_TARGET}x state", f"{ratio:.2f}x", ratio <= RSS_TARGET)
            )
        budget = rss["save_async_budget"]
        if "error" not in budget and not budget.get("raised"):
            limit = args.budget_mib * MIB
            checks.append(
                (
                    f"budget save_async peak extra RSS <= {RSS_TARGET}x budget",
                    f"{budget['peak_extra_kib'] * 1024 / limit:.2f}x",
                    budget["peak_extra_kib"] * 1024 <= RSS_TARGET * limit,
                )
            )
        print()
    print(md_table(["target", "measured", "verdict"], [[t, m, verdict(ok)] for t, m, ok in checks]))
    if args.json:
        args.json.write_text(json.dumps({"samples": samples, "medians": med, "rss": rss}, indent=1))
    shutil.rmtree(args.dir, ignore_errors=True)


# --------------------------------------------------------------------------- peak RSS (subprocess)


class RssSampler:
    """A daemon thread reading this process's RSS every ``interval`` seconds; keeps the maximum."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = self._proc.memory_info().rss
        self.samples = 0
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self.samples += 1
            time.sleep(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _torch_save(state: Any, target: Path) -> None:
    with open(target, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())


def rss_child(args: argparse.Namespace) -> None:
    """Two saves of the state in this fresh process; prints its memory numbers as one JSON line."""
    kind = args.child_rss
    args.dir.mkdir(parents=True, exist_ok=True)
    state = build_state(make_spec(args.size_mib * MIB))
    nbytes = sum(t.numel() * t.element_size() for t in flatten(state).values())
    budget = args.budget_mib * MIB if kind == "save_async_budget" else None

    def save(target: Path) -> float:
        """Saves ``state`` to ``target``; returns the caller's blocking time (whole save if sync)."""
        started = time.perf_counter()
        if kind.startswith("save_async"):
            pending = cv.save_async(target, state, max_staging_bytes=budget)
            blocked = time.perf_counter() - started
            pending.wait()
            return blocked
        if kind == "save (sync)":
            cv.save(target, state)
        else:
            _torch_save(state, target)
        return time.perf_counter() - started

    gc.collect()
    exact = reset_peak_rss()
    before = proc_status_kib("VmRSS", "VmHWM")
    baseline_kib = before["VmRSS"] if exact else before["VmHWM"]
    out: dict[str, Any] = {"state_bytes": nbytes, "hwm_reset": exact, "baseline_kib": baseline_kib}
    out["hwm_before_kib"] = before["VmHWM"]
    if budget is not None:
        out["budget_mib"] = args.budget_mib
    blocking: list[float] = []
    peaks_kib: list[int] = []
    with RssSampler() as sampler:
        try:
            for i in range(2):
                target = args.dir / f"rss_{kind.split()[0]}_{i}"
                shutil.rmtree(target, ignore_errors=True)
                if target.is_file():
                    target.unlink()
                started = time.perf_counter()
                try:
                    blocking.append(save(target))
                except Exception:
                    out["raised_after_s"] = time.perf_counter() - started
                    raise
                peaks_kib.append(max(proc_status_kib("VmHWM")["VmHWM"], sampler.peak // 1024))
                shutil.rmtree(target, ignore_errors=True)
                if target.is_file():
                    target.unlink()
        except Exception as exc:  # the budget case is expected to raise for a state above it
            out["raised"] = f"{type(exc).__name__}: {exc}"
    after = proc_status_kib("VmRSS", "VmHWM")
    peak_kib = max(after["VmHWM"], sampler.peak // 1024)
    out.update(
        {
            "blocking_s": blocking,
            "hwm_after_kib": after["VmHWM"],
            "rss_after_kib": after["VmRSS"],
            "sampler_peak_kib": sampler.peak // 1024,
            "sampler_samples": sampler.samples,
            "peak_kib_after_each": peaks_kib,
            "peak_extra_kib": peak_kib - baseline_kib,
            "peak_extra_x": (peak_kib - baseline_kib) * 1024 / nbytes,
            "peak_extra_x_after_first": (peaks_kib[0] - baseline_kib) * 1024 / nbytes if peaks_kib else None,
            "sampler_extra_x": (sampler.peak // 1024 - baseline_kib) * 1024 / nbytes,
        }
    )
    print(json.dumps(out))


def measure_rss(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child-rss",
        kind,
        "--size-mib",
        str(args.size_mib),
        "--budget-mib",
        str(args.budget_mib),
        "--dir",
        str(args.dir / "rss"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    shutil.rmtree(args.dir / "rss", ignore_errors=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


RSS_HEADERS = [
    "contender",
    "peak extra MiB",
    "x state",
    "x state after 1st",
    "sampler x state",
    "blocking s (1st, 2nd)",
    "note",
]


def rss_row(kind: str, r: dict[str, Any]) -> list[str]:
    label = {"save_async_budget": "save_async, max_staging_bytes"}.get(kind, kind)
    if "error" in r:
        return [label, "-", "-", "-", "-", "-", f"child failed: {r['error']}"]
    notes = []
    if kind == "save_async_budget":
        label += f" = {r.get('budget_mib', '?')} MiB"
    if not kind.startswith("save_async"):
        notes.append("synchronous: blocking = whole save")
    if r.get("raised"):
        notes.append(f"raised after {r.get('raised_after_s', float('nan')):.3f} s: {r['raised']}")
    if not r["hwm_reset"]:
        notes.append("approx: VmHWM reset unavailable")
    first = r["peak_extra_x_after_first"]
    return [
        label,
        f"{r['peak_extra_kib'] / 1024:.0f}",
        f"{r['peak_extra_x']:.2f}x",
        "-" if first is None else f"{first:.2f}x",
        f"{r['sampler_extra_x']:.2f}x",
        ", ".join(f"{b:.3f}" for b in r["blocking_s"]) or "-",
        "; ".join(notes),
    ]


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
