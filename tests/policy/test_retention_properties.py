"""The retention invariants, as properties over random streams and as a stateful model of a run.

Invariants (numbered as in the brief the policy was written to):
1. the newest valid record is kept ("latest");
2. with a monitor set, the best valid record by it is kept;
3. pinned records are kept;
4. invalid records are never latest/best nor kept by a ``keep_*`` rule: deleted unless pinned
   (with no retention configured nothing at all is deleted);
5. exactly one entry per input record;
6. deleting what was not kept and deciding again deletes nothing more (and changes no reason);
7. every reason is justified by the rule it names; nothing else is kept.

The oracle is independent of the code under test: ``expected_reasons`` re-derives every record's
reasons by brute force (pairwise counting, no sorting) straight from the documented rules, with its
own metric reading (``number``) and duration text (``duration_text``); every property compares the
policy's answer with it exactly, reasons and their order included.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ckptvault.policy import (
    KEEP_ALL,
    KEEP_BEST,
    KEEP_BEST_RANKED,
    KEEP_EVERY_N_EPOCHS,
    KEEP_EVERY_N_STEPS,
    KEEP_LAST,
    KEEP_LATEST,
    KEEP_NEWER_THAN,
    KEEP_PINNED,
    CheckpointRecord,
    RetentionPolicy,
    retention_reasons,
)

MONITORS = ("loss", "acc")
# few distinct values, so ties, NaN, infinities and non-numbers all turn up often
metric_values = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, math.nan, math.inf, -math.inf]),
    st.floats(-10, 10, allow_nan=False),
    st.integers(-3, 3),
    st.just("n/a"),
    st.booleans(),  # not a number here, though bool is an int subclass
)
metric_dicts = st.dictionaries(st.sampled_from(MONITORS), metric_values, max_size=2)


@st.composite
def retention_policies(draw: st.DrawFn) -> RetentionPolicy:
    keep_best = draw(st.none() | st.integers(1, 4))
    monitor = draw(
        st.sampled_from(MONITORS) if keep_best is not None else st.none() | st.sampled_from(MONITORS)
    )
    return RetentionPolicy(
        keep_last=draw(st.none() | st.integers(1, 4)),
        keep_best=keep_best,
        monitor=monitor,
        mode=draw(st.sampled_from(["min", "max"])),
        keep_every_n_steps=draw(st.none() | st.integers(1, 8)),
        keep_every_n_epochs=draw(st.none() | st.integers(1, 3)),
        keep_newer_than=draw(st.none() | st.floats(1, 60)),
    )


@st.composite
def record_lists(draw: st.DrawFn) -> list[CheckpointRecord]:
    count = draw(st.integers(0, 14))
    names = draw(
        st.lists(st.text("abcdef", min_size=1, max_size=3), min_size=count, max_size=count, unique=True)
    )
    return [
        CheckpointRecord(
            name=name,
            step=draw(st.integers(0, 30)),
            epoch=draw(st.integers(0, 6)),
            created=float(draw(st.integers(0, 100))),
            scope="full",
            metrics=draw(metric_dicts),
            pinned=draw(st.booleans()),
            valid=draw(st.sampled_from([True, True, True, False])),
        )
        for name in names
    ]


nows = st.floats(0, 160)


# -- the oracle: the documented rules, re-derived by brute force ----------------------------------------
def number(metrics: object, name: str) -> float | None:
    """The documented metric rule: an int or float (never a bool), NaN counting as absent."""
    value = metrics.get(name) if isinstance(metrics, dict) else None
    if type(value) not in (int, float):
        return None
    as_float = float(value)  # type: ignore[arg-type]
    return None if as_float != as_float else as_float


def duration_text(seconds: float) -> str:
    """The documented age text: whole days/hours/minutes in that unit, else seconds (whole from 10 s)."""
    value = float(round(seconds)) if seconds >= 10 else float(seconds)
    if value > 0 and value == int(value):
        whole = int(value)
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
            if whole % size == 0:
                return f"{whole // size}{unit}"
    return f"{value:g}s"


def newer(a: CheckpointRecord, b: CheckpointRecord) -> bool:
    """``a`` is newer than ``b``: step first, then commit time, then name."""
    return (a.step, a.created, a.name) > (b.step, b.created, b.name)


def expected_reasons(
    records: Sequence[CheckpointRecord], policy: RetentionPolicy, now: float
) -> dict[str, tuple[str, ...]]:
    """Each record's reasons, rule by rule, in the documented order (pinned, latest, best, last,
    every n steps, every n epochs, newer than; or "all kept" when no keep_* rule is set)."""
    valid = [r for r in records if r.valid]
    configured = any(
        value is not None
        for value in (
            policy.keep_last,
            policy.keep_best,
            policy.keep_every_n_steps,
            policy.keep_every_n_epochs,
            policy.keep_newer_than,
        )
    )
    out: dict[str, tuple[str, ...]] = {}
    for r in records:
        why: list[str] = []
        if r.pinned:
            why.append("pinned")
        if r.valid and not any(newer(o, r) for o in valid):
            why.append("latest")
        value = number(r.metrics, policy.monitor) if policy.monitor is not None else None
        if r.valid and value is not None:
            count = policy.keep_best or 1
            ahead = 0
            for o in valid:
                other = number(o.metrics, policy.monitor)  # type: ignore[arg-type]
                if o is r or other is None:
                    continue
                better = other < value if policy.mode == "min" else other > value
                if better or (other == value and newer(o, r)):
                    ahead += 1
            if ahead < count:
                why.append(
                    f"best {policy.monitor}"
                    if count == 1
                    else f"best {policy.monitor} ({ahead + 1} of {count})"
                )
        if not configured:
            why.append("all kept (no retention policy)")
        elif r.valid:
            n = policy.keep_last
            if n is not None and sum(newer(o, r) for o in valid) < n:
                why.append(f"last {n}")
            n = policy.keep_every_n_steps
            if n is not None and r.step % n == 0:
                why.append(f"every {n} steps")
            n = policy.keep_every_n_epochs
            if (
                n is not None
                and r.epoch > 0
                and r.epoch % n == 0
                and not any(o.epoch == r.epoch and newer(r, o) for o in valid)
            ):
                why.append(f"every {n} epochs")
            age = policy.keep_newer_than
            if age is not None and r.created >= now - age:
                why.append(f"newer than {duration_text(age)}")
        out[r.name] = tuple(why)
    return out


def check_against_oracle(
    records: Sequence[CheckpointRecord],
    policy: RetentionPolicy,
    now: float,
    reasons: dict[str, tuple[str, ...]],
) -> None:
    expected = expected_reasons(records, policy, now)
    assert list(reasons) == list(expected)
    for name, why in expected.items():
        assert reasons[name] == why, (name, reasons[name], why, policy)


# -- the invariants, each written out directly ---------------------------------------------------------
def newest_valid(records: Sequence[CheckpointRecord]) -> CheckpointRecord | None:
    valid = [r for r in records if r.valid]
    return max(valid, key=lambda r: (r.step, r.created, r.name)) if valid else None


def best_candidates(records: Sequence[CheckpointRecord], policy: RetentionPolicy) -> list[tuple[float, str]]:
    assert policy.monitor is not None
    out = []
    for r in records:
        value = number(r.metrics, policy.monitor)
        if r.valid and value is not None:
            out.append((value, r.name))
    return out


def strictly_better(a: float, b: float, policy: RetentionPolicy) -> bool:
    return a < b if policy.mode == "min" else a > b


def best_texts(policy: RetentionPolicy) -> set[str]:
    count = policy.keep_best or 1
    if count == 1:
        return {KEEP_BEST.format(monitor=policy.monitor)}
    return {KEEP_BEST_RANKED.format(monitor=policy.monitor, rank=i, count=count) for i in range(1, count + 1)}


def check_invariants(
    records: Sequence[CheckpointRecord],
    policy: RetentionPolicy,
    now: float,
    reasons: dict[str, tuple[str, ...]],
) -> None:
    by_name = {r.name: r for r in records}
    # (5) one entry per record, in input order
    assert list(reasons) == [r.name for r in records]
    # (1) latest
    latest = newest_valid(records)
    assert [n for n, why in reasons.items() if KEEP_LATEST in why] == ([latest.name] if latest else [])
    # (3) pinned, and only pinned, says "pinned"
    assert {n for n, why in reasons.items() if KEEP_PINNED in why} == {r.name for r in records if r.pinned}
    # (2) best
    check_best(records, policy, reasons)
    # (4) invalid: only pinned or "all kept"
    for r in records:
        if not r.valid:
            allowed = {KEEP_PINNED} if r.pinned else set()
            if not policy.configured:
                allowed.add(KEEP_ALL)
            assert set(reasons[r.name]) == allowed, (r, reasons[r.name])
    # (7) each reason is justified, and the deterministic rules are complete
    for name, why in reasons.items():
        for reason in why:
            assert justified(by_name[name], reason, records, policy, now), (name, reason)
    check_complete(records, policy, now, reasons)


def check_best(
    records: Sequence[CheckpointRecord], policy: RetentionPolicy, reasons: dict[str, tuple[str, ...]]
) -> None:
    if policy.monitor is None:
        assert not any(reason.startswith("best ") for why in reasons.values() for reason in why)
        return
    candidates = best_candidates(records, policy)
    texts = best_texts(policy)
    holders = [n for n, why in reasons.items() if texts & set(why)]
    assert len(holders) == min(policy.keep_best or 1, len(candidates))
    if candidates:
        top = min(v for v, _ in candidates) if policy.mode == "min" else max(v for v, _ in candidates)
        assert any(
            number(next(r for r in records if r.name == n).metrics, policy.monitor) == top for n in holders
        )


def justified(
    record: CheckpointRecord,
    reason: str,
    records: Sequence[CheckpointRecord],
    policy: RetentionPolicy,
    now: float,
) -> bool:
    valid = [r for r in records if r.valid]
    if reason == KEEP_PINNED:
        return record.pinned
    if reason == KEEP_ALL:
        return not policy.configured
    if not record.valid:
        return False
    if reason == KEEP_LATEST:
        return record is newest_valid(records)
    if policy.monitor is not None and reason in best_texts(policy):
        value = number(record.metrics, policy.monitor)
        if value is None:
            return False
        better = [v for v, _ in best_candidates(records, policy) if strictly_better(v, value, policy)]
        return len(better) < (policy.keep_best or 1)
    if reason == _rule_text(KEEP_LAST, policy):
        newer = [r for r in valid if r.newness() > record.newness()]
        return len(newer) < (policy.keep_last or 0)
    if reason == _rule_text(KEEP_EVERY_N_STEPS, policy):
        return record.step % (policy.keep_every_n_steps or 0) == 0
    if reason == _rule_text(KEEP_EVERY_N_EPOCHS, policy):
        n = policy.keep_every_n_epochs or 0
        older_same_epoch = [r for r in valid if r.epoch == record.epoch and r.newness() < record.newness()]
        return record.epoch > 0 and record.epoch % n == 0 and not older_same_epoch
    if reason == _rule_text(KEEP_NEWER_THAN, policy):
        return record.created >= now - (policy.keep_newer_than or 0)
    return False


def check_complete(
    records: Sequence[CheckpointRecord],
    policy: RetentionPolicy,
    now: float,
    reasons: dict[str, tuple[str, ...]],
) -> None:
    """Every record a deterministic rule applies to carries that rule's reason."""
    if not policy.configured:
        assert all(KEEP_ALL in why for why in reasons.values())
        return
    for r in records:
        if not r.valid:
            continue
        for reason in (KEEP_LAST, KEEP_EVERY_N_STEPS, KEEP_EVERY_N_EPOCHS, KEEP_NEWER_THAN):
            text = _rule_text(reason, policy)
            if text is not None and justified(r, text, records, policy, now):
                assert text in reasons[r.name], (r, text)


