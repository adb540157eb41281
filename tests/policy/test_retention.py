"""Each retention option on its own, with the exact reason texts ``ckptvault ls`` prints."""

from __future__ import annotations

import math

import pytest

from ckptvault.policy import (
    KEEP_ALL,
    KEEP_LATEST,
    KEEP_PINNED,
    CheckpointRecord,
    RetentionPolicy,
    retention_reasons,
)

NOW = 1_000_000.0


def rec(
    step: int,
    *,
    epoch: int = 0,
    created: float | None = None,
    metrics: dict[str, float] | None = None,
    pinned: bool = False,
    valid: bool = True,
    name: str | None = None,
) -> CheckpointRecord:
    return CheckpointRecord(
        name=name or f"step_{step:08d}",
        step=step,
        epoch=epoch,
        created=NOW - 10_000 + step if created is None else created,
        scope="full",
        metrics=metrics or {},
        pinned=pinned,
        valid=valid,
    )


def kept(reasons: dict[str, tuple[str, ...]]) -> list[str]:
    return [name for name, why in reasons.items() if why]


def test_no_policy_keeps_everything_even_invalid():
    records = [rec(1), rec(2, valid=False), rec(3, pinned=True)]
    reasons = retention_reasons(records, RetentionPolicy(), now=NOW)
    assert reasons == {
        "step_00000001": (KEEP_ALL,),
        "step_00000002": (KEEP_ALL,),
        "step_00000003": (KEEP_PINNED, KEEP_LATEST, KEEP_ALL),
    }
    assert KEEP_ALL == "all kept (no retention policy)"


def test_monitor_alone_configures_no_retention_but_marks_the_best():
    records = [rec(1, metrics={"loss": 0.1}), rec(2, metrics={"loss": 0.5})]
    reasons = retention_reasons(records, RetentionPolicy(monitor="loss"), now=NOW)
    assert reasons == {"step_00000001": ("best loss", KEEP_ALL), "step_00000002": ("latest", KEEP_ALL)}


def test_empty_input():
    assert retention_reasons([], RetentionPolicy(keep_last=2), now=NOW) == {}


def test_keep_last():
    records = [rec(s) for s in range(1, 6)]
    reasons = retention_reasons(records, RetentionPolicy(keep_last=2), now=NOW)
    assert reasons == {
        "step_00000001": (),
        "step_00000002": (),
        "step_00000003": (),
        "step_00000004": ("last 2",),
        "step_00000005": ("latest", "last 2"),
    }


def test_newest_is_by_step_then_created_then_name_not_input_order():
    records = [
        rec(3, created=5.0, name="c"),
        rec(3, created=9.0, name="b"),
        rec(3, created=9.0, name="a"),
        rec(2),
    ]
    reasons = retention_reasons(records, RetentionPolicy(keep_last=1), now=NOW)
    assert kept(reasons) == ["b"]
    assert reasons["b"] == ("latest", "last 1")


def test_keep_best_min_ranks_and_keeps_latest():
    losses = {1: 0.9, 2: 0.3, 3: 0.5, 4: 0.1, 5: 0.8}
    records = [rec(s, metrics={"loss": v}) for s, v in losses.items()]
    reasons = retention_reasons(records, RetentionPolicy(keep_best=2, monitor="loss"), now=NOW)
    assert reasons == {
        "step_00000001": (),
        "step_00000002": ("best loss (2 of 2)",),
        "step_00000003": (),
        "step_00000004": ("best loss (1 of 2)",),
        "step_00000005": ("latest",),
    }


def test_keep_best_max_mode():
    accs = {1: 0.5, 2: 0.9, 3: 0.7}
    records = [rec(s, metrics={"val_acc": v}) for s, v in accs.items()]
    reasons = retention_reasons(records, RetentionPolicy(keep_best=1, monitor="val_acc", mode="max"), now=NOW)
    assert reasons == {"step_00000001": (), "step_00000002": ("best val_acc",), "step_00000003": ("latest",)}


def test_best_ignores_missing_nan_and_non_numbers_and_prefers_newer_on_ties():
    records = [
        rec(1, metrics={"loss": 0.2}),
        rec(2, metrics={"loss": math.nan}),
        rec(3, metrics={}),
        rec(4, metrics={"loss": "0.0"}),  # type: ignore[dict-item]
        rec(5, metrics={"loss": 0.2}),
        rec(6, metrics={"loss": 0.7}),
        rec(7),
    ]
    reasons = retention_reasons(records, RetentionPolicy(keep_best=2, monitor="loss"), now=NOW)
    assert reasons["step_00000005"] == ("best loss (1 of 2)",)  # tie: the newer checkpoint ranks first
    assert reasons["step_00000001"] == ("best loss (2 of 2)",)
    assert kept(reasons) == ["step_00000001", "step_00000005", "step_00000007"]


def test_keep_best_with_fewer_candidates_than_k():
    records = [rec(1, metrics={"loss": 1.0}), rec(2)]
    reasons = retention_reasons(records, RetentionPolicy(keep_best=3, monitor="loss"), now=NOW)
    assert reasons == {"step_00000001": ("best loss (1 of 3)",), "step_00000002": ("latest",)}


