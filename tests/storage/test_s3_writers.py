"""Many writers on one object-store run: leases and compare-and-swap hold on a real S3 server.

Every writer here has its own :class:`S3Storage` (its own connection pool and caches), as separate
processes would; they meet only in the bucket.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

import ckptvault as cv
from ckptvault.engine.verify import verify_checkpoint
from ckptvault.errors import CheckpointExistsError, ConcurrentWriteError, DocumentConflictError
from ckptvault.testing.s3server import MotoServer

from .conftest import FakeClock, s3_storage

WRITERS = 4


def run_all(target: object, count: int) -> None:
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            target(i)  # type: ignore[operator]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_compare_and_swap_loses_no_update_across_hundreds_of_commits(
    moto_server: MotoServer, s3_bucket: str
) -> None:
    key = f"s3://{s3_bucket}/run/index.json"
    per_writer = 60
    s3_storage(moto_server, s3_bucket).put(key, b'{"n": 0, "by": []}', if_absent=True)
    conflicts = [0] * WRITERS

    def writer(i: int) -> None:
        storage = s3_storage(moto_server, s3_bucket)
        done = 0
        while done < per_writer:
            doc = storage.get(key, max_bytes=1 << 20)
            assert doc is not None
            value = json.loads(doc.data)
            value["n"] += 1
            value["by"].append(i)
            try:
                storage.put(key, json.dumps(value).encode(), if_version=doc.version)
                done += 1
            except DocumentConflictError:
                conflicts[i] += 1

    run_all(writer, WRITERS)
    final = json.loads(s3_storage(moto_server, s3_bucket).get(key, max_bytes=1 << 20).data)  # type: ignore[union-attr]
    assert final["n"] == WRITERS * per_writer  # 240 commits, none lost
    assert sorted(final["by"].count(i) for i in range(WRITERS)) == [per_writer] * WRITERS
    assert sum(conflicts) > 0  # they did race


def test_event_log_appends_from_many_writers_all_land(moto_server: MotoServer, s3_bucket: str) -> None:
    key = f"s3://{s3_bucket}/run/events.jsonl"
    per_writer = 40

    def writer(i: int) -> None:
        storage = s3_storage(moto_server, s3_bucket)
        for n in range(per_writer):
            storage.append(key, json.dumps({"writer": i, "n": n}).encode() + b"\n")

    run_all(writer, WRITERS)
    lines = list(s3_storage(moto_server, s3_bucket).read_lines(key, max_line=1024))
    events = [json.loads(line) for line in lines]
    assert len(events) == WRITERS * per_writer
    for i in range(WRITERS):  # each writer's own lines in its order
        assert [e["n"] for e in events if e["writer"] == i] == list(range(per_writer))


def test_two_writers_never_both_commit_one_checkpoint(moto_server: MotoServer, s3_bucket: str) -> None:
    target = f"s3://{s3_bucket}/run/step-1"
    barrier = threading.Barrier(WRITERS)
    won: list[int] = []
    lost: list[int] = []

    def writer(i: int) -> None:
        storage = s3_storage(moto_server, s3_bucket)
        txn = storage.begin(target, overwrite=False)
        out = txn.create("data.bin")
        out.write(bytes([i]) * 100_000)
        out.close()
        barrier.wait()
        try:
            txn.commit(json.dumps({"writer": i}).encode())
            won.append(i)
        except CheckpointExistsError:
            lost.append(i)

    run_all(writer, WRITERS)
    assert len(won) == 1 and len(lost) == WRITERS - 1
    handle = s3_storage(moto_server, s3_bucket).open(target)
    assert json.loads(handle.read_manifest()) == {"writer": won[0]}
    assert handle.read("data.bin", 0, 100_000) == bytes([won[0]]) * 100_000  # the winner's own data
    # The losers took their data with them: only the winner's save area is left.
    saves = {m.path.split("/")[3] for m in handle.client.list_all("run/.ckptvault-saves/step-1/")}
    assert len(saves) == 1


def _train(manager: cv.CheckpointManager, state: cv.TrainState, model: torch.nn.Module, steps: int) -> None:
    for _ in range(steps):
        with torch.no_grad():
            model.weight += 1.0
        manager.step(state, metrics={"loss": float(state.step)})


def _state() -> tuple[cv.TrainState, torch.nn.Linear]:
    model = torch.nn.Linear(3, 2)
    return cv.TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)), model


def test_a_second_manager_is_refused_until_the_lease_expires_then_the_first_stops(
    moto_server: MotoServer, s3_bucket: str
) -> None:
    run = f"s3://{s3_bucket}/runs/r"
    clock = FakeClock()
    first = cv.CheckpointManager(
        run, storage=s3_storage(moto_server, s3_bucket, clock=clock), every_n_steps=1, validate="checksum"
    )
    state, model = _state()
    _train(first, state, model, 2)
    with pytest.raises(ConcurrentWriteError, match="already has a writer"):
        cv.CheckpointManager(
            run, storage=s3_storage(moto_server, s3_bucket, clock=clock), validate="checksum"
        )
    clock.advance(10_000)  # the first writer stopped renewing (a hung or dead machine)
    second = cv.CheckpointManager(
        run, storage=s3_storage(moto_server, s3_bucket, clock=clock), every_n_steps=1, validate="checksum"
    )
    resumed, model2 = _state()
    info = second.restore(resumed)
    assert info is not None and info.step == 2
    assert torch.equal(model2.weight, model.weight)
    with pytest.raises(ConcurrentWriteError):
        _train(first, state, model, 1)  # the old writer learns it lost the run before writing anything
    _train(second, resumed, model2, 3)
    second.close()
    steps = sorted(e.name for e in s3_storage(moto_server, s3_bucket).list(run) if e.kind == "checkpoint")
    assert steps[-1] == "step_00000005"
    assert verify_checkpoint(s3_storage(moto_server, s3_bucket), f"{run}/step_00000005").ok
    assert torch.equal(model2.weight, model.weight + 2)  # +2 before the switch, +1 by the loser, +3 after


def test_the_lease_is_kept_alive_between_saves_hours_apart(
    moto_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = f"s3://{s3_bucket}/runs/long"
    clock = FakeClock()
    monotonic = [1000.0]
    monkeypatch.setattr("ckptvault.manager.lease.time.monotonic", lambda: monotonic[0])
    storage = s3_storage(moto_server, s3_bucket, clock=clock)
    manager = cv.CheckpointManager(run, storage=storage, every_n_steps=10_000, validate="checksum")
    state, model = _state()
    for _ in range(6):  # half an hour of steps and no save: the 300 s lease would have lapsed
        clock.advance(250)
        monotonic[0] += 250
        _train(manager, state, model, 1)
    with pytest.raises(ConcurrentWriteError, match="already has a writer"):
        cv.CheckpointManager(
            run, storage=s3_storage(moto_server, s3_bucket, clock=clock), validate="checksum"
        )
    manager.save(state)  # and the owner still writes
    manager.close()
