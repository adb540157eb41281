"""Save / load benchmark: ckptvault against raw writes, torch.save, safetensors and torch DCP.

What is measured (one run, every contender in the same process, same state, same disk):

1. **Save** of a ~1 GiB state (``{"model": {name: fp32 tensor}}``, ~200 tensors whose sizes are drawn
   log-uniformly from a seeded RNG, a few KiB to tens of MiB). Every contender must make its bytes
   durable before the clock stops: ``ckptvault.save`` (digests, fsync and atomic publish included), the
   floor ``os.write`` + ``os.fsync`` of the tensors' raw bytes back to back in one file, ``torch.save`` to a
   file object + flush + fsync, ``safetensors.torch.save_file`` then open + fsync, and
   ``torch.distributed.checkpoint.save`` (``no_dist``, its writer fsyncs). Outputs are deleted and
   ``os.sync()`` is called between runs, outside the timed region.
2. **Full load** of the files just written (so the page cache is warm: this measures parsing, copying
   and hashing, not the disk). After every loader returns, one element of every 4 KiB page of every
   tensor is read inside the timed region, for all contenders alike: loaders that return lazily mapped
   memory (safetensors, mmap) pay for their page faults like the ones that copy eagerly.
3. **Lazy open + one tensor**: ``with ckptvault.open(p) as ck: ck["model"][name]`` for a mid-sized tensor,
   warm, with ``safetensors.safe_open(...).get_tensor`` as an anchor.
4. **Fixed cost** of saving a tiny state (``{"step": 1, "w": torch.zeros(4)}``) to fresh paths, with
   ``torch.save`` + fsync as an anchor.
5. **Peak RSS** of each save and each load, each in a fresh subprocess. The child builds the state (for
   saves), resets the kernel's high-water mark (``/proc/self/clear_refs`` = 5) and records VmRSS as the
   baseline, runs the operation (loads also touch every page) and reads VmHWM. Reported: peak minus
   baseline, as a % of the state size (saves: extra memory beyond the state; loads: ~100% is the state).
6. **Many small tensors** (``--many-count``, 50,000 by default, 4-64 KiB each): save, full load and lazy
   open + one tensor against torch.save/torch.load, safetensors and DCP; ``load(verify=False)`` against
   ``safetensors.load_file``; the strict JSON reader's parse rate on that checkpoint's manifest and
   header, beside the reader it replaced (``_read_rows.py`` says how each is measured).
7. **Verified lazy read of one 16 MiB tensor** against ``safe_open`` + ``get_tensor`` + BLAKE3 of the
   same bytes on all cores.

Lazy open + one tensor is judged at both counts (200 tensors: row 3; 50,000: row 8) against
``safe_open`` + ``get_tensor`` on the same tensors (target <= 1.5x).

Why it is fair: contenders alternate within each repetition (the order rotates every repetition, so
slow drift on a noisy machine hits all of them alike), the garbage collector runs before and is paused
during each timed call, every contender gets one untimed warm-up, and medians are reported.

Usage: ``python benchmarks/save_load.py [--size-mib 1024] [--reps 5] [--dir DIR] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    GIB,
    MIB,
    StateSpec,
    assert_same_tensors,
    build_state,
    flatten,
    fmt_samples,
    machine_info,
    make_spec,
    md_table,
    median,
    proc_status_kib,
    remove,
    reset_peak_rss,
    rotated,
    timed,
    touch_pages,
    verdict,
)
from _read_rows import TARGET_LAZY_VS_SAFE, phase_big_verified, phase_many, report_rows

warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")

State = dict[str, Any]
SaveFn = Callable[[Path], None]
LoadFn = Callable[[Path], Any]

RAW, CKV, TORCH, SAFE, DCP = "raw", "ckv", "torch", "safe", "dcp"
CKV_V, CKV_NV, CKV_MAP, SAFE_COPY = "ckv_verify", "ckv_noverify", "ckv_mmap", "safe_copy"

SAVE_LABELS = {
    RAW: "raw os.write + fsync",
    CKV: "ckptvault.save",
    TORCH: "torch.save + fsync",
    SAFE: "safetensors save_file + fsync",
    DCP: "torch DCP save (no_dist)",
}
LOAD_LABELS = {
    CKV_V: "ckptvault.load(verify=True)",
    CKV_NV: "ckptvault.load(verify=False)",
    CKV_MAP: "ckptvault.load(mmap=True, verify=False)",
    TORCH: "torch.load(weights_only, mmap=False)",
    SAFE: "safetensors load_file",
    SAFE_COPY: "safetensors load_file + clone (info)",
    DCP: "torch DCP load (into fresh tensors)",
}
# The file each loader reads, by the save contender that wrote it.
LOAD_SOURCE = {CKV_V: CKV, CKV_NV: CKV, CKV_MAP: CKV, TORCH: TORCH, SAFE: SAFE, SAFE_COPY: SAFE, DCP: DCP}
FILE_NAMES = {RAW: "raw.bin", CKV: "ckv", TORCH: "state.pt", SAFE: "state.safetensors", DCP: "dcp"}

TARGET_SAVE_VS_RAW = 0.9
TARGET_LAZY_MS = 10.0
TARGET_TINY_MS = 20.0
TARGET_SAVE_EXTRA_RSS = 0.10


# --------------------------------------------------------------------------- contenders


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


def save_contenders(state: State, kinds: list[str]) -> dict[str, SaveFn]:
    """Save functions over the same ``state``; each returns only once its bytes are durable."""
    import safetensors.torch

    flat = flatten(state)  # safetensors' input form: references only, built outside the timed region
    tensors = list(flat.values())

    def raw(path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for t in tensors:
                _write_all(fd, memoryview(t.numpy()).cast("B"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def ckv(path: Path) -> None:
        import ckptvault

        ckptvault.save(str(path), state)

    def torch_save(path: Path) -> None:
        with open(path, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())

    def safe(path: Path) -> None:
        safetensors.torch.save_file(flat, str(path))
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def dcp(path: Path) -> None:
        import torch.distributed.checkpoint as dist_cp

        writer = dist_cp.FileSystemWriter(str(path), sync_files=True)
        dist_cp.save(state, storage_writer=writer, no_dist=True)

    table: dict[str, SaveFn] = {RAW: raw, CKV: ckv, TORCH: torch_save, SAFE: safe, DCP: dcp}
    return {k: table[k] for k in kinds}


def load_contenders(spec: StateSpec, kinds: list[str]) -> dict[str, LoadFn]:
    """Load functions; each returns the loaded state (touching its pages is the caller's job)."""
    import safetensors.torch

    def ckv(verify: bool, mmap: bool = False) -> LoadFn:
        def load(path: Path) -> Any:
            import ckptvault

            return ckptvault.load(str(path), map_location="cpu", verify=verify, mmap=mmap)

        return load

    def torch_load(path: Path) -> Any:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)

    def safe(path: Path) -> Any:
        return safetensors.torch.load_file(str(path), device="cpu")

    def safe_copy(path: Path) -> Any:
        # Informational anchor: safetensors' bytes copied into private memory, as an eager loader must.
        return {k: v.clone() for k, v in safetensors.torch.load_file(str(path), device="cpu").items()}

    def dcp(path: Path) -> Any:
        import torch.distributed.checkpoint as dist_cp

        # DCP loads in place: allocating the destination is part of its cost.
        target = {
            "model": {name: torch.empty(shape, dtype=torch.float32) for name, shape in spec.shapes.items()}
        }
        dist_cp.load(target, storage_reader=dist_cp.FileSystemReader(str(path)), no_dist=True)
        return target

    table: dict[str, LoadFn] = {
        CKV_V: ckv(True),
        CKV_NV: ckv(False),
        CKV_MAP: ckv(False, mmap=True),
        TORCH: torch_load,
        SAFE: safe,
        SAFE_COPY: safe_copy,
        DCP: dcp,
    }
    return {k: table[k] for k in kinds}


