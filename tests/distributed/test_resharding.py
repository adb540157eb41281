"""Real ranks, gloo on loopback: a checkpoint saved at any world size in {1, 2, 4} loads bitwise at
every other one -- DTensor ``Shard(0)``/``Shard(1)``/``Replicate()`` with uneven splits (37 over 4,
3 rows over 4 ranks), plain, 0-d, bf16 and int64 tensors, an int step and param_groups with tuples
-- and an FSDP2 model with its AdamW state reshards 2->4, 4->2 and 2->1 (a plain model).

The loads are checked on the ranks themselves (``rank_fns.check_layout`` raises on any difference,
failing the chain); here we assert that every pair was actually exercised and compare the FSDP2
states gathered at save and after load.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from tests.distributed import rank_fns
from tests.distributed.conftest import Chain

import ckptvault as cv

pytestmark = pytest.mark.distributed


def assert_bitwise(got: Any, want: Any, where: str = "") -> None:
    """Same nested structure, equal non-tensor values, tensors of equal dtype/shape/bits."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert torch.equal(got, want), f"{where}: values differ"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys {set(got) ^ set(want)}"
        for key in want:
            assert_bitwise(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_bitwise(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def test_every_pair_of_world_sizes_loads_bitwise(chain: Chain) -> None:
    loaded = {(int(name[1:]), world) for (world, op, name), _ in chain.results.items() if op == "load"} | {
        (2, 4)
    }  # L4same (seed 2) is saved at 4; L2 at 2
    pairs = {(n, m) for n, m in itertools.permutations((1, 2, 4), 2)}
    assert pairs <= loaded, f"pairs never loaded: {pairs - loaded}"
    for (world, op, name), value in chain.results.items():
        if op == "load":  # the number of tensors the rank compared bitwise
            assert value == len(rank_fns.LAYOUTS), (world, name)


def test_the_layout_state_round_trips_in_one_process(chain: Chain) -> None:
    """``ckptvault.load`` in one process consolidates each world's save to the same whole tensors."""
    for world in (1, 2, 4):
        state = cv.load(chain.path(f"L{world}"))
        assert_bitwise(state["tensors"], rank_fns.whole_tensors(world), f"L{world}")
        assert {k: state[k] for k in ("step", "optim")} == rank_fns.values(world)


def _fsdp_pair(chain: Chain, saved: tuple[int, str], loaded: tuple[int, str]) -> tuple[Any, Any, Any]:
    full = chain.results[(saved[0], "save_fsdp", saved[1])]
    before, after = chain.results[(loaded[0], "load_fsdp", loaded[1])]
    return full, before, after


@pytest.mark.parametrize(
    ("saved", "loaded"),
    [((2, "F2"), (4, "F2")), ((4, "F4"), (2, "F4")), ((2, "F2"), (1, "F2"))],
    ids=["fsdp2-2to4", "fsdp2-4to2", "fsdp2-2to1-plain-model"],
)
def test_fsdp2_model_and_optimizer_reshard_bitwise(
    chain: Chain, saved: tuple[int, str], loaded: tuple[int, str]
) -> None:
    full, before, after = _fsdp_pair(chain, saved, loaded)
    assert len(full["model"]) == 8 and sum(t.numel() for t in full["model"].values()) > 90_000
    assert len(full["optim"]["state"]) == 8
    assert all(int(s["step"]) == 3 for s in full["optim"]["state"].values())
    assert any(  # the fresh model really was different: the load changed it
        not torch.equal(before["model"][k], full["model"][k]) for k in full["model"]
    )
    assert_bitwise(after, full, f"{saved}->{loaded}")


def test_fsdp2_checkpoint_consolidates_in_one_process(chain: Chain) -> None:
    """The FSDP2 save read whole by ``ckptvault.load`` equals the state gathered at save time."""
    for world in (2, 4):
        full = chain.results[(world, "save_fsdp", f"F{world}")]
        assert_bitwise(cv.load(chain.path(f"F{world}")), full, f"F{world}")


def test_the_chain_stays_within_its_time(chain: Chain) -> None:
    assert len(chain.seconds) == 5 and sum(chain.seconds) < 120, chain.seconds
