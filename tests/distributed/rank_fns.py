"""Rank functions for the real-process distributed tests (run by ``ckptvault.testing.ranks.run_ranks``).

They live in an importable module, not in the test files, because ``run_ranks`` starts its ranks
with ``spawn``: each child imports ``fn`` by module and name. Every rank builds the expected whole
tensors itself from a seed (the same values at every world size), so a load is checked bitwise on
the rank that did it, and a mismatch raises there -- ``run_ranks`` then fails the test with that
rank's traceback. Starting a rank costs seconds, so one job runs a list of operations.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import ckptvault.distributed as cvd

# name -> (placement, builder of the whole tensor from a generator). Shapes chosen to split
# unevenly: 37 rows/columns over 2 or 4 ranks, 3 rows over 4 ranks (one rank holds nothing).
Builder = Callable[[torch.Generator], torch.Tensor]
LAYOUTS: dict[str, tuple[str, Builder]] = {
    "rows37": ("shard0", lambda g: torch.randn(37, 8, generator=g)),
    "cols37": ("shard1", lambda g: torch.randn(6, 37, generator=g)),
    "tiny3": ("shard0", lambda g: torch.randn(3, 5, generator=g)),
    "replicated": ("replicate", lambda g: torch.randn(4, 4, generator=g)),
    "bf16": ("shard0", lambda g: torch.randn(16, 3, generator=g).to(torch.bfloat16)),
    "int64": ("shard0", lambda g: torch.randint(-(2**40), 2**40, (9,), generator=g)),
    "plain": ("plain", lambda g: torch.randn(5, 5, generator=g)),
    "scalar": ("plain", lambda g: torch.randn((), generator=g)),
}
PLACEMENTS = {"shard0": [Shard(0)], "shard1": [Shard(1)], "replicate": [Replicate()]}


def whole_tensors(seed: int) -> dict[str, torch.Tensor]:
    """The layout state's whole tensors: a function of ``seed`` only, never of the world size."""
    gen = torch.Generator().manual_seed(seed)
    return {name: build(gen) for name, (_, build) in LAYOUTS.items()}


def values(seed: int) -> dict[str, Any]:
    """The layout state's non-tensor values: an int step and optimizer-like param_groups with tuples."""
    return {
        "step": 1000 + seed,
        "optim": {
            "param_groups": [
                {"lr": 0.01 * seed, "betas": (0.9, 0.95), "params": ["rows37", "cols37"], "name": None},
                {"lr": 0.5, "betas": (0.8, 0.99), "params": ["bf16"], "tags": ("a", 2, 3.5)},
            ]
        },
    }


def layout_state(mesh: DeviceMesh | None, seed: int, *, blank: bool = False) -> dict[str, Any]:
    """The state to save (``blank=False``) or a same-shaped target to load into, whose tensors are
    zeros and whose values differ from every saved one, so a load that skipped anything shows."""
    state: dict[str, Any] = {"tensors": {}}
    for name, full in whole_tensors(seed).items():
        kind = LAYOUTS[name][0]
        if blank:
            full = torch.zeros_like(full)
        state["tensors"][name] = (
            full if kind == "plain" or mesh is None else distribute_tensor(full, mesh, PLACEMENTS[kind])
        )
    if blank:
        state["step"] = -1
        state["optim"] = {
            "param_groups": [
                {"lr": -1.0, "betas": (0.0, 0.0), "params": ["?"], "name": "x"},
                {"lr": -1.0, "betas": (0.0, 0.0), "params": ["?"], "tags": ()},
            ]
        }
    else:
        state.update(values(seed))
    return state


def check_layout(state: dict[str, Any], seed: int, where: str) -> int:
    """Raises unless ``state`` holds exactly the saved state of ``seed`` (bitwise); returns how
    many tensors were compared. Collective: every rank calls it (``full_tensor``)."""
    expected = whole_tensors(seed)
    for name, want in expected.items():
        got = state["tensors"][name]
        got = got.full_tensor() if isinstance(got, DTensor) else got
        if got.dtype != want.dtype or not torch.equal(got, want):
            raise AssertionError(f"{where}: tensor {name} differs after load")
    want_values = values(seed)
    got_values = {k: state[k] for k in want_values}
    if got_values != want_values:
        raise AssertionError(f"{where}: values differ: {got_values!r} != {want_values!r}")
    return len(expected)


def mesh_for(world: int) -> DeviceMesh:
    return init_device_mesh("cpu", (world,))


# -- FSDP2 --------------------------------------------------------------------------------------


def make_model() -> torch.nn.Module:
    """3 Linear layers and a LayerNorm, about 100k parameters."""
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256),
        torch.nn.LayerNorm(256),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 64),
    )