def tiny_state() -> State:
    return {"step": 1, "w": torch.zeros(4)}


def probe_dcp(work: Path) -> str | None:
    """None if torch DCP saves and loads in this single process without a process group, else why not."""
    try:
        import torch.distributed.checkpoint as dist_cp

        probe = work / "dcp_probe"
        state = {"model": {"a": torch.arange(10, dtype=torch.float32)}}
        dist_cp.save(state, storage_writer=dist_cp.FileSystemWriter(str(probe)), no_dist=True)
        back = {"model": {"a": torch.empty(10)}}
        dist_cp.load(back, storage_reader=dist_cp.FileSystemReader(str(probe)), no_dist=True)
        remove(probe)
        if not torch.equal(back["model"]["a"], state["model"]["a"]):
            return "DCP round trip returned different values"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# --------------------------------------------------------------------------- phases


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def phase_save(state: State, kinds: list[str], work: Path, reps: int) -> dict[str, list[float]]:
    fns = save_contenders(state, kinds)
    warm_fns = save_contenders({"model": {"x": torch.ones(1024)}}, kinds)
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    for kind in kinds:  # untimed warm-up: imports, thread pools, allocator
        target = work / f"warm_{FILE_NAMES[kind]}"
        warm_fns[kind](target)
        remove(target)
    for rep in range(reps):
        for kind in rotated(kinds, rep):
            target = work / FILE_NAMES[kind]
            remove(target)
            os.sync()  # flush anyone else's dirty pages (earlier deletes) before the clock starts
            elapsed, _ = timed(lambda fn=fns[kind], p=target: fn(p))
            samples[kind].append(elapsed)
            remove(target)
            log(f"save rep {rep + 1}/{reps} {SAVE_LABELS[kind]}: {elapsed:.3f} s")
    os.sync()
    return samples


