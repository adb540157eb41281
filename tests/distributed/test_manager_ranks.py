"""CheckpointManager + TrainState inside real torch.distributed jobs (gloo, spawned processes).

Starting ranks costs seconds, so three jobs serve every test (``tests/distributed/manager_ranks.py``):
one world-2 job runs each scenario in a run directory of its own, then the reference run's newest
checkpoint is restored at world 1 and at world 3 (FSDP2 on that mesh).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tests.distributed import manager_ranks

from ckptvault.engine.rundir import EVENTS_NAME, INDEX_NAME, LEASE_NAME
from ckptvault.testing.ranks import run_ranks

pytestmark = pytest.mark.distributed

WORLD = 2


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("manager_ranks")


@pytest.fixture(scope="module")
def ranks(root: Path) -> list[dict[str, Any]]:
    """Every world-2 scenario's result, rank by rank."""
    outcomes = run_ranks(manager_ranks.scenarios, WORLD, str(root), timeout=150, collective_timeout=30)
    return [o.value for o in outcomes]


@pytest.fixture(scope="module")
def restored(root: Path, ranks: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """The reference run restored at world 1 and world 3, rank by rank."""
    return {
        world: [
            o.value
            for o in run_ranks(
                manager_ranks.restore_at, world, str(root / "ref"), timeout=120, collective_timeout=30
            )
        ]
        for world in (1, 3)
    }


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_exact_resume_mid_epoch(ranks: list[dict[str, Any]]) -> None:
    """FSDP2 + AdamW + StepLR + DistributedSampler: killed after step 7 (mid-epoch 2), restored from
    step 6, run to the end == uninterrupted: weights, moments, LR, the batches each rank saw, and
    every global RNG's next draws and the metrics history, on every rank."""
    for rank, out in enumerate(ranks):
        ref, res = out["reference"], out["resumed"]
        assert res["restored"] == 6 and res["position"] == 1, rank  # one batch into the epoch
        assert res["seen"][:6] + res["seen"][7:] == ref["seen"], rank  # step 7's batch, then the same rest
        assert_bitwise(ref["tensors"], res["tensors"])
        assert any(".exp_avg_sq" in key for key in ref["tensors"])
        assert res["lr"] == ref["lr"] and res["draws"] == ref["draws"], rank
        # the metrics history comes back whole (DCP loads only keys its template has: fixed)
        assert res["history"]["step"].tolist() == list(range(1, 11))
        assert res["history"]["metrics"]["loss"].tolist() == ref["history"]["metrics"]["loss"].tolist()
    assert ranks[0]["reference"]["seen"] != ranks[1]["reference"]["seen"]  # each rank its own shard
    assert ranks[0]["reference"]["draws"] != ranks[1]["reference"]["draws"]  # and its own streams


def test_restore_at_other_world_sizes(ranks: list[dict[str, Any]], restored: dict[int, Any]) -> None:
    """Saved at 2, restored at 1 and at 3: consolidated model and optimizer bitwise equal; the
    warnings name the parts no rank could take (rank 1's at world 1) and the ranks that got none
    (rank 2 at world 3)."""
    reference = ranks[0]["reference"]
    for outs in restored.values():
        for out in outs:
            assert out["restored"] == 10
            assert_bitwise(reference["tensors"], out["tensors"])
            assert out["lr"] == reference["lr"]
    (single,) = restored[1]
    assert any("rank(s) [1] saved parts" in w and "no rank restored" in w for w in single["warnings"])
    three = restored[3]
    assert any(
        "rank 2 restored" in w and "rank 2's RNG states and data position" in w for w in three[2]["warnings"]
    )
    for rank in (0, 1):
        assert not any("RNG states" in w for w in three[rank]["warnings"]), rank


def test_preemption_signal_on_one_rank(ranks: list[dict[str, Any]], root: Path) -> None:
    """SIGTERM reaches rank 1 alone after step 3: every rank saves the preemption checkpoint at
    step 4 and stops; exactly one checkpoint exists."""
    for out in ranks:
        assert out["preempted"]["step"] == 4 and out["preempted"]["should_stop"]
        assert out["preempted"]["views"] == (["step_00000004"], "step_00000004")
    assert sorted(p.name for p in (root / "preempt").glob("step_*")) == ["step_00000004"]


def test_time_trigger_on_one_rank_is_decided_once(ranks: list[dict[str, Any]]) -> None:
    """every_seconds fires on rank 1 alone at step 2 (rank 0's "no" holds everywhere) and on rank
    0 alone at step 4 (every rank saves): the same decisions on every rank, no hang."""
    for out in ranks:
        assert out["clock"]["saved"] == [4]
        assert out["clock"]["views"] == (["step_00000004"], "step_00000004")


def test_only_rank_zero_keeps_the_books(ranks: list[dict[str, Any]], root: Path) -> None:
    """Index, events, lease, run document and retention's deletions come from rank 0 alone;
    keep_last=2 kept steps 8 and 10, and every rank's manager says so."""
    leader, follower = ranks[0]["reference"]["counts"], ranks[1]["reference"]["counts"]
    assert follower == {}
    assert leader["acquire"] == 1 and leader["write_index"] >= 5 and leader["delete_checkpoint"] == 3
    assert leader["append_event"] >= 5
    run = root / "ref"
    assert (run / INDEX_NAME).exists() and (run / EVENTS_NAME).exists() and (run / LEASE_NAME).exists()
    assert sorted(p.name for p in run.glob("step_*")) == ["step_00000008", "step_00000010"]
    for out in ranks:
        assert out["reference"]["views"] == (["step_00000008", "step_00000010"], "step_00000010")


def test_save_failing_on_one_rank_fails_every_rank(ranks: list[dict[str, Any]]) -> None:
    """An unencodable value on rank 1 only: step 4's save raises DistributedCheckpointError on
    every rank at once (not after a collective timeout), naming rank 1 and the value; step 2's
    checkpoint still restores and is every rank's latest."""
    for out in ranks:
        name, is_checkpoint_error, text = out["failing"]["error"]
        assert name == "DistributedCheckpointError" and is_checkpoint_error
        assert "rank(s) [1]" in text and "extras.holder.value" in text
        assert out["failing"]["seconds"] < 10
        assert out["failing"]["restored"] == 2
        assert out["failing"]["views"] == (["step_00000002"], "step_00000002")
