"""Save triggers: each option, the reason texts, the state's persistence, and Young/Daly numbers."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptvault.policy import (
    FIRST_AUTO_INTERVAL_SECONDS,
    TriggerPolicy,
    TriggerState,
    auto_interval_seconds,
    epoch_trigger,
    step_trigger,
    young_daly_interval,
)
from ckptvault.policy.triggers import MIN_SAVE_COST_SECONDS, SAVE_COST_SMOOTHING

NO_METRICS: dict[str, float] = {}


def fire(
    policy: TriggerPolicy, state: TriggerState, step: int, now: float = 0.0, **metrics: float
) -> str | None:
    return step_trigger(policy, state, step=step, epoch=0, now=now, metrics=metrics)


# -- young/daly --------------------------------------------------------------------------------------
def test_young_daly_numbers():
    assert young_daly_interval(10, 86400) == pytest.approx(1314.534, abs=1e-3)
    assert young_daly_interval(60, 3600) == pytest.approx(math.sqrt(2 * 60 * 3600))
    assert young_daly_interval(1.0, 0.5) == pytest.approx(1.0)


@pytest.mark.parametrize(("cost", "mtbf"), [(0, 100), (-1, 100), (10, 0), (math.nan, 10), (10, math.inf)])
def test_young_daly_rejects_non_positive_or_non_finite(cost, mtbf):
    with pytest.raises(ValueError, match="must be a positive, finite number of seconds"):
        young_daly_interval(cost, mtbf)


def test_auto_interval_before_and_after_measuring():
    assert auto_interval_seconds(None, 86400) == FIRST_AUTO_INTERVAL_SECONDS == 600.0
    assert auto_interval_seconds(None, 120) == 120  # never later than one MTBF
    assert auto_interval_seconds(10, 86400) == young_daly_interval(10, 86400)
    assert auto_interval_seconds(0.0, 100) == young_daly_interval(MIN_SAVE_COST_SECONDS, 100)


# -- step triggers -----------------------------------------------------------------------------------
def test_every_n_steps():
    policy = TriggerPolicy(every_n_steps=500)
    state = TriggerState()
    assert fire(policy, state, 499) is None
    assert fire(policy, state, 500) == "every 500 steps"
    state.record_save(step=500, epoch=0, now=1.0, duration=1.0)
    assert fire(policy, state, 500) is None  # that step is saved already
    assert fire(policy, state, 501) is None
    assert fire(policy, state, 1000) == "every 500 steps"


def test_nothing_fires_at_or_before_the_last_saved_step():
    policy = TriggerPolicy(every_n_steps=1, every_seconds=1.0, on_improvement=True, monitor="loss")
    state = TriggerState(last_save_step=10)
    assert fire(policy, state, 10, now=1e9, loss=-1.0) is None
    assert fire(policy, state, 3, now=1e9, loss=-1.0) is None
    assert fire(policy, state, 11, now=1e9, loss=-1.0) == "every 1 steps"


def test_every_seconds_counts_from_the_last_save():
    policy = TriggerPolicy(every_seconds=600)
    state = TriggerState(last_save_time=1000.0)
    assert fire(policy, state, 1, now=1599.9) is None
    assert fire(policy, state, 2, now=1600.0) == "every 10m"
    state.record_save(step=2, epoch=0, now=1600.0, duration=3.0)
    assert fire(policy, state, 3, now=2199.0) is None
    assert fire(TriggerPolicy(every_seconds=90), TriggerState(), 1, now=90.0) == "every 90s"


def test_auto_before_any_measured_save_uses_the_first_interval():
    policy = TriggerPolicy(auto_mtbf_seconds=86400)
    state = TriggerState(last_save_time=0.0)
    assert fire(policy, state, 1, now=599.0) is None
    assert fire(policy, state, 2, now=600.0) == "auto interval 10m"
    short = TriggerPolicy(auto_mtbf_seconds=120)
    assert fire(short, state, 2, now=119.0) is None
    assert fire(short, state, 2, now=120.0) == "auto interval 2m"


def test_auto_after_a_measured_save_uses_young_daly():
    policy = TriggerPolicy(auto_mtbf_seconds=86400)
    state = TriggerState()
    state.record_save(step=10, epoch=0, now=1000.0, duration=10.0)
    interval = young_daly_interval(10.0, 86400)
    assert fire(policy, state, 11, now=1000.0 + interval - 0.01) is None
    assert fire(policy, state, 12, now=1000.0 + interval) == "auto interval 1315s"


def test_save_cost_is_a_moving_average():
    state = TriggerState()
    state.record_save(step=1, epoch=0, now=1.0, duration=10.0)
    assert state.save_cost_seconds == 10.0
    state.record_save(step=2, epoch=0, now=2.0, duration=20.0)
    assert state.save_cost_seconds == pytest.approx(SAVE_COST_SMOOTHING * 20 + (1 - SAVE_COST_SMOOTHING) * 10)
    assert (state.last_save_step, state.last_save_epoch, state.last_save_time) == (2, 0, 2.0)


@pytest.mark.parametrize("duration", [-1.0, math.nan, math.inf])
def test_record_save_rejects_bad_durations(duration):
    with pytest.raises(ValueError, match="save duration"):
        TriggerState().record_save(step=1, epoch=0, now=1.0, duration=duration)


def test_improvement_with_the_managers_order_observe_then_trigger():
    policy = TriggerPolicy(on_improvement=True, monitor="val_acc", mode="max")
    state = TriggerState()
    reports = {1: 0.5, 2: 0.4, 3: 0.5, 4: 0.7, 5: math.nan, 6: 0.6}
    fired = {}
    for step, value in reports.items():
        metrics = {"val_acc": value}
        state.observe(metrics, policy.monitor, policy.mode)
        fired[step] = fire(policy, state, step, **metrics)
        if fired[step] is not None:
            state.record_save(step=step, epoch=0, now=float(step), duration=0.1)
    assert fired == {1: "improved val_acc", 2: None, 3: None, 4: "improved val_acc", 5: None, 6: None}
    assert state.best == state.best_saved == 0.7


def test_improvement_without_observe_compares_with_best():
    policy = TriggerPolicy(on_improvement=True, monitor="loss")
    state = TriggerState(best=0.5, best_saved=0.5)
    assert fire(policy, state, 1, loss=0.5) is None  # equal is not better
    assert fire(policy, state, 1, loss=0.4) == "improved loss"
    assert fire(policy, state, 1, loss=math.nan) is None
    assert fire(policy, state, 1) is None  # metric absent


def test_an_observed_improvement_fires_until_a_save_covers_it():
    policy = TriggerPolicy(on_improvement=True, monitor="loss")
    state = TriggerState()
    assert state.observe({"loss": 1.0}, "loss", "min") is True
    assert fire(policy, state, 1) == "improved loss"  # reported earlier, not saved yet
    assert fire(policy, state, 2) == "improved loss"
    state.record_save(step=2, epoch=0, now=2.0, duration=0.1)
    assert fire(policy, state, 3) is None
    assert state.observe({"loss": 2.0}, "loss", "min") is False


def test_observe_ignores_what_is_not_a_number():
    state = TriggerState()
    assert state.observe({"loss": math.nan}, "loss", "min") is False
    assert state.observe({"loss": "low"}, "loss", "min") is False
    assert state.observe({"loss": True}, "loss", "min") is False
    assert state.observe({"loss": 1}, None, "min") is False
    assert state.best is None


def test_step_trigger_order_and_epoch_rules_never_fire_per_step():
    policy = TriggerPolicy(
        every_n_steps=10, every_seconds=5, every_n_epochs=1, on_improvement=True, monitor="m"
    )
    state = TriggerState()
    assert fire(policy, state, 10, now=100.0, m=1.0) == "every 10 steps"
    assert fire(policy, state, 11, now=100.0, m=1.0) == "every 5s"
    assert fire(policy, state, 11, now=1.0, m=1.0) == "improved m"
    assert step_trigger(TriggerPolicy(every_n_epochs=1), state, step=5, epoch=3, now=1e9, metrics={}) is None


# -- epoch triggers ----------------------------------------------------------------------------------
def test_every_n_epochs():
    policy = TriggerPolicy(every_n_epochs=10)
    state = TriggerState()
    assert epoch_trigger(policy, state, epoch=0, now=0.0, metrics=NO_METRICS) is None
    assert epoch_trigger(policy, state, epoch=9, now=0.0, metrics=NO_METRICS) is None
    assert epoch_trigger(policy, state, epoch=10, now=0.0, metrics=NO_METRICS) == "every 10 epochs"
    state.record_save(step=100, epoch=10, now=1.0, duration=1.0)
    assert epoch_trigger(policy, state, epoch=10, now=0.0, metrics=NO_METRICS) is None
    assert epoch_trigger(policy, state, epoch=20, now=0.0, metrics=NO_METRICS) == "every 10 epochs"


def test_epoch_trigger_improvement_and_ignores_step_rules():
    policy = TriggerPolicy(every_n_steps=1, every_seconds=1.0, on_improvement=True, monitor="val_loss")
    state = TriggerState()
    assert epoch_trigger(policy, state, epoch=1, now=1e9, metrics=NO_METRICS) is None
    assert epoch_trigger(policy, state, epoch=1, now=1e9, metrics={"val_loss": 0.3}) == "improved val_loss"


# -- policy validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": 0}, "every_n_steps must be a positive integer"),
        ({"every_n_steps": 1.5}, "every_n_steps must be a positive integer"),
        ({"every_n_epochs": -1}, "every_n_epochs must be a positive integer"),
        ({"every_seconds": 0}, "every_seconds must be a positive"),
        ({"every_seconds": math.inf}, "every_seconds must be a positive"),
        ({"auto_mtbf_seconds": -5}, "auto_mtbf_seconds must be a positive"),
        ({"on_improvement": True}, "on_improvement needs monitor="),
        ({"on_improvement": 1, "monitor": "x"}, "on_improvement must be True or False"),
        ({"monitor": "x", "mode": "best"}, "mode must be 'min' or 'max'"),
    ],
)
def test_policy_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TriggerPolicy(**kwargs)


# -- state persistence -----------------------------------------------------------------------------------
def test_state_round_trips_through_strict_json():
    state = TriggerState(7, 2, 123.5, best=-math.inf, best_saved=0.25, save_cost_seconds=3.0)
    text = json.dumps(state.to_dict(), allow_nan=False)
    assert TriggerState.from_dict(json.loads(text)) == state


def test_from_dict_defaults_missing_and_refuses_unknown_or_mistyped():
    assert TriggerState.from_dict({}) == TriggerState()
    assert TriggerState.from_dict({"last_save_step": 3, "best": None}) == TriggerState(last_save_step=3)
    with pytest.raises(ValueError, match="unknown trigger state fields"):
        TriggerState.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="last_save_step must be an integer"):
        TriggerState.from_dict({"last_save_step": 1.0})
    with pytest.raises(ValueError, match="best must be a number"):
        TriggerState.from_dict({"best": "high"})


finite_or_inf = st.floats(allow_nan=False)
states = st.builds(
    TriggerState,
    last_save_step=st.integers(0, 10**9),
    last_save_epoch=st.integers(0, 10**4),
    last_save_time=st.floats(0, 2e9),
    best=st.none() | finite_or_inf,
    best_saved=st.none() | finite_or_inf,
    save_cost_seconds=st.none() | st.floats(0, 1e4),
)


@settings(max_examples=200, deadline=None)
@given(states)
def test_state_round_trip_property(state):
    assert TriggerState.from_dict(json.loads(json.dumps(state.to_dict(), allow_nan=False))) == state


# -- properties over simulated runs -----------------------------------------------------------------------
trigger_policies = st.builds(
    TriggerPolicy,
    every_n_steps=st.none() | st.integers(1, 20),
    every_n_epochs=st.none() | st.integers(1, 3),
    every_seconds=st.none() | st.floats(0.5, 50),
    on_improvement=st.booleans(),
    monitor=st.just("loss"),
    mode=st.sampled_from(["min", "max"]),
    auto_mtbf_seconds=st.none() | st.floats(1, 1e5),
)
metric_reports = st.dictionaries(st.just("loss"), st.floats(-5, 5) | st.just(math.nan), max_size=1)


@settings(max_examples=150, deadline=None)
@given(trigger_policies, states, st.integers(0, 10**9), st.floats(0, 3e9), metric_reports)
def test_triggers_never_mutate_state(policy, state, step, now, metrics):
    before = asdict(state)
    step_trigger(policy, state, step=step, epoch=1, now=now, metrics=metrics)
    epoch_trigger(policy, state, epoch=step % 50, now=now, metrics=metrics)
    assert asdict(state) == before


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 25), st.integers(1, 200))
def test_every_n_steps_saves_exactly_the_multiples(n, steps):
    policy = TriggerPolicy(every_n_steps=n)
    state = TriggerState()
    saved = []
    for step in range(1, steps + 1):
        if fire(policy, state, step) is not None:
            saved.append(step)
            state.record_save(step=step, epoch=0, now=0.0, duration=0.1)
    assert saved == list(range(n, steps + 1, n))


@settings(max_examples=100, deadline=None)
@given(st.floats(0.5, 20), st.lists(st.floats(0.01, 5), min_size=1, max_size=150))
def test_every_seconds_saves_once_the_interval_has_passed_and_not_before(interval, gaps):
    policy = TriggerPolicy(every_seconds=interval)
    state = TriggerState(last_save_time=0.0)
    now = 0.0
    for step, gap in enumerate(gaps, start=1):
        now += gap
        due = now - state.last_save_time >= interval
        assert (fire(policy, state, step, now=now) is not None) == due
        if due:
            state.record_save(step=step, epoch=0, now=now, duration=0.0)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["min", "max"]), st.lists(metric_reports, max_size=60))
def test_improvement_saves_exactly_at_strict_new_bests(mode, reports):
    policy = TriggerPolicy(on_improvement=True, monitor="loss", mode=mode)
    state = TriggerState()
    best: float | None = None
    for step, metrics in enumerate(reports, start=1):
        value = metrics.get("loss")
        new_best = (
            value is not None
            and not math.isnan(value)
            and (best is None or (value < best if mode == "min" else value > best))
        )
        if new_best:
            best = value
        state.observe(metrics, policy.monitor, policy.mode)
        reason = fire(policy, state, step, **metrics)
        assert (reason is not None) == new_best
        if reason is not None:
            state.record_save(step=step, epoch=0, now=float(step), duration=0.1)
    assert state.best == best


@settings(max_examples=100, deadline=None)
@given(st.floats(0.001, 600), st.floats(10, 1e6), st.floats(0, 1e5))
def test_auto_fires_exactly_when_the_young_daly_interval_has_passed(cost, mtbf, elapsed):
    policy = TriggerPolicy(auto_mtbf_seconds=mtbf)
    state = TriggerState()
    state.record_save(step=1, epoch=0, now=1000.0, duration=cost)
    fired = fire(policy, state, 2, now=1000.0 + elapsed) is not None
    assert fired == (1000.0 + elapsed - 1000.0 >= young_daly_interval(cost, mtbf))
