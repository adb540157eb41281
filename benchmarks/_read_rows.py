"""The rows issue 18 adds to ``save_load.py``: many small tensors, lazy reads, parse rate.

* **Many small tensors**: ``{"model": {name: fp32}}`` with ``--many-count`` tensors (50,000 by default)
  of 4-64 KiB drawn log-uniformly (an optimizer state of a large model). Save (fsync included), full
  load (pages touched) and lazy open + one tensor, each against torch.save/torch.load, safetensors
  and DCP in the same run, contenders rotated each repetition, medians reported.
* **Lazy open + one tensor** at that count, against ``safe_open`` + ``get_tensor`` on the same tensors
  (and, for information, ``torch.load(mmap=True)`` and a DCP load of just that tensor).
* **Verified lazy read of one 16 MiB tensor** against ``safe_open`` + ``get_tensor`` + BLAKE3 of the
  same bytes on all cores (``blake3(max_threads=blake3.AUTO)``).
* **Parse rate** of the strict JSON reader on the many-tensor manifest and data-file header, with
  the reader this issue replaced (``json.loads`` with a duplicate-refusing ``object_pairs_hook``)
  measured beside it.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import MIB, fsync_path, median, remove, rotated, timed, touch_pages

MANY = ("ckv", "torch", "safe", "dcp")
MANY_LABELS = {
    "ckv": "ckptvault",
    "torch": "torch.save / torch.load",
    "safe": "safetensors",
    "dcp": "torch DCP (no_dist)",
}
TARGET_LAZY_VS_SAFE = 1.5
TARGET_VERIFIED_LAZY = 1.3
TARGET_PARSE_MBS = 50.0


def many_state(count: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.uniform(np.log(4096), np.log(65536), size=count)).astype(np.int64) // 4
    gen = torch.Generator().manual_seed(seed)
    return {"model": {f"p{i}.exp_avg": torch.randn(int(n), generator=gen) for i, n in enumerate(sizes)}}


def _flat(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in state["model"].items()}


def _savers(state: dict[str, Any]) -> dict[str, Callable[[Path], None]]:
    import safetensors.torch

    import ckptvault

    flat = _flat(state)

    def ckv(p: Path) -> None:
        ckptvault.save(str(p), state)

    def torch_save(p: Path) -> None:
        with open(p, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())

    def safe(p: Path) -> None:
        safetensors.torch.save_file(flat, str(p))
        fsync_path(p)

    def dcp(p: Path) -> None:
        import torch.distributed.checkpoint as dist_cp

        dist_cp.save(state, storage_writer=dist_cp.FileSystemWriter(str(p), sync_files=True), no_dist=True)

    return {"ckv": ckv, "torch": torch_save, "safe": safe, "dcp": dcp}


def _loaders(state: dict[str, Any], verify_row: bool) -> dict[str, Callable[[Path], Any]]:
    import safetensors.torch

    import ckptvault

    shapes = {k: v.shape for k, v in state["model"].items()}

    def dcp(p: Path) -> Any:
        import torch.distributed.checkpoint as dist_cp

        target = {"model": {k: torch.empty(s) for k, s in shapes.items()}}
        dist_cp.load(target, storage_reader=dist_cp.FileSystemReader(str(p)), no_dist=True)
        return target

    out: dict[str, Callable[[Path], Any]] = {
        "ckv_verify": lambda p: ckptvault.load(str(p)),
        "ckv_noverify": lambda p: ckptvault.load(str(p), verify=False),
        "torch": lambda p: torch.load(p, weights_only=True, mmap=False),
        "safe": lambda p: safetensors.torch.load_file(str(p)),
        "dcp": dcp,
    }
    if not verify_row:
        out.pop("ckv_verify")
    return out


def _lazy_readers(name: str) -> dict[str, Callable[[Path], torch.Tensor]]:
    from safetensors import safe_open

    import ckptvault

    def ckv(p: Path) -> torch.Tensor:
        with ckptvault.open(str(p)) as ck:
            return ck["model"][name]  # type: ignore[no-any-return]

    def safe(p: Path) -> torch.Tensor:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            return fh.get_tensor(f"model.{name}")

    def torch_mmap(p: Path) -> torch.Tensor:
        return torch.load(p, weights_only=True, mmap=True)["model"][name]  # type: ignore[no-any-return]

    def dcp(p: Path) -> torch.Tensor:
        import torch.distributed.checkpoint as dist_cp

        reader = dist_cp.FileSystemReader(str(p))
        meta = reader.read_metadata().state_dict_metadata[f"model.{name}"]
        like = torch.empty(meta.size)  # type: ignore[union-attr]
        dist_cp.load({"model": {name: like}}, storage_reader=reader, no_dist=True)
        return like

    return {"ckv": ckv, "safe": safe, "torch": torch_mmap, "dcp": dcp}


def _timed_reps(fns: dict[str, Callable[[], Any]], reps: int, log: Callable[[str], None], what: str):
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps):
        for kind in rotated(list(fns), rep):
            elapsed, result = timed(fns[kind])
            del result
            samples[kind].append(elapsed)
            log(f"{what} rep {rep + 1}/{reps} {kind}: {elapsed:.4f} s")
    return {k: {"samples": v, "median": median(v)} for k, v in samples.items()}


def phase_many(
    work: Path, count: int, reps: int, lazy_reps: int, seed: int, dcp: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    """Save, load and lazy-open rows for ``count`` small tensors (see the module docstring)."""
    state = many_state(count, seed)
    nbytes = sum(t.nbytes for t in state["model"].values())
    log(f"many: {count} tensors, {nbytes / MIB:.0f} MiB")
    kinds = [k for k in MANY if dcp or k != "dcp"]
    savers = _savers(state)
    paths = {k: work / f"many_{k}" for k in kinds}
    for kind in kinds:  # warm-up on a tiny state: imports, pools
        warm = work / f"warm_many_{kind}"
        _savers({"model": {"x": torch.ones(8)}})[kind](warm)
        remove(warm)

    save: dict[str, list[float]] = {k: [] for k in kinds}
    for rep in range(reps):
        for kind in rotated(kinds, rep):
            remove(paths[kind])
            os.sync()
            elapsed, _ = timed(lambda k=kind: savers[k](paths[k]))
            save[kind].append(elapsed)
            log(f"many save rep {rep + 1}/{reps} {kind}: {elapsed:.3f} s")
    os.sync()
    out: dict[str, Any] = {"count": count, "nbytes": nbytes}
    out["save"] = {k: {"samples": v, "median": median(v)} for k, v in save.items()}

    loaders = _loaders(state, verify_row=True)
    source = {"ckv_verify": "ckv", "ckv_noverify": "ckv", "torch": "torch", "safe": "safe", "dcp": "dcp"}
    load_fns = {
        k: (lambda f=f, p=paths[source[k]]: touch_pages(f(p)))
        for k, f in loaders.items()
        if source[k] in kinds
    }
    for fn in load_fns.values():
        fn()  # warm-up: page cache, imports
    out["load"] = _timed_reps(load_fns, reps, log, "many load")

    name = f"p{count // 2}.exp_avg"
    expected = state["model"][name]
    lazy = _lazy_readers(name)
    lazy_fns: dict[str, Callable[[], Any]] = {}
    for kind in kinds:
        got = lazy[kind](paths[kind])
        if not torch.equal(got, expected):
            raise AssertionError(f"many lazy {kind}: wrong tensor")
        lazy_fns[kind] = lambda f=lazy[kind], p=paths[kind]: touch_pages(f(p))
    out["lazy_tensor"] = {"name": name, "nbytes": expected.nbytes}
    out["lazy"] = _timed_reps(lazy_fns, lazy_reps, log, "many lazy")

    manifest = (paths["ckv"] / "manifest.json").read_bytes()
    data = next(paths["ckv"].glob("data-*.safetensors"))
    with open(data, "rb") as fh:
        header = fh.read(int.from_bytes(fh.read(8), "little"))
    out["parse"] = phase_parse({"manifest": manifest, "header": header}, max(3, reps), log)
    for p in paths.values():
        remove(p)
    return out


def _old_loads(data: bytes) -> Any:
    """The strict reader before issue 18: json.loads with a Python hook for every object."""

    def no_dups(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key] = value
        return out

    def no_constant(name: str) -> Any:
        raise ValueError(name)

    return json.loads(data.decode("utf-8"), object_pairs_hook=no_dups, parse_constant=no_constant)


def phase_parse(docs: dict[str, bytes], reps: int, log: Callable[[str], None]) -> dict[str, Any]:
    """MB/s of the strict reader (and of the one it replaced) on each document, with the garbage
    collector ENABLED as in a reader (unlike ``timed``: the new reader pauses it itself, the old one
    paid for it -- most of its cost). The parsed value is freed after the clock stops."""
    from ckptvault.format.strictjson import loads

    out: dict[str, Any] = {}
    for what, data in docs.items():
        fns = {"strict": lambda d=data: loads(d), "before": lambda d=data: _old_loads(d)}
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for rep in range(reps):
            for kind in rotated(list(fns), rep):
                gc.collect()
                start = time.perf_counter()
                value = fns[kind]()
                samples[kind].append(time.perf_counter() - start)
                del value
                log(f"parse {what} rep {rep + 1}/{reps} {kind}: {samples[kind][-1]:.4f} s")
        rows = {k: {"samples": v, "median": median(v)} for k, v in samples.items()}
        out[what] = {"bytes": len(data), **rows}
    return out


def phase_big_verified(work: Path, reps: int, seed: int, log: Callable[[str], None]) -> dict[str, Any]:
    """A verified lazy read of one 16 MiB tensor against safe_open + get_tensor + BLAKE3 on all
    cores of the same bytes (a checkpoint of a few tensors, the big one in the middle)."""
    import blake3
    import safetensors.torch
    from safetensors import safe_open

    import ckptvault

    gen = torch.Generator().manual_seed(seed)
    model = {
        "before": torch.randn(1 << 20, generator=gen),
        "big": torch.randn(4 << 20, generator=gen),  # 16 MiB of fp32
        "after": torch.randn(1 << 20, generator=gen),
    }
    state = {"model": model}
    ckv_path, safe_path = work / "big_ckv", work / "big.safetensors"
    ckptvault.save(str(ckv_path), state)
    safetensors.torch.save_file(_flat(state), str(safe_path))

    def ckv() -> Any:
        with ckptvault.open(str(ckv_path)) as ck:
            t = ck["model"]["big"]
        touch_pages(t)
        return t

    def safe_blake3() -> Any:
        with safe_open(str(safe_path), framework="pt", device="cpu") as fh:
            t = fh.get_tensor("model.big")
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        hasher.update(t.numpy().view(np.uint8))
        touch_pages(t)
        return t, hasher.hexdigest()

    if not torch.equal(ckv(), model["big"]):
        raise AssertionError("verified lazy read returned different values")
    safe_blake3()
    out = _timed_reps({"ckv": ckv, "safe_blake3": safe_blake3}, reps, log, "big verified")
    remove(ckv_path)
    remove(safe_path)
    return {"nbytes": model["big"].nbytes, **out}


def fmt_s(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def report_rows(results: dict[str, Any], verdict: Callable[[bool], str], md_table: Callable[..., str]):
    """Markdown sections and (target, measured, ok) checks for the rows above."""
    out: list[str] = []
    checks: list[tuple[str, str, bool]] = []
    many = results.get("many")
    if many:
        n, mib = many["count"], many["nbytes"] / MIB
        rows = []
        best = min(v["median"] for k, v in many["save"].items() if k != "ckv")
        for kind, entry in many["save"].items():
            rows.append([MANY_LABELS[kind], fmt_s(entry["median"]), f"{best / entry['median']:.2f}x"])
        ok = many["save"]["ckv"]["median"] <= best
        checks.append(
            (f"save {n} small tensors <= best anchor", f"{best / many['save']['ckv']['median']:.2f}x", ok)
        )
        out.append(f"\n## 6. {n} tensors of 4-64 KiB ({mib:.0f} MiB): save, fsync included\n")
        out.append(md_table(["contender", "median", "speed vs best anchor"], rows))

        load = many["load"]
        best = min(load[k]["median"] for k in ("torch", "safe", "dcp") if k in load)
        rows = [
            [k, fmt_s(v["median"]), f"{best / v['median']:.2f}x", fmt_s(load["safe"]["median"])]
            for k, v in load.items()
        ]
        for k in ("ckv_verify", "ckv_noverify"):
            ok = load[k]["median"] <= best
            checks.append(
                (f"load {n} small tensors ({k}) <= best anchor", f"{best / load[k]['median']:.2f}x", ok)
            )
        ratio = load["ckv_noverify"]["median"] / load["safe"]["median"]
        checks.append(
            (f"load(verify=False) {n} tensors <= 1.5x safetensors load_file", f"{ratio:.2f}x", ratio <= 1.5)
        )
        out.append(f"\n## 7. {n} tensors: full load (page cache warm, every page touched)\n")
        out.append(md_table(["contender", "median", "speed vs best anchor", "safetensors"], rows))

        lazy = many["lazy"]
        rows = [
            [MANY_LABELS[k], fmt_s(v["median"]), f"{v['median'] / lazy['safe']['median']:.2f}x"]
            for k, v in lazy.items()
        ]
        ratio = lazy["ckv"]["median"] / lazy["safe"]["median"]
        checks.append(
            (
                f"lazy open + one tensor at {n} tensors <= {TARGET_LAZY_VS_SAFE}x safe_open",
                f"{ratio:.2f}x",
                ratio <= TARGET_LAZY_VS_SAFE,
            )
        )
        size = many["lazy_tensor"]["nbytes"] / 1024
        out.append(f"\n## 8. {n} tensors: lazy open + one tensor ({size:.0f} KiB, warm, pages touched)\n")
        out.append(md_table(["contender", "median", "time vs safe_open"], rows))

        rows = []
        for what, entry in many["parse"].items():
            mb = entry["bytes"] / 1e6
            strict, before = entry["strict"]["median"], entry["before"]["median"]
            rows.append([what, f"{mb:.1f} MB", fmt_s(strict), f"{mb / strict:.0f}", f"{mb / before:.0f}"])
            checks.append(
                (
                    f"strict JSON parse of the {what} >= {TARGET_PARSE_MBS:g} MB/s",
                    f"{mb / strict:.0f} MB/s",
                    mb / strict >= TARGET_PARSE_MBS,
                )
            )
        out.append(
            f"\n## 9. Strict JSON parse rate ({n}-tensor checkpoint; garbage collector on, as in a reader)\n"
        )
        out.append(md_table(["document", "size", "median", "MB/s", "MB/s before (json + hook)"], rows))
    big = results.get("big_verified")
    if big:
        ratio = big["ckv"]["median"] / big["safe_blake3"]["median"]
        checks.append(
            (
                f"verified lazy read of 16 MiB <= {TARGET_VERIFIED_LAZY}x safe_open + BLAKE3",
                f"{ratio:.2f}x",
                ratio <= TARGET_VERIFIED_LAZY,
            )
        )
        out.append("\n## 10. Verified lazy read of one 16 MiB tensor (warm, pages touched)\n")
        out.append(
            md_table(
                ["contender", "median", "ratio"],
                [
                    [
                        "ckptvault.open + ck['model']['big'] (verify=True)",
                        fmt_s(big["ckv"]["median"]),
                        f"{ratio:.2f}x",
                    ],
                    [
                        "safe_open + get_tensor + blake3(max_threads=AUTO)",
                        fmt_s(big["safe_blake3"]["median"]),
                        "1.00x",
                    ],
                ],
            )
        )
    return "\n".join(out), checks
