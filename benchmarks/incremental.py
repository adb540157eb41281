"""Incremental checkpoint benchmark: what a save after a partial update writes, and how long it takes.

Two ~1 GiB fp32 states, each measured in fresh run directories under ``--dir`` (one per repetition,
deleted afterwards; medians over ``--reps`` reported):

1. **Model-like state**: ``--layers`` (40) Linear-like weights of ``--layer-mib`` (25) MiB, shape
   (rows, 4096), plus a 4096-element bias each (16 KiB, below the chunking threshold). Contenders:

   * **full**: a plain ``ckptvault.save(path, state)`` (bytes = the checkpoint directory's size);
     every ratio of this part is against it;
   * anchors: **torch.save** (+ flush + fsync) of the same state, and a **raw write** of the same
     bytes (one file, ``os.write`` of every tensor, ``fsync``);
   * an **incremental run** in one run directory with one ``HintCache``: the **first save**
     (``incremental=True``: every chunk is new); a save with **nothing changed**; then whole tensors
     amounting to 10% of the bytes updated in place (``w.add_(0.01)`` under ``torch.no_grad()``)
     and **saved with the hint cache** (target A); the same tensors updated again and saved with
     ``hints=None`` (**trust_version_counter off**: every tensor hashed, only new chunks written);
     finally 10% of the *rows* of every weight changed as one contiguous block per tensor (at a
     seeded random row) and saved with the hint cache, which cannot skip any tensor then.

   Bytes written by an incremental save = growth of the run directory (new chunk files in
   ``.ckptvault-store`` plus the new checkpoint directory), apparent sizes (``st_size``).

2. **Embedding table** ``--emb-rows`` x ``--emb-dim`` fp32 (262144 x 1024 = 1 GiB): full save and the
   same two anchors; an incremental run with the default 4 MiB chunks: first save, then 1% of the
   rows changed as one contiguous block (rows 1000 .. 1000+1%) and saved (target B), then 1% of the
   rows changed at seeded random positions and saved (with 4 MiB chunks = 1024 rows nearly every
   chunk is touched); the same again in a second run directory with ``chunk_bytes=65536``.

Within each repetition the independent contenders (full, torch.save, raw write, the incremental
runs) rotate their order; saves inside an incremental run are necessarily sequential. The first
repetition also loads the last checkpoint of each incremental run and checks it equals the state
(outside every timed region; ``--no-check`` skips it). ``--profile`` repeats the target-A scenario
once more after the timed repetitions, in a scratch run directory, under cProfile (not part of the
medians) and prints the top functions by own and cumulative time.

Targets (from the project's issue):
  (A) after an update of 10% of the parameters, the next checkpoint writes <= 12% of a full
      checkpoint's bytes in <= 20% of its time;
  (B) a 1 GiB embedding table with 1% of rows changed writes <= 5% of its bytes.

Usage: ``python benchmarks/incremental.py [--reps 3] [--layers 40] [--layer-mib 25]
[--emb-rows 262144] [--emb-dim 1024] [--dir DIR] [--no-check] [--profile] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ckptvault as cv
from _common import (
    GIB,
    MIB,
    assert_same_tensors,
    flatten,
    fmt_samples,
    machine_info,
    md_table,
    median,
    rotated,
    timed,
    verdict,
)
from ckptvault.engine.chunks import HintCache

TARGET_A_BYTES = 0.12
TARGET_A_TIME = 0.20
TARGET_B_BYTES = 0.05
UPDATE_FRACTION = 0.10  # part 1
ROW_FRACTION = 0.01  # part 2
CONTIGUOUS_START = 1000
WIDTH = 4096
SMALL_CHUNK = 65536

# Scenario names (table rows), in print order.
M_FULL, M_TORCH, M_RAW = "full: ckptvault.save", "anchor: torch.save + fsync", "anchor: raw write + fsync"
M_FIRST = "incremental first save (hints)"
M_SAME = "incremental, nothing changed (hints)"
M_A = "10% whole tensors updated (hints) [A]"
M_A_NOTRUST = "10% whole tensors updated, trust_version_counter off"
M_ROWS = "10% rows of every tensor, one block each (hints)"
E_FULL, E_TORCH, E_RAW = M_FULL, M_TORCH, M_RAW
E_FIRST = "incremental first save, 4 MiB chunks"
E_B = "1% rows contiguous, 4 MiB chunks [B]"
E_SCAT = "1% rows scattered, 4 MiB chunks"
E_FIRST_S = "incremental first save, 64 KiB chunks"
E_B_S = "1% rows contiguous, 64 KiB chunks"
E_SCAT_S = "1% rows scattered, 64 KiB chunks"

Sample = dict[str, float]  # {"s": seconds, "bytes": bytes written, "files": files added}


# --------------------------------------------------------------------------- measuring


def tree_usage(path: Path) -> tuple[int, int]:
    """(apparent bytes, file count) of every regular file under ``path`` (0, 0 if absent)."""
    if path.is_file():
        return path.stat().st_size, 1
    total = files = 0
    stack = [str(path)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except FileNotFoundError:
            continue
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
            elif stat.S_ISREG(st.st_mode):
                total += st.st_size
                files += 1
    return total, files


def measure(run_dir: Path, fn: Callable[[], Any]) -> Sample:
    """Times ``fn`` (gc paused) and returns seconds plus how much ``run_dir`` grew."""
    before, files_before = tree_usage(run_dir)
    seconds, _ = timed(fn)
    after, files_after = tree_usage(run_dir)
    return {"s": seconds, "bytes": float(after - before), "files": float(files_after - files_before)}


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def raw_write(tensors: list[torch.Tensor], path: Path) -> None:
    """The same bytes in one file: write every tensor, fsync (as benchmarks/save_load.py's raw)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t in tensors:
            _write_all(fd, t.numpy().data.cast("B"))
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_save(state: Any, path: Path) -> None:
    with open(path, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())


def save_full(state: Any, path: Path) -> None:
    cv.save(path, state)


def save_inc(state: Any, path: Path, hints: HintCache | None, chunk_bytes: int | None = None) -> None:
    cv.save(path, state, incremental=True, hints=hints, chunk_bytes=chunk_bytes)


def check_equal(state: Any, path: Path, what: str) -> None:
    """The committed checkpoint loads back bit-identical to the live state (untimed)."""
    assert_same_tensors(state, cv.load(path, mmap=False), what)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- states


def model_state(layers: int, layer_mib: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    rows = layer_mib * MIB // (4 * WIDTH)
    gen = torch.Generator().manual_seed(seed)
    model: dict[str, torch.Tensor] = {}
    for i in range(layers):
        model[f"layer_{i}.weight"] = torch.randn((rows, WIDTH), generator=gen)
        model[f"layer_{i}.bias"] = torch.randn((WIDTH,), generator=gen)
    return {"model": model}


def embedding_state(rows: int, dim: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {"model": {"embedding.weight": torch.randn((rows, dim), generator=gen)}}


def nbytes_of(state: Any) -> int:
    return sum(t.numel() * t.element_size() for t in flatten(state).values())


# --------------------------------------------------------------------------- part 1: model state


def part_model(
    state: dict[str, dict[str, torch.Tensor]],
    root: Path,
    rep: int,
    samples: dict[str, list[Sample]],
    hint_stats: dict[str, list[list[int]]],
    check: bool,
) -> None:
    model = state["model"]
    weights = [name for name in model if name.endswith(".weight")]
    tensors = list(flatten(state).values())
    updated = weights[: max(1, round(UPDATE_FRACTION * len(weights)))]
    rng = np.random.default_rng(1000 + rep)

    def full() -> None:
        run = root / "m_full"
        run.mkdir()
        samples[M_FULL].append(measure(run, lambda: save_full(state, run / "ckpt")))

    def torch_anchor() -> None:
        run = root / "m_torch"
        run.mkdir()
        samples[M_TORCH].append(measure(run, lambda: torch_save(state, run / "state.pt")))

    def raw_anchor() -> None:
        run = root / "m_raw"
        run.mkdir()
        samples[M_RAW].append(measure(run, lambda: raw_write(tensors, run / "raw.bin")))

    def incremental() -> None:
        run = root / "m_inc"
        run.mkdir()
        hints = HintCache()

        def step(name: str, path: str, use_hints: bool) -> None:
            h0, m0 = hints.hits, hints.misses
            samples[name].append(
                measure(run, lambda: save_inc(state, run / path, hints if use_hints else None))
            )
            hint_stats.setdefault(name, []).append([hints.hits - h0, hints.misses - m0])

        step(M_FIRST, "step_1", True)
        step(M_SAME, "step_2", True)
        with torch.no_grad():
            for name in updated:
                model[name].add_(0.01)
        step(M_A, "step_3", True)
        with torch.no_grad():
            for name in updated:
                model[name].add_(0.01)
        step(M_A_NOTRUST, "step_4", False)
        with torch.no_grad():
            for name in weights:
                w = model[name]
                block = max(1, round(UPDATE_FRACTION * w.shape[0]))
                start = int(rng.integers(0, w.shape[0] - block + 1))
                w[start : start + block].add_(0.01)
        step(M_ROWS, "step_5", True)
        if check and rep == 0:
            # Only the last step is checkable: the live state has moved on since the earlier ones.
            check_equal(state, run / "step_5", "model incremental step_5")

    for fn in rotated([full, torch_anchor, raw_anchor, incremental], rep):
        fn()


def profile_a(state: dict[str, dict[str, torch.Tensor]], root: Path, top: int = 18) -> str:
    """cProfile of the target-A save (hinted save after a 10% whole-tensor update), in a scratch run."""
    model = state["model"]
    weights = [name for name in model if name.endswith(".weight")]
    updated = weights[: max(1, round(UPDATE_FRACTION * len(weights)))]
    run = root / "m_profile"
    run.mkdir()
    hints = HintCache()
    save_inc(state, run / "step_1", hints)
    with torch.no_grad():
        for name in updated:
            model[name].add_(0.01)
    prof = cProfile.Profile()
    prof.enable()
    save_inc(state, run / "step_2", hints)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    shutil.rmtree(run, ignore_errors=True)
    return out.getvalue()


# --------------------------------------------------------------------------- part 2: embedding


def part_embedding(
    state: dict[str, dict[str, torch.Tensor]],
    root: Path,
    rep: int,
    samples: dict[str, list[Sample]],
    check: bool,
) -> None:
    table = state["model"]["embedding.weight"]
    rows = table.shape[0]
    count = max(1, round(ROW_FRACTION * rows))
    start = min(CONTIGUOUS_START, rows - count)
    rng = np.random.default_rng(2000 + rep)
    tensors = [table]

    def contiguous() -> None:
        with torch.no_grad():
            table[start : start + count].add_(0.01)

    def scattered() -> None:
        idx = torch.from_numpy(np.sort(rng.choice(rows, size=count, replace=False)))
        with torch.no_grad():
            table[idx] += 0.01  # index_put_: bumps the version counter

    def full() -> None:
        run = root / "e_full"
        run.mkdir()
        samples[E_FULL].append(measure(run, lambda: save_full(state, run / "ckpt")))

    def torch_anchor() -> None:
        run = root / "e_torch"
        run.mkdir()
        samples[E_TORCH].append(measure(run, lambda: torch_save(state, run / "state.pt")))

    def raw_anchor() -> None:
        run = root / "e_raw"
        run.mkdir()
        samples[E_RAW].append(measure(run, lambda: raw_write(tensors, run / "raw.bin")))

    def incremental(chunk_bytes: int | None, names: tuple[str, str, str], tag: str) -> Callable[[], None]:
        def go() -> None:
            run = root / f"e_inc_{tag}"
            run.mkdir()
            hints = HintCache()
            first, contig, scat = names
            samples[first].append(measure(run, lambda: save_inc(state, run / "step_1", hints, chunk_bytes)))
            contiguous()
            samples[contig].append(measure(run, lambda: save_inc(state, run / "step_2", hints, chunk_bytes)))
            scattered()
            samples[scat].append(measure(run, lambda: save_inc(state, run / "step_3", hints, chunk_bytes)))
            if check and rep == 0:
                check_equal(state, run / "step_3", f"embedding incremental {tag} step_3")

        return go

    contenders = [
        full,
        torch_anchor,
        raw_anchor,
        incremental(None, (E_FIRST, E_B, E_SCAT), "4m"),
        incremental(SMALL_CHUNK, (E_FIRST_S, E_B_S, E_SCAT_S), "64k"),
    ]
    for fn in rotated(contenders, rep):
        fn()


# --------------------------------------------------------------------------- report


def summarize(samples: dict[str, list[Sample]], full_name: str) -> dict[str, dict[str, Any]]:
    full_s = median([x["s"] for x in samples[full_name]])
    full_b = median([x["bytes"] for x in samples[full_name]])
    out: dict[str, dict[str, Any]] = {}
    for name, xs in samples.items():
        s = median([x["s"] for x in xs])
        b = median([x["bytes"] for x in xs])
        out[name] = {
            "median_s": s,
            "median_bytes": b,
            "median_files": median([x["files"] for x in xs]),
            "bytes_vs_full": b / full_b if full_b else float("nan"),
            "time_vs_full": s / full_s if full_s else float("nan"),
            "samples_s": [x["s"] for x in xs],
            "samples_bytes": [x["bytes"] for x in xs],
        }
    return out


def table(summary: dict[str, dict[str, Any]]) -> str:
    headers = [
        "scenario",
        "median s",
        "bytes written",
        "bytes vs full",
        "time vs full",
        "new files",
        "samples s",
    ]
    rows = [
        [
            name,
            f"{r['median_s']:.3f}",
            f"{r['median_bytes'] / MIB:.1f} MiB",
            f"{100 * r['bytes_vs_full']:.2f}%",
            f"{100 * r['time_vs_full']:.1f}%",
            f"{r['median_files']:.0f}",
            fmt_samples(r["samples_s"], 3),
        ]
        for name, r in summary.items()
    ]
    return md_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=40, help="Linear-like weights in the model state")
    parser.add_argument("--layer-mib", type=int, default=25, help="MiB per weight (shape rows x 4096)")
    parser.add_argument("--emb-rows", type=int, default=262144)
    parser.add_argument("--emb-dim", type=int, default=1024)
    parser.add_argument("--dir", type=Path, default=Path("benchmarks/out/incremental"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-check", action="store_true", help="skip the untimed load-back checks")
    parser.add_argument("--profile", action="store_true", help="cProfile the target-A save once")
    parser.add_argument("--skip-model", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-embedding", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    started = time.perf_counter()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    free = shutil.disk_usage(args.dir).free
    need = 6 * (args.layers * args.layer_mib * MIB + args.emb_rows * args.emb_dim * 4)
    if free < 8 * GIB or free < need:
        sys.exit(
            f"only {free / GIB:.1f} GiB free under {args.dir}; need ~{need / GIB:.1f} GiB (reduce sizes)"
        )
    info = machine_info(args.dir)

    m_samples: dict[str, list[Sample]] = {
        n: [] for n in (M_FULL, M_TORCH, M_RAW, M_FIRST, M_SAME, M_A, M_A_NOTRUST, M_ROWS)
    }
    e_samples: dict[str, list[Sample]] = {
        n: [] for n in (E_FULL, E_TORCH, E_RAW, E_FIRST, E_B, E_SCAT, E_FIRST_S, E_B_S, E_SCAT_S)
    }
    hint_stats: dict[str, list[list[int]]] = {}
    profile_text = ""
    m_bytes = e_bytes = 0
    m_count = 0

    if not args.skip_model:
        state = model_state(args.layers, args.layer_mib, seed=0)
        m_bytes = nbytes_of(state)
        m_count = len(flatten(state))
        for rep in range(args.reps):
            root = args.dir / f"model_rep{rep}"
            root.mkdir()
            log(f"[{time.perf_counter() - started:6.1f}s] model rep {rep}")
            part_model(state, root, rep, m_samples, hint_stats, check=not args.no_check)
            shutil.rmtree(root)
            os.sync()
        if args.profile:
            log(f"[{time.perf_counter() - started:6.1f}s] profiling the target-A save")
            profile_text = profile_a(state, args.dir)
        del state

    if not args.skip_embedding:
        state = embedding_state(args.emb_rows, args.emb_dim, seed=1)
        e_bytes = nbytes_of(state)
        for rep in range(args.reps):
            root = args.dir / f"emb_rep{rep}"
            root.mkdir()
            log(f"[{time.perf_counter() - started:6.1f}s] embedding rep {rep}")
            part_embedding(state, root, rep, e_samples, check=not args.no_check)
            shutil.rmtree(root)
            os.sync()
        del state

    print(
        f"# incremental checkpoints: {args.reps} reps (medians); {info.get('cores_usable')} cores, "
        f"torch {torch.__version__}, fs {info.get('work_dir_fs')}, {info.get('work_dir_free_gib')} GiB free"
    )
    report: dict[str, Any] = {
        "machine": info,
        "config": vars(args) | {"dir": str(args.dir), "json": str(args.json)},
    }
    checks: list[tuple[str, str, bool]] = []
    if m_samples[M_FULL]:
        ms = summarize(m_samples, M_FULL)
        updated = max(1, round(UPDATE_FRACTION * args.layers))
        print(
            f"\n## 1. model-like state: {m_bytes / GIB:.3f} GiB fp32, {m_count} tensors "
            f"({args.layers} weights of {args.layer_mib} MiB + 16 KiB biases); update = {updated} whole "
            f"weights ({100 * updated / args.layers:.1f}% of the weights' bytes)"
        )
        print(table(ms))
        print(
            "hint cache hits/misses per save (rep 0): "
            + "; ".join(f"{name}: {v[0][0]}/{v[0][1]}" for name, v in hint_stats.items())
        )
        a = ms[M_A]
        checks.append(
            (
                f"(A) bytes <= {100 * TARGET_A_BYTES:.0f}% of full",
                f"{100 * a['bytes_vs_full']:.2f}%",
                a["bytes_vs_full"] <= TARGET_A_BYTES,
            )
        )
        checks.append(
            (
                f"(A) time <= {100 * TARGET_A_TIME:.0f}% of full",
                f"{100 * a['time_vs_full']:.1f}%",
                a["time_vs_full"] <= TARGET_A_TIME,
            )
        )
        nt = ms[M_A_NOTRUST]
        checks.append(
            (
                "(A, trust_version_counter off) bytes / time",
                f"{100 * nt['bytes_vs_full']:.2f}% / {100 * nt['time_vs_full']:.1f}%",
                nt["bytes_vs_full"] <= TARGET_A_BYTES and nt["time_vs_full"] <= TARGET_A_TIME,
            )
        )
        rw = ms[M_ROWS]
        checks.append(
            (
                "(A, 10% rows of every tensor) bytes / time",
                f"{100 * rw['bytes_vs_full']:.2f}% / {100 * rw['time_vs_full']:.1f}%",
                rw["bytes_vs_full"] <= TARGET_A_BYTES and rw["time_vs_full"] <= TARGET_A_TIME,
            )
        )
        report["model"] = {"state_bytes": m_bytes, "tensors": m_count, "summary": ms, "hints": hint_stats}
    if e_samples[E_FULL]:
        es = summarize(e_samples, E_FULL)
        count = max(1, round(ROW_FRACTION * args.emb_rows))
        print(
            f"\n## 2. embedding table {args.emb_rows} x {args.emb_dim} fp32 ({e_bytes / GIB:.3f} GiB); "
            f"1% = {count} rows (contiguous: rows {min(CONTIGUOUS_START, args.emb_rows - count)}.."
            f"{min(CONTIGUOUS_START, args.emb_rows - count) + count - 1})"
        )
        print(table(es))
        variants = (
            (E_B, "(B) bytes <= 5% [1% rows contiguous, 4 MiB chunks]"),
            (E_SCAT, "(B, scattered) bytes <= 5% [4 MiB chunks]"),
            (E_B_S, "(B, contiguous) bytes <= 5% [64 KiB chunks]"),
            (E_SCAT_S, "(B, scattered) bytes <= 5% [64 KiB chunks]"),
        )
        for name, label in variants:
            r = es[name]
            checks.append(
                (
                    label,
                    f"{100 * r['bytes_vs_full']:.2f}% (time {100 * r['time_vs_full']:.1f}%)",
                    r["bytes_vs_full"] <= TARGET_B_BYTES,
                )
            )
        report["embedding"] = {"state_bytes": e_bytes, "summary": es}
    print()
    print(md_table(["target", "measured", "verdict"], [[t, m, verdict(ok)] for t, m, ok in checks]))
    report["verdicts"] = [{"target": t, "measured": m, "pass": ok} for t, m, ok in checks]
    if profile_text:
        print("\n## cProfile of the target-A save (scratch run, after the timed reps)\n")
        print(profile_text)
        report["profile"] = profile_text
    total = time.perf_counter() - started
    print(f"\ntotal runtime {total:.0f} s")
    report["runtime_s"] = total
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