def build_training(world: int, seed: int, fsdp: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = make_model()
    if fsdp:
        mesh = mesh_for(world)
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def gathered(node: Any) -> Any:
    """``node`` with every DTensor replaced by its whole tensor (collective) and tensors cloned."""
    if isinstance(node, DTensor):
        return node.full_tensor()
    if isinstance(node, torch.Tensor):
        return node.detach().clone()
    if isinstance(node, dict):
        return {k: gathered(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(gathered(v) for v in node)
    return node


def save_fsdp(rank: int, world: int, path: str) -> Any:
    """Trains an FSDP2 model 3 AdamW steps (same data on every rank) and saves model+optimizer;
    returns the whole saved state from rank 0."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = build_training(world, 0, fsdp=True)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        model(torch.randn(8, 64, generator=gen)).square().mean().backward()
        optim.step()
        optim.zero_grad()
    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optim": osd}
    cvd.save(state, path)
    full = gathered(state)
    return full if rank == 0 else None


def load_fsdp(rank: int, world: int, path: str, fsdp: bool) -> Any:
    """A fresh model (another seed, FSDP2 or plain) and optimizer, loaded from ``path`` through
    ``set_state_dict``; returns rank 0's whole state read back from the model and optimizer, and
    whether the fresh model differed from it before the load."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, optim = build_training(world, 1, fsdp=fsdp)
    msd, osd = get_state_dict(model, optim)  # initialises the optimizer's state (zeros)
    before = gathered({"model": msd})
    state = {"model": msd, "optim": osd}
    cvd.load(state, path)
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    msd, osd = get_state_dict(model, optim)
    after = gathered({"model": msd, "optim": osd})
    return (before, after) if rank == 0 else None


# -- jobs ---------------------------------------------------------------------------------------


def job(rank: int, world: int, ops: list[tuple[Any, ...]]) -> list[Any]:
    """Runs ``ops`` in order on every rank; returns each op's result (what rank 0 reports).

    ops: ("save", path, seed), ("load", path, seed), ("save_fsdp", path), ("load_fsdp", path, fsdp)."""
    mesh = mesh_for(world)
    out: list[Any] = []
    for op, path, *rest in ops:
        if op == "save":
            cvd.save(layout_state(mesh, rest[0]), path, piece_bytes=4096)
            out.append(None)
        elif op == "load":
            state = layout_state(mesh, rest[0], blank=True)
            cvd.load(state, path)
            out.append(check_layout(state, rest[0], f"world {world} loading {path}"))
        elif op == "save_fsdp":
            out.append(save_fsdp(rank, world, path))
        elif op == "load_fsdp":
            out.append(load_fsdp(rank, world, path, rest[0]))
        else:
            raise ValueError(op)
        dist.barrier()
    return out


def failing_save(rank: int, world: int, parent: str, mode: str) -> dict[str, Any]:
    """Saves ``prev`` cleanly, then ``bad`` with a failure on rank 1 only: ``raise`` makes its
    file writing raise, ``refused`` gives it a value ckptvault will not encode. Returns what this
    rank got and how long the failed save took."""
    from ckptvault.distributed import writer

    mesh = mesh_for(world)
    cvd.save(layout_state(mesh, 3), os.path.join(parent, "prev"))
    state = layout_state(mesh, 4)
    if rank == 1 and mode == "raise":

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise OSError("injected: disk on fire")

        writer._write_files = broken
    if rank == 1 and mode == "refused":
        state["only_rank1"] = {"handle": object()}  # no stored form: not a tensor, not a plain value
    started = time.monotonic()
    try:
        cvd.save(state, os.path.join(parent, "bad"))
    except cvd.DistributedCheckpointError as exc:
        return {"error": str(exc), "failures": exc.failures, "seconds": time.monotonic() - started}
    return {"error": None, "seconds": time.monotonic() - started}


def killed_save(rank: int, world: int, parent: str, victim: int) -> None:
    """Saves ``prev``, then ``ck`` during which rank ``victim`` SIGKILLs itself right after it
    wrote its first data file into the staging area. The survivor writes what it got to
    ``<parent>/../survivor.json`` and leaves with ``os._exit(0)``: run_ranks makes every rank that
    answered wait until all ranks answered or the job's deadline passed, and a killed rank never
    answers, so answering normally would keep the survivor (and the test) until the deadline."""
    import ckptvault.engine.writer as engine_writer

    mesh = mesh_for(world)
    cvd.save(layout_state(mesh, 3), os.path.join(parent, "prev"))
    if rank == victim:
        original = engine_writer.write_data_file

        def write_then_die(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
            return result

        engine_writer.write_data_file = write_then_die
    started = time.monotonic()
    got: dict[str, Any] = {"error": None}
    try:
        cvd.save(layout_state(mesh, 4), os.path.join(parent, "ck"))
    except BaseException as exc:
        got["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    got["seconds"] = time.monotonic() - started
    with open(os.path.join(os.path.dirname(parent), "survivor.json"), "w") as out:
        json.dump(got, out)
    os._exit(0)


def async_saves(rank: int, world: int, parent: str) -> dict[str, Any]:
    """``dcp.async_save`` into a ckptvault ``StorageWriter`` with the thread executor, then with the
    process executor; each waited on, then loaded back and checked. Returns each one's outcome."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    mesh = mesh_for(world)
    out: dict[str, Any] = {}
    for kind, seed in (("thread", 5), ("process", 6)):
        path = os.path.join(parent, kind)
        try:
            future = dcp.async_save(
                layout_state(mesh, seed),
                storage_writer=cvd.StorageWriter(path),
                async_checkpointer_type=AsyncCheckpointerType(kind),
            )
            result = future.result(timeout=60) if hasattr(future, "result") else future
            state = layout_state(mesh, seed, blank=True)
            cvd.load(state, path)
            out[kind] = {"ok": check_layout(state, seed, f"async {kind}"), "result": repr(result)[:200]}
        except BaseException as exc:
            out[kind] = {"error": f"{type(exc).__name__}: {exc}"[:3000]}
        dist.barrier()
    return out


def s3_job(rank: int, world: int, url: str, op: str, seed: int) -> int:
    """Saves (``op="save"``) or loads and checks the layout state at an ``s3://`` URL."""
    mesh = mesh_for(world)
    if op == "save":
        cvd.save(layout_state(mesh, seed), url, piece_bytes=4096)
        return 0
    state = layout_state(mesh, seed, blank=True)
    cvd.load(state, url)
    return check_layout(state, seed, f"world {world} loading {url}")