def write_load_sources(state: State, kinds: list[str], work: Path) -> None:
    sources = sorted({LOAD_SOURCE[k] for k in kinds})
    fns = save_contenders(state, sources)
    for kind in sources:
        target = work / FILE_NAMES[kind]
        remove(target)
        fns[kind](target)


def file_mapped(path: Path) -> bool:
    """Whether ``path`` is mmapped into this process right now."""
    target = str(path.resolve())
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
        return any(line.rstrip("\n").endswith(target) for line in fh)


def phase_load(
    state: State, spec: StateSpec, kinds: list[str], work: Path, reps: int, notes: list[str]
) -> dict[str, list[float]]:
    fns = load_contenders(spec, kinds)
    samples: dict[str, list[float]] = {k: [] for k in kinds}

    def run(kind: str) -> Any:
        loaded = fns[kind](work / FILE_NAMES[LOAD_SOURCE[kind]])
        touch_pages(loaded)
        return loaded

    for kind in kinds:  # untimed warm-up doubling as a correctness check
        loaded = run(kind)
        assert_same_tensors(state, loaded, LOAD_LABELS[kind])
        if file_mapped(work / FILE_NAMES[LOAD_SOURCE[kind]]):
            notes.append(
                f"{LOAD_LABELS[kind]} returns tensors backed by an mmap of the file (zero-copy on a warm "
                "page cache): its load time is mostly page-fault cost, not a copy"
            )
        del loaded
        gc.collect()
    for rep in range(reps):
        for kind in rotated(kinds, rep):
            elapsed, loaded = timed(lambda k=kind: run(k))
            del loaded
            gc.collect()
            samples[kind].append(elapsed)
            log(f"load rep {rep + 1}/{reps} {LOAD_LABELS[kind]}: {elapsed:.3f} s")
    return samples


