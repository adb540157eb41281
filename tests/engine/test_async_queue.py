"""A background writer that queues small saves (the Lightning plugin's): order, memory, failures.

Saves queued behind the one in flight must commit in submission order (two saves to one target
end with the later one), each from its own staged copy (the state may change right after the call),
and a failure in the background must still surface exactly once.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import ckptvault as cv
from ckptvault import api
from ckptvault.engine import background
from ckptvault.engine.background import BackgroundWriter
from ckptvault.engine.staging import StagingBuffer


class _Gate:
    """Holds the writer's thread inside a job until released, so saves pile up behind it."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def job(self) -> None:
        self.entered.set()
        assert self.release.wait(30)


def _request(path: Path) -> background.SaveRequest:
    return api.save_request(path, overwrite=True)


def test_small_saves_queue_in_order_from_their_own_copies(ckpt_dir: Path) -> None:
    writer = BackgroundWriter(queue_bytes=1 << 20, max_in_flight=4)
    staging = StagingBuffer()
    gate = _Gate()
    writer.submit("gate", gate.job)
    assert gate.entered.wait(30)
    weight = torch.zeros(8)
    first = writer.submit_save(_request(ckpt_dir / "last"), {"w": weight}, staging)
    weight.fill_(1.0)  # training goes on: the queued save keeps what it was given
    second = writer.submit_save(_request(ckpt_dir / "last"), {"w": weight.clone()}, staging)
    other = writer.submit_save(_request(ckpt_dir / "topk"), {"w": weight}, staging)
    weight.fill_(2.0)
    assert not first.done() and not second.done()  # nothing waited for the gate
    assert staging.capacity == 0  # queued saves never touch the reused buffer
    gate.release.set()
    writer.wait_idle()
    assert first.wait().path.endswith("last") and second.done() and other.done()
    assert torch.equal(cv.load(ckpt_dir / "last")["w"], torch.ones(8))  # the later save won
    assert torch.equal(cv.load(ckpt_dir / "topk")["w"], torch.ones(8))
    writer.shutdown()


def test_the_queue_is_bounded_and_large_states_wait(ckpt_dir: Path) -> None:
    writer = BackgroundWriter(queue_bytes=64, max_in_flight=2)
    staging = StagingBuffer()
    gate = _Gate()
    writer.submit("gate", gate.job)
    assert gate.entered.wait(30)
    small = writer.submit_save(_request(ckpt_dir / "small"), {"w": torch.zeros(4)}, staging)
    assert not small.done()
    threading.Timer(0.5, gate.release.set).start()
    big = writer.submit_save(_request(ckpt_dir / "big"), {"w": torch.zeros(64)}, staging)
    assert small.done()  # the big one (over queue_bytes, and the queue full) waited for idle
    assert staging.capacity >= 256  # and was staged in the reused buffer
    big.wait()
    assert cv.verify(ckpt_dir / "big").ok and cv.verify(ckpt_dir / "small").ok
    writer.shutdown()


def test_a_failure_behind_the_queue_is_raised_once_by_a_later_call(
    ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = BackgroundWriter(queue_bytes=1 << 20, max_in_flight=4)
    staging = StagingBuffer()
    real = background.commit_plan

    def flaky(storage: object, target: str, *args: object, **kwargs: object) -> object:
        if target.endswith("bad"):
            raise cv.StorageError(5, "Input/output error (injected)")
        return real(storage, target, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(background, "commit_plan", flaky)
    gate = _Gate()
    writer.submit("gate", gate.job)
    assert gate.entered.wait(30)
    bad = writer.submit_save(_request(ckpt_dir / "bad"), {"w": torch.zeros(2)}, staging)
    good = writer.submit_save(_request(ckpt_dir / "good"), {"w": torch.ones(2)}, staging)
    gate.release.set()
    good.wait()  # the queue goes on after a failure: later saves are independent
    with pytest.raises(cv.StorageError, match="injected"):
        writer.submit_save(_request(ckpt_dir / "next"), {"w": torch.ones(2)}, staging)
    assert bad.exception() is not None
    writer.wait_idle()  # seen once: not raised again
    assert not (ckpt_dir / "bad").exists() and not (ckpt_dir / "next").exists()
    assert cv.verify(ckpt_dir / "good").ok
    writer.shutdown()


def test_max_in_flight_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        BackgroundWriter(max_in_flight=0)


def test_wait_idle_raises_only_once_every_queued_job_is_done() -> None:
    """A failure must not return control while later jobs still run behind the caller (they could
    delete or write what the caller then inspects)."""
    writer = BackgroundWriter(max_in_flight=4)
    first, gate = _Gate(), _Gate()

    def fail() -> None:
        raise cv.StorageError(5, "Input/output error (injected)")

    writer.submit("first", first.job)  # holds the worker, so the failure is queued, not finished
    writer.submit("fail", fail)
    later = writer.submit("later", gate.job)
    first.release.set()
    threading.Timer(0.3, gate.release.set).start()
    with pytest.raises(cv.StorageError, match="injected"):
        writer.wait_idle()
    assert later.done()
    writer.shutdown()