def _rule_text(template: str, policy: RetentionPolicy) -> str | None:
    if template == KEEP_LAST and policy.keep_last is not None:
        return KEEP_LAST.format(n=policy.keep_last)
    if template == KEEP_EVERY_N_STEPS and policy.keep_every_n_steps is not None:
        return KEEP_EVERY_N_STEPS.format(n=policy.keep_every_n_steps)
    if template == KEEP_EVERY_N_EPOCHS and policy.keep_every_n_epochs is not None:
        return KEEP_EVERY_N_EPOCHS.format(n=policy.keep_every_n_epochs)
    if template == KEEP_NEWER_THAN and policy.keep_newer_than is not None:
        return KEEP_NEWER_THAN.format(age=duration_text(policy.keep_newer_than))
    return None


def survivors(
    records: Sequence[CheckpointRecord], reasons: dict[str, tuple[str, ...]]
) -> list[CheckpointRecord]:
    return [r for r in records if reasons[r.name]]


# -- properties -----------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(record_lists(), retention_policies(), nows)
def test_invariants_hold(records, policy, now):
    check_invariants(records, policy, now, retention_reasons(records, policy, now=now))


@settings(max_examples=400, deadline=None)
@given(record_lists(), retention_policies(), nows)
def test_reasons_equal_the_brute_force_oracle(records, policy, now):
    check_against_oracle(records, policy, now, retention_reasons(records, policy, now=now))