def test_keep_every_n_steps():
    records = [rec(s) for s in (500, 999, 1000, 1500, 2000, 2001)]
    reasons = retention_reasons(records, RetentionPolicy(keep_every_n_steps=1000), now=NOW)
    assert kept(reasons) == ["step_00001000", "step_00002000", "step_00002001"]
    assert reasons["step_00001000"] == ("every 1000 steps",)
    assert reasons["step_00002001"] == ("latest",)


def test_keep_every_n_epochs_keeps_the_first_checkpoint_of_each_multiple():
    # epoch = completed epochs: steps 1-2 are mid first epoch (epoch 0), 3 closes epoch 10, 4 is mid-11th
    records = [
        rec(1, epoch=0),
        rec(2, epoch=0),
        rec(3, epoch=10),
        rec(4, epoch=10),
        rec(5, epoch=15),
        rec(6, epoch=20),
    ]
    reasons = retention_reasons(records, RetentionPolicy(keep_every_n_epochs=10), now=NOW)
    assert reasons == {
        "step_00000001": (),
        "step_00000002": (),
        "step_00000003": ("every 10 epochs",),
        "step_00000004": (),
        "step_00000005": (),
        "step_00000006": ("latest", "every 10 epochs"),
    }


def test_keep_newer_than():
    records = [
        rec(1, created=NOW - 7200),
        rec(2, created=NOW - 3600),
        rec(3, created=NOW - 3599),
        rec(4, created=NOW),
    ]
    reasons = retention_reasons(records, RetentionPolicy(keep_newer_than=3600), now=NOW)
    assert reasons == {
        "step_00000001": (),
        "step_00000002": ("newer than 1h",),  # boundary included: created >= now - d
        "step_00000003": ("newer than 1h",),
        "step_00000004": ("latest", "newer than 1h"),
    }


def test_pinned_is_kept_and_invalid_is_deleted_unless_pinned():
    records = [
        rec(1, pinned=True),
        rec(2, valid=False),
        rec(3, valid=False, pinned=True),
        rec(4),
        rec(5, valid=False),
    ]
    reasons = retention_reasons(records, RetentionPolicy(keep_last=5, keep_every_n_steps=1), now=NOW)
    assert reasons == {
        "step_00000001": ("pinned", "last 5", "every 1 steps"),
        "step_00000002": (),
        "step_00000003": ("pinned",),
        "step_00000004": ("latest", "last 5", "every 1 steps"),  # step 5 is newer but invalid
        "step_00000005": (),
    }


def test_invalid_record_is_never_best():
    records = [rec(1, metrics={"loss": 0.0}, valid=False), rec(2, metrics={"loss": 1.0}), rec(3)]
    reasons = retention_reasons(records, RetentionPolicy(keep_last=1, monitor="loss"), now=NOW)
    assert reasons == {
        "step_00000001": (),
        "step_00000002": ("best loss",),
        "step_00000003": ("latest", "last 1"),
    }


def test_only_invalid_records_means_no_latest():
    records = [rec(1, valid=False), rec(2, valid=False)]
    reasons = retention_reasons(records, RetentionPolicy(keep_last=3), now=NOW)
    assert reasons == {"step_00000001": (), "step_00000002": ()}


def test_all_reasons_in_vocabulary_order():
    record = rec(1000, epoch=10, created=NOW, pinned=True, metrics={"loss": 0.1})
    policy = RetentionPolicy(
        keep_last=1,
        keep_best=2,
        monitor="loss",
        keep_every_n_steps=1000,
        keep_every_n_epochs=10,
        keep_newer_than=60,
    )
    assert retention_reasons([record], policy, now=NOW) == {
        "step_00001000": (
            "pinned",
            "latest",
            "best loss (1 of 2)",
            "last 1",
            "every 1000 steps",
            "every 10 epochs",
            "newer than 1m",
        )
    }


def test_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="share the name"):
        retention_reasons([rec(1, name="x"), rec(2, name="x")], RetentionPolicy(), now=NOW)


def test_result_follows_input_order():
    records = [rec(3), rec(1), rec(2)]
    assert list(retention_reasons(records, RetentionPolicy(keep_last=1), now=NOW)) == [
        r.name for r in records
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_last": 0}, "keep_last must be a positive integer"),
        ({"keep_last": -1}, "keep_last must be a positive integer"),
        ({"keep_last": True}, "keep_last must be a positive integer"),
        ({"keep_last": 2.0}, "keep_last must be a positive integer"),
        ({"keep_best": 0, "monitor": "loss"}, "keep_best must be a positive integer"),
        ({"keep_every_n_steps": 0}, "keep_every_n_steps must be a positive integer"),
        ({"keep_every_n_epochs": -3}, "keep_every_n_epochs must be a positive integer"),
        ({"keep_newer_than": 0}, "keep_newer_than must be a positive"),
        ({"keep_newer_than": math.inf}, "keep_newer_than must be a positive"),
        ({"keep_newer_than": math.nan}, "keep_newer_than must be a positive"),
        ({"keep_best": 2}, "keep_best needs monitor="),
        ({"monitor": ""}, "monitor must be a non-empty metric name"),
        ({"monitor": "loss", "mode": "lowest"}, "mode must be 'min' or 'max'"),
    ],
)
def test_policy_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetentionPolicy(**kwargs)


def test_configured():
    assert not RetentionPolicy().configured
    assert not RetentionPolicy(monitor="loss", mode="max").configured
    assert RetentionPolicy(keep_newer_than=1.0).configured
    assert RetentionPolicy(keep_best=1, monitor="loss").configured