def phase_lazy(state: State, name: str, work: Path, reps: int) -> dict[str, list[float]]:
    from safetensors import safe_open

    import ckptvault

    ckv_path, safe_path = work / FILE_NAMES[CKV], work / FILE_NAMES[SAFE]
    key = f"model.{name}"

    def ckv() -> torch.Tensor:
        with ckptvault.open(str(ckv_path)) as ck:
            t = ck["model"][name]
        touch_pages(t)
        return t

    def safe() -> torch.Tensor:
        with safe_open(str(safe_path), framework="pt", device="cpu") as fh:
            t = fh.get_tensor(key)
        touch_pages(t)
        return t

    fns: dict[str, Callable[[], torch.Tensor]] = {"ckv": ckv, "safe": safe}
    for fn in fns.values():  # warm-up and correctness
        if not torch.equal(fn(), state["model"][name]):
            raise AssertionError(f"lazy read of {name!r} returned different values")
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps):
        for kind in rotated(list(fns), rep):
            elapsed, _ = timed(fns[kind])
            samples[kind].append(elapsed * 1000)
    return samples


def phase_tiny(work: Path, reps: int) -> dict[str, list[float]]:
    import ckptvault

    state = tiny_state()
    root = work / "tiny"
    root.mkdir()

    def ckv(path: Path) -> None:
        ckptvault.save(str(path), state)

    def torch_save(path: Path) -> None:
        with open(path, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())

    fns: dict[str, Callable[[Path], None]] = {"ckv": ckv, "torch": torch_save}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for kind, fn in fns.items():
        fn(root / f"warm_{kind}")
    for rep in range(reps):
        for kind in rotated(list(fns), rep):
            target = root / f"{kind}_{rep}"
            os.sync()
            elapsed, _ = timed(lambda fn=fns[kind], p=target: fn(p))
            samples[kind].append(elapsed * 1000)
    remove(root)
    return samples


# --------------------------------------------------------------------------- peak RSS (subprocess)


def child_main(args: argparse.Namespace) -> None:
    """Run one save or load in this fresh process and print its memory numbers as one JSON line."""
    import safetensors.torch  # noqa: F401  (imported before the baseline, like ckptvault below)
    import torch.distributed.checkpoint  # noqa: F401

    import ckptvault  # noqa: F401

    op, _, kind = args.child_op.partition(":")
    path = Path(args.child_path)
    spec = make_spec(args.size_mib * MIB, count=args.tensors, seed=args.seed)
    if op == "save":
        state: Any = build_state(spec, seed=args.seed)
        run: Callable[[], Any] = lambda: save_contenders(state, [kind])[kind](path)  # noqa: E731
    else:
        run = lambda: touch_pages(load_contenders(spec, [kind])[kind](path))  # noqa: E731
    gc.collect()
    exact = reset_peak_rss()
    before = proc_status_kib("VmRSS", "VmHWM")
    baseline = before["VmRSS"] if exact else before["VmHWM"]
    run()
    after = proc_status_kib("VmRSS", "VmHWM")
    print(json.dumps({"baseline_kib": baseline, "peak_kib": after["VmHWM"], "hwm_reset": exact}))