@settings(max_examples=200, deadline=None)
@given(record_lists(), retention_policies(), nows)
def test_second_pass_deletes_nothing_and_changes_no_reason(records, policy, now):
    reasons = retention_reasons(records, policy, now=now)
    kept = survivors(records, reasons)
    again = retention_reasons(kept, policy, now=now)
    assert again == {r.name: reasons[r.name] for r in kept}


@settings(max_examples=100, deadline=None)
@given(record_lists(), retention_policies(), nows, st.randoms(use_true_random=False))
def test_decision_does_not_depend_on_input_order(records, policy, now, rng):
    shuffled = list(records)
    rng.shuffle(shuffled)
    assert retention_reasons(shuffled, policy, now=now) == retention_reasons(records, policy, now=now)


@settings(max_examples=100, deadline=None)
@given(record_lists(), retention_policies(), nows)
def test_pinning_only_adds_reasons(records, policy, now):
    before = retention_reasons(records, policy, now=now)
    pinned = [
        CheckpointRecord(r.name, r.step, r.epoch, r.created, r.scope, r.metrics, True, r.valid)
        for r in records
    ]
    after = retention_reasons(pinned, policy, now=now)
    for name, why in before.items():
        assert set(why) | {KEEP_PINNED} == set(after[name])


# -- a stateful model of a run: saves, crashes, pins, corruption, retention passes -----------------------
class RetentionRun(RuleBasedStateMachine):
    """One stream of a run as the manager drives it; the invariants are checked after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, CheckpointRecord] = {}
        self.policy = RetentionPolicy()
        self.step = 0
        self.epoch = 0
        self.now = 0.0
        self.settled = True  # True right after a retention pass, until something changes

    @initialize(policy=retention_policies())
    def configure(self, policy: RetentionPolicy) -> None:
        self.policy = policy

    def _append(self, steps: int, epochs: int, seconds: float, metrics: dict[str, object]) -> None:
        self.step += steps
        self.epoch += epochs
        self.now += seconds
        name = f"step_{self.step:08d}"
        self.records[name] = CheckpointRecord(name, self.step, self.epoch, self.now, "full", metrics)  # type: ignore[arg-type]
        self.settled = False

    @rule(steps=st.integers(1, 6), epochs=st.integers(0, 1), seconds=st.floats(0, 20), metrics=metric_dicts)
    def save(self, steps: int, epochs: int, seconds: float, metrics: dict[str, object]) -> None:
        """A committed save followed by its retention pass (the manager's normal path)."""
        self._append(steps, epochs, seconds, metrics)
        self.prune()

    @rule(steps=st.integers(1, 6), epochs=st.integers(0, 1), seconds=st.floats(0, 20), metrics=metric_dicts)
    def crash_after_commit(self, steps: int, epochs: int, seconds: float, metrics: dict[str, object]) -> None:
        """Committed, then the process died before retention ran."""
        self._append(steps, epochs, seconds, metrics)

    @precondition(lambda self: bool(self.records))
    @rule(data=st.data(), pinned=st.booleans(), prune=st.booleans())
    def set_pin(self, data: st.DataObject, pinned: bool, prune: bool) -> None:
        name = data.draw(st.sampled_from(sorted(self.records)))
        self.records[name] = _replace(self.records[name], pinned=pinned)
        self.settled = False
        if prune:  # unpin runs retention in the manager
            self.prune()

    @precondition(lambda self: bool(self.records))
    @rule(data=st.data())
    def fail_verification(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.records)))
        self.records[name] = _replace(self.records[name], valid=False)
        self.settled = False

    @rule(seconds=st.floats(0, 100))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.settled = self.settled and self.policy.keep_newer_than is None

    @rule()
    def prune(self) -> None:
        records = list(self.records.values())
        reasons = retention_reasons(records, self.policy, now=self.now)
        protected = {r.name for r in records if r.pinned}
        latest = newest_valid(records)
        if latest is not None:
            protected.add(latest.name)
        if self.policy.monitor is not None and (candidates := best_candidates(records, self.policy)):
            top = min(candidates)[0] if self.policy.mode == "min" else max(candidates)[0]
            best_names = {n for v, n in candidates if v == top}
            assert best_names & {n for n, why in reasons.items() if why}, "every best candidate was deleted"
        for name, why in reasons.items():
            if not why:
                assert name not in protected, name
                del self.records[name]
        self.settled = True

    @invariant()
    def invariants_hold(self) -> None:
        records = list(self.records.values())
        reasons = retention_reasons(records, self.policy, now=self.now)
        check_invariants(records, self.policy, self.now, reasons)
        check_against_oracle(records, self.policy, self.now, reasons)
        kept = survivors(records, reasons)
        assert retention_reasons(kept, self.policy, now=self.now) == {r.name: reasons[r.name] for r in kept}
        if self.settled:  # right after a pass nothing is left that no rule keeps
            assert len(kept) == len(records)


