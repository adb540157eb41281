"""A distributed save that fails on one rank -- it raises, or it is SIGKILLed after it began
writing -- fails on every rank within a bounded time, leaves nothing visible at the target and no
staging area behind (or one the next save sweeps), and never harms the checkpoint saved before.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from tests.distributed import rank_fns

import ckptvault as cv
import ckptvault.distributed as cvd
from ckptvault.storage.local_common import STAGING_MARK
from ckptvault.testing.ranks import run_ranks

pytestmark = pytest.mark.distributed

COLLECTIVE_TIMEOUT = 10.0


def staging_in(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if STAGING_MARK in p.name]


def assert_previous_intact(parent: Path) -> None:
    state = cv.load(parent / "prev")
    assert state["step"] == 1003 and cv.verify(parent / "prev").ok


@pytest.mark.parametrize("mode", ["raise", "refused"])
def test_a_rank_that_raises_fails_every_rank_and_leaves_nothing(tmp_path: Path, mode: str) -> None:
    """``raise``: rank 1's file writing raises; ``refused``: rank 1 alone holds a value with no
    stored form (encoded by the coordinator at commit, so the error names the value, not rank 1)."""
    started = time.monotonic()
    outcomes = run_ranks(
        rank_fns.failing_save, 2, str(tmp_path), mode, timeout=90, collective_timeout=COLLECTIVE_TIMEOUT
    )
    assert time.monotonic() - started < 60
    for outcome in outcomes:
        got = outcome.value
        assert got["error"] is not None, f"rank {outcome.rank} saw the save succeed"
        assert got["seconds"] < COLLECTIVE_TIMEOUT, got  # failed by message, not by timeout
        if mode == "raise":
            assert "rank(s) [1]" in got["error"] and "injected: disk on fire" in got["error"], got
        else:
            assert "only_rank1" in got["error"], got
        assert got["failures"], got
    with pytest.raises(cv.CheckpointNotFoundError):
        cv.load(tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and staging_in(tmp_path) == []
    assert_previous_intact(tmp_path)


@pytest.mark.parametrize("victim", [1, 0], ids=["worker-killed", "coordinator-killed"])
def test_a_rank_killed_mid_save(tmp_path: Path, victim: int) -> None:
    parent = tmp_path / "ckpts"
    parent.mkdir()
    started = time.monotonic()
    outcomes = run_ranks(
        rank_fns.killed_save,
        2,
        str(parent),
        victim,
        timeout=60,
        collective_timeout=COLLECTIVE_TIMEOUT,
        check=False,
    )
    assert time.monotonic() - started < 45
    # neither answers: the victim is killed, the survivor reports through survivor.json and leaves
    assert all(o.value is None and str(o.error).startswith("no answer") for o in outcomes), outcomes
    assert outcomes[victim].exitcode == -9, outcomes
    survivor = json.loads((tmp_path / "survivor.json").read_text())
    assert survivor["error"] is not None, "the survivor's save succeeded without its peer"
    assert survivor["seconds"] < COLLECTIVE_TIMEOUT + 5, survivor
    tmp_path = parent
    with pytest.raises(cv.CheckpointNotFoundError):
        cv.load(tmp_path / "ck")
    assert_previous_intact(tmp_path)
    leftover = staging_in(tmp_path)
    if victim == 1:  # the coordinator survived and aborted the whole transaction
        assert leftover == []
    else:  # the coordinator's staging area outlives it, owned by a dead process
        assert len(leftover) == 1, leftover
    # a new save to the same target succeeds, and sweeps the dead save's staging area
    cvd.save(rank_fns.layout_state(None, 4), tmp_path / "ck")
    assert torch_equal_layout(cv.load(tmp_path / "ck"), 4)
    assert staging_in(tmp_path) == []


def torch_equal_layout(state: dict[str, object], seed: int) -> bool:
    import torch

    tensors = state["tensors"]
    assert isinstance(tensors, dict)
    return all(torch.equal(tensors[k], v) for k, v in rank_fns.whole_tensors(seed).items())
