"""Rank functions of ``benchmarks/distributed.py`` (an importable module: ``run_ranks`` spawns).

Every rank builds the same FSDP2 model (seeded Linear layers, ``fully_shard`` per layer and at the
root on a gloo CPU mesh), runs one forward/backward on the same batch and one AdamW step, and takes
``get_state_dict`` -- DTensor shards of the parameters, ``exp_avg`` and ``exp_avg_sq``, the step
counters and ``param_groups``. Then it times DCP's ``FileSystemWriter``/``FileSystemReader`` and
``ckptvault.distributed.save``/``load`` on that state: a barrier, then the call, timed on every rank
(the parent reports the slowest rank). Every load goes into zeroed tensors and is checked against a
BLAKE3 digest of each full tensor taken before the save (gathered, hashed on rank 0, outside the
timed region). A warm load is preceded by an untimed read of every file of the checkpoint (ckptvault
writes data files with O_DIRECT, so they are not in the page cache after its save, DCP's are); a
cold one by ``sync`` and a page-cache drop on rank 0.
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DCP, CKV, CKV_NV = "dcp", "ckv", "ckv_noverify"
KINDS = (DCP, CKV)
WARM_KINDS = (DCP, CKV, CKV_NV)  # the unverified ckptvault load: a diagnostic row, warm only
WIDTH = 1024  # Linear(WIDTH, WIDTH): 4 MiB of fp32 weight each (+ bias)


def build_state(model_mib: int) -> tuple[Any, Any, dict[str, Any]]:
    """The FSDP2 model, its AdamW optimizer (stepped once) and ``{"model": ..., "optim": ...}``."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = max(1, round(model_mib * 1024 * 1024 / (4 * WIDTH * (WIDTH + 1))))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(1))
    model(batch).square().mean().backward()
    optim.step()
    optim.zero_grad(set_to_none=True)
    msd, osd = get_state_dict(model, optim)
    return model, optim, {"model": msd, "optim": osd}