def measure_rss(args: argparse.Namespace, op: str, path: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child-op",
        op,
        "--child-path",
        str(path),
        "--size-mib",
        str(args.size_mib),
        "--tensors",
        str(args.tensors),
        "--seed",
        str(args.seed),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def phase_rss(
    args: argparse.Namespace, save_kinds: list[str], load_kinds: list[str], work: Path
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for kind in save_kinds:
        target = work / f"rss_{FILE_NAMES[kind]}"
        remove(target)
        out[f"save:{kind}"] = measure_rss(args, f"save:{kind}", target)
        remove(target)
        log(f"rss save {SAVE_LABELS[kind]}: {out[f'save:{kind}']}")
    for kind in load_kinds:
        out[f"load:{kind}"] = measure_rss(args, f"load:{kind}", work / FILE_NAMES[LOAD_SOURCE[kind]])
        log(f"rss load {LOAD_LABELS[kind]}: {out[f'load:{kind}']}")
    return out


# --------------------------------------------------------------------------- report


def report(results: dict[str, Any]) -> tuple[str, list[tuple[str, str, bool]]]:
    """The printed report and the list of (target, measured, ok)."""
    nbytes = results["state"]["nbytes"]
    gib = nbytes / GIB
    out: list[str] = []
    checks: list[tuple[str, str, bool]] = []

    save = results["save"]
    raw_med = save[RAW]["median"]
    rows = []
    for kind, entry in save.items():
        med = entry["median"]
        target = ""
        if kind == CKV:
            vs_raw = raw_med / med
            vs_torch = save[TORCH]["median"] / med if TORCH in save else float("nan")
            ok = vs_raw >= TARGET_SAVE_VS_RAW and vs_torch > 1.0
            target = f">= {TARGET_SAVE_VS_RAW:.2f}x raw and faster than torch.save: {verdict(ok)}"
            checks.append(
                (
                    f"save >= {TARGET_SAVE_VS_RAW}x raw write+fsync, faster than torch.save",
                    f"{vs_raw:.2f}x raw, {vs_torch:.2f}x torch.save",
                    ok,
                )
            )
        rows.append(
            [
                SAVE_LABELS[kind],
                f"{med:.3f}",
                f"{gib / med:.2f}",
                f"{raw_med / med:.2f}x",
                fmt_samples(entry["samples"], 2),
                target,
            ]
        )
    out.append(f"## 1. Save {gib:.2f} GiB, {results['state']['tensors']} tensors (fsync included)\n")
    out.append(md_table(["contender", "median s", "GiB/s", "speed vs raw", "samples s", "target"], rows))

    load = results["load"]
    safe_med = load[SAFE]["median"] if SAFE in load else float("nan")
    torch_med = load[TORCH]["median"] if TORCH in load else float("nan")
    rows = []
    for kind, entry in load.items():
        med = entry["median"]
        target = ""
        # Like against like: the default load returns private memory (verified bytes that a later
        # change to the file cannot alter), as torch.load(mmap=False) does; the mmap opt-in returns
        # views of the file, as safetensors.load_file does.
        anchor, anchor_med = ("torch.load", torch_med) if kind == CKV_V else ("safetensors", safe_med)
        if kind in (CKV_V, CKV_MAP):
            ok = med <= anchor_med
            target = f"no slower than {anchor}: {verdict(ok)}"
            checks.append((f"{LOAD_LABELS[kind]} no slower than {anchor}", f"{anchor_med / med:.2f}x", ok))
        rows.append(
            [
                LOAD_LABELS[kind],
                f"{med:.3f}",
                f"{gib / med:.2f}",
                f"{safe_med / med:.2f}x",
                fmt_samples(entry["samples"], 2),
                target,
            ]
        )
    out.append(
        f"\n## 2. Full load {gib:.2f} GiB (page cache WARM: files were just written; every page touched)\n"
    )
    out.append(
        md_table(["contender", "median s", "GiB/s", "speed vs safetensors", "samples s", "target"], rows)
    )

    if CKV_NV in load and SAFE in load:
        ratio = load[CKV_NV]["median"] / safe_med
        checks.append(
            (f"{LOAD_LABELS[CKV_NV]} <= 1.5x safetensors load_file (1 GiB)", f"{ratio:.2f}x", ratio <= 1.5)
        )

    lazy = results["lazy"]
    name, size = results["lazy_tensor"]["name"], results["lazy_tensor"]["nbytes"]
    ok = lazy["ckv"]["median"] < TARGET_LAZY_MS
    checks.append((f"lazy open + one tensor < {TARGET_LAZY_MS:g} ms", f"{lazy['ckv']['median']:.2f} ms", ok))
    ratio = lazy["ckv"]["median"] / lazy["safe"]["median"]
    count = results["state"]["tensors"]
    checks.append(
        (
            f"lazy open + one tensor at {count} tensors <= {TARGET_LAZY_VS_SAFE}x safe_open",
            f"{ratio:.2f}x",
            ratio <= TARGET_LAZY_VS_SAFE,
        )
    )
    rows = [
        [
            "ckptvault.open + ck['model'][name]",
            f"{lazy['ckv']['median']:.2f}",
            f"{ratio:.2f}x",
            f"< {TARGET_LAZY_MS:g} ms: {verdict(ok)}; <= {TARGET_LAZY_VS_SAFE}x: "
            f"{verdict(ratio <= TARGET_LAZY_VS_SAFE)}",
        ],
        ["safetensors safe_open + get_tensor", f"{lazy['safe']['median']:.2f}", "1.00x", ""],
    ]
    out.append(f"\n## 3. Lazy open + one tensor ({name}, {size / MIB:.2f} MiB, warm, pages touched)\n")
    out.append(md_table(["contender", "median ms", "vs safe_open", "target"], rows))

    tiny = results["tiny"]
    ok = tiny["ckv"]["median"] < TARGET_TINY_MS
    checks.append((f"tiny state save < {TARGET_TINY_MS:g} ms", f"{tiny['ckv']['median']:.2f} ms", ok))
    rows = [
        ["ckptvault.save", f"{tiny['ckv']['median']:.2f}", f"< {TARGET_TINY_MS:g} ms: {verdict(ok)}"],
        ["torch.save + fsync", f"{tiny['torch']['median']:.2f}", ""],
    ]
    out.append("\n## 4. Fixed cost: save {'step': 1, 'w': torch.zeros(4)} to a fresh path\n")
    out.append(md_table(["contender", "median ms", "target"], rows))

    if results.get("rss"):
        rows = []
        for key, entry in results["rss"].items():
            op, _, kind = key.partition(":")
            label = (SAVE_LABELS if op == "save" else LOAD_LABELS)[kind]
            if "error" in entry:
                rows.append([op, label, "-", "-", "-", f"error: {entry['error']}"])
                continue
            extra = (entry["peak_kib"] - entry["baseline_kib"]) * 1024
            pct = extra / nbytes
            target = ""
            if key == f"save:{CKV}":
                ok = pct < TARGET_SAVE_EXTRA_RSS
                target = f"< {TARGET_SAVE_EXTRA_RSS:.0%} of state: {verdict(ok)}"
                checks.append(
                    (f"save peak extra RSS < {TARGET_SAVE_EXTRA_RSS:.0%} of state", f"{pct:.1%}", ok)
                )
            if not entry.get("hwm_reset", True):
                target += " (approx: VmHWM reset unavailable)"
            rows.append(
                [op, label, f"{entry['baseline_kib'] / 1024:.0f}", f"{extra / MIB:.0f}", f"{pct:.1%}", target]
            )
        out.append(
            "\n## 5. Peak RSS, fresh subprocess each (peak VmHWM minus baseline VmRSS; save baseline "
            "includes the built state, so save % = EXTRA over the state; load % ~100% = the state itself)\n"
        )
        out.append(
            md_table(["op", "contender", "baseline MiB", "peak - baseline MiB", "% of state", "target"], rows)
        )

    more, more_checks = report_rows(results, verdict, md_table)
    out.append(more)
    checks += more_checks

    out.append("\n## Acceptance targets\n")
    out.append(md_table(["target", "measured", "verdict"], [[t, m, verdict(ok)] for t, m, ok in checks]))
    return "\n".join(out), checks


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_dir = Path(__file__).resolve().parent / "out"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size-mib", type=int, default=1024, help="total tensor bytes of the state (MiB)")
    p.add_argument("--reps", type=int, default=5, help="repetitions of the save and load phases")
    p.add_argument("--tensors", type=int, default=200, help="number of tensors in the state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lazy-reps", type=int, default=20)
    p.add_argument("--tiny-reps", type=int, default=30)
    p.add_argument("--dir", type=Path, default=default_dir, help="parent of the scratch dir (not tmpfs)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write raw samples and medians")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--no-dcp", action="store_true", help="skip the torch.distributed.checkpoint anchor")
    p.add_argument("--many-count", type=int, default=50_000, help="tensors of the many-small-tensors rows")
    p.add_argument("--many-reps", type=int, default=3, help="repetitions of the many-tensor save and load")
    p.add_argument("--many-lazy-reps", type=int, default=7)
    p.add_argument("--big-reps", type=int, default=20, help="repetitions of the 16 MiB verified lazy read")
    p.add_argument("--no-many", action="store_true", help="skip the many-small-tensors rows")
    p.add_argument("--child-op", help=argparse.SUPPRESS)
    p.add_argument("--child-path", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def summarize(samples: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    return {k: {"samples": v, "median": median(v)} for k, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_op:
        child_main(args)
        return 0

    args.dir.mkdir(parents=True, exist_ok=True)
    info = machine_info(args.dir)
    print("# ckptvault save/load benchmark\n")
    print(
        f"machine: {info['cores_usable']} usable cores ({info['cores_logical']} logical), "
        f"{info['ram_gib']} GiB RAM, {info['platform']}"
    )
    print(
        f"python {info['python']}, torch {info['torch']} ({info['torch_threads']} threads), "
        f"numpy {info['numpy']}, "
        f"safetensors {info['safetensors']}, blake3 {info['blake3']}, ckptvault {info['ckptvault']}"
    )
    print(f"scratch filesystem: {info['work_dir_fs']} ({info['work_dir_free_gib']} GiB free)")
    if info["work_dir_fs"] in ("tmpfs", "ramfs"):
        print("WARNING: the scratch dir is in RAM; fsync costs nothing there. Pass --dir on a real disk.")

    spec = make_spec(args.size_mib * MIB, count=args.tensors, seed=args.seed)
    log(f"building state: {len(spec.shapes)} tensors, {spec.nbytes / MIB:.1f} MiB")
    state = build_state(spec, seed=args.seed)
    sizes = sorted(4 * int(torch.Size(s).numel()) for s in spec.shapes.values())
    print(
        f"state: {{'model': {{name: fp32}}}}, {len(sizes)} tensors, {spec.nbytes / GIB:.3f} GiB, "
        f"sizes {sizes[0] / 1024:.1f} KiB .. {sizes[-1] / MIB:.1f} MiB "
        f"(median {sizes[len(sizes) // 2] / MIB:.2f} MiB), "
        f"seed {args.seed}; reps {args.reps} (contender order rotates each rep), medians reported\n"
    )

    work = Path(tempfile.mkdtemp(prefix="save_load_", dir=args.dir))
    notes: list[str] = []
    try:
        save_kinds = [RAW, CKV, TORCH, SAFE, DCP]
        load_kinds = [CKV_V, CKV_NV, CKV_MAP, TORCH, SAFE, SAFE_COPY, DCP]
        why = "skipped by --no-dcp" if args.no_dcp else probe_dcp(work)
        if why is not None:
            save_kinds.remove(DCP)
            load_kinds.remove(DCP)
            notes.append(f"torch.distributed.checkpoint anchor omitted: {why}")

        results: dict[str, Any] = {
            "machine": info,
            "args": {
                k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if "child" not in k
            },
            "state": {"tensors": len(spec.shapes), "nbytes": spec.nbytes},
        }
        results["save"] = summarize(phase_save(state, save_kinds, work, args.reps))
        write_load_sources(state, load_kinds, work)
        results["load"] = summarize(phase_load(state, spec, load_kinds, work, args.reps, notes))
        name = spec.median_tensor()
        results["lazy_tensor"] = {"name": name, "nbytes": state["model"][name].nbytes}
        results["lazy"] = summarize(phase_lazy(state, name, work, args.lazy_reps))
        results["tiny"] = summarize(phase_tiny(work, args.tiny_reps))
        results["big_verified"] = phase_big_verified(work, args.big_reps, args.seed, log)
        if not args.no_many:
            dcp = DCP in save_kinds
            results["many"] = phase_many(
                work, args.many_count, args.many_reps, args.many_lazy_reps, args.seed, dcp, log
            )
        rss_loads = [k for k in load_kinds if k != SAFE_COPY]
        results["rss"] = {} if args.no_rss else phase_rss(args, save_kinds, rss_loads, work)
        if args.no_rss:
            notes.append("peak RSS skipped (--no-rss)")
    finally:
        remove(work)

    text, checks = report(results)
    print(text)
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