def _replace(
    record: CheckpointRecord, *, pinned: bool | None = None, valid: bool | None = None
) -> CheckpointRecord:
    return CheckpointRecord(
        record.name,
        record.step,
        record.epoch,
        record.created,
        record.scope,
        record.metrics,
        record.pinned if pinned is None else pinned,
        record.valid if valid is None else valid,
    )


RetentionRun.TestCase.settings = settings(max_examples=120, stateful_step_count=30, deadline=None)
TestRetentionRun = RetentionRun.TestCase


def test_model_replays_a_long_random_run():
    """A deterministic long run (hundreds of saves) through the same checks, beyond hypothesis' step cap."""
    rng = random.Random(20240601)
    policy = RetentionPolicy(
        keep_last=3, keep_best=2, monitor="loss", keep_every_n_steps=50, keep_newer_than=30
    )
    run = RetentionRun()
    run.configure(policy)
    for _ in range(400):
        metrics: dict[str, object] = (
            {"loss": rng.choice([rng.random(), math.nan])} if rng.random() < 0.7 else {}
        )
        if rng.random() < 0.1:
            run.crash_after_commit(rng.randint(1, 5), rng.randint(0, 1), rng.random() * 5, metrics)
        else:
            run.save(rng.randint(1, 5), rng.randint(0, 1), rng.random() * 5, metrics)
        run.invariants_hold()
    assert 3 <= len(run.records) < 60