def tensors_of(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    import torch

    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in tensors_of(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [kv for i, v in enumerate(obj) for kv in tensors_of(v, f"{prefix}.{i}")]
    return []


def digests(sd: dict[str, Any]) -> dict[str, str] | None:
    """BLAKE3 of every full tensor, on rank 0 (None elsewhere); every rank must call it (the
    DTensors are gathered)."""
    import blake3
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    out: dict[str, str] = {}
    for key, t in tensors_of(sd):
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if dist.get_rank() == 0:
            raw = full.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            out[key] = blake3.blake3(raw).hexdigest()
    return out if dist.get_rank() == 0 else None


def check(sd: dict[str, Any], expect: dict[str, str], what: str) -> None:
    """Raises on every rank unless ``sd`` holds exactly the tensors ``expect`` (rank 0's) digests."""
    import torch.distributed as dist

    got = digests(sd)
    bad = [] if got is None else sorted(k for k in expect if got.get(k) != expect[k])[:3]
    verdict = [bad]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise AssertionError(f"{what} differs from what was saved: {verdict[0]}")


def zero(sd: dict[str, Any]) -> None:
    from torch.distributed.tensor import DTensor

    for _, t in tensors_of(sd):
        (t.to_local() if isinstance(t, DTensor) else t).detach().zero_()


def local_bytes(sd: dict[str, Any]) -> int:
    from torch.distributed.tensor import DTensor

    return sum(
        (t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size() for _, t in tensors_of(sd)
    )


def disk_bytes(path: Path) -> int:
    """Apparent size of every file under ``path``."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as fh:
        fh.write("3")


def saver(kind: str, sd: dict[str, Any]) -> Callable[[Path], None]:
    import torch.distributed.checkpoint as dcp

    import ckptvault.distributed as ckd

    if kind == DCP:
        # DCP's defaults: sync_files=True (every file fsynced), one file per rank, thread_count=1
        return lambda path: dcp.save(sd, storage_writer=dcp.FileSystemWriter(path))
    return lambda path: ckd.save(sd, path)


def loader(kind: str, sd: dict[str, Any]) -> Callable[[Path], None]:
    import torch.distributed.checkpoint as dcp

    import ckptvault.distributed as ckd

    if kind == DCP:
        return lambda path: dcp.load(sd, storage_reader=dcp.FileSystemReader(path))
    # verify=True (the default): every block read is digest-checked
    return lambda path: ckd.load(sd, path, verify=kind != CKV_NV)


def timed_here(fn: Callable[[], None]) -> float:
    """Barrier, then ``fn`` timed on this rank (gc collected before, paused during)."""
    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        gc.enable()


def rotated(items: tuple[str, ...], rep: int) -> list[str]:
    k = rep % len(items)
    return [*items[k:], *items[:k]]


def prewarm(path: Path) -> None:
    """Rank 0 reads every file under ``path`` (untimed), so a warm load is warm for both
    contenders: ckptvault writes data files with O_DIRECT, leaving them out of the page cache."""
    import torch.distributed as dist

    dist.barrier()
    if dist.get_rank() == 0:
        for dirpath, _, files in os.walk(path):
            for name in files:
                with open(os.path.join(dirpath, name), "rb", buffering=0) as fh:
                    while fh.read(16 << 20):
                        pass
    dist.barrier()


def _load_checked(kind: str, sd: dict[str, Any], path: Path, expect: dict[str, str], cold: bool) -> float:
    import torch.distributed as dist

    zero(sd)
    if cold:
        dist.barrier()
        if dist.get_rank() == 0:
            drop_caches()
    else:
        prewarm(path)
    took = timed_here(lambda: loader(kind, sd)(path))
    check(sd, expect, f"{kind} load of {path}")
    return took


def _clear(path: Path) -> None:
    """Rank 0 removes ``path``; every rank waits for it (outside any timed region)."""
    import torch.distributed as dist

    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.sync()
    dist.barrier()


def _shared(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def bench_rank(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Save / warm load / cold load of both kinds, ``cfg["reps"]`` times (order rotating), after one
    untimed warm-up of each; with ``cfg["keep"]`` the last rep's checkpoints stay (for a reshard
    load at another world size); ``cfg["reshard"]``: {kind: (dir, digests)} to load here too."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    work = Path(cfg["work"]) / f"w{world}"
    cold_ok = bool(cfg["cold"])
    _, _, sd = build_state(cfg["model_mib"])
    expect = _shared(digests(sd))
    out: dict[str, Any] = {
        "local_bytes": local_bytes(sd),
        "samples": {},
        "disk_bytes": {},
        "digests": expect,
    }

    def note(op: str, kind: str, took: float) -> None:
        out["samples"].setdefault(f"{op}:{kind}", []).append(took)

    for kind in KINDS:  # warm-up, untimed: first-call costs (imports, thread pools) out of the way
        path = work / f"warmup-{kind}"
        saver(kind, sd)(path)
        _load_checked(kind, sd, path, expect, cold=False)
        _clear(path)
    last: dict[str, Path] = {}
    for rep in range(cfg["reps"]):
        paths = {kind: work / f"{kind}-{rep}" for kind in KINDS}
        for kind in rotated(KINDS, rep):
            note("save", kind, timed_here(lambda k=kind, p=paths[kind]: saver(k, sd)(p)))
            dist.barrier()
            if rank == 0:
                out["disk_bytes"][kind] = disk_bytes(paths[kind])
        for kind in rotated(WARM_KINDS, rep):
            path = paths[CKV if kind == CKV_NV else kind]
            note("load_warm", kind, _load_checked(kind, sd, path, expect, cold=False))
        if cold_ok:
            for kind in rotated(KINDS, rep):
                note("load_cold", kind, _load_checked(kind, sd, paths[kind], expect, cold=True))
        keep = cfg["keep"] and rep == cfg["reps"] - 1
        for kind in KINDS:
            if keep:
                last[kind] = paths[kind]
            else:
                _clear(paths[kind])
    reshard = cfg.get("reshard") or {}
    if reshard:
        for kind, (path, saved) in reshard.items():  # warm-up: the files enter the page cache
            _load_checked(kind, sd, Path(path), saved, cold=False)
        for rep in range(cfg["reps"]):
            for kind in rotated(tuple(reshard), rep):
                path, saved = reshard[kind]
                note("reshard_warm", kind, _load_checked(kind, sd, Path(path), saved, cold=False))
            if cold_ok:
                for kind in rotated(tuple(reshard), rep):
                    path, saved = reshard[kind]
                    note("reshard_cold", kind, _load_checked(kind, sd, Path(path), saved, cold=True))
    out["kept"] = {kind: str(p) for kind, p in last.items()}
    return out
