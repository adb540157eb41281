"""A distributed save into a bucket (moto on loopback) loaded at other world sizes; the writer
pickled; ``dcp.async_save`` through a ckptvault ``StorageWriter`` with the thread and the process
executor."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from tests.distributed import rank_fns

import ckptvault as cv
import ckptvault.distributed as cvd
from ckptvault.testing.ranks import run_ranks
from ckptvault.testing.s3server import MotoServer

pytestmark = pytest.mark.distributed


def test_save_at_two_ranks_to_s3_load_at_one_and_three(
    moto_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = moto_server.env()
    url = f"s3://{s3_bucket}/prefix/ck"
    run_ranks(rank_fns.s3_job, 2, url, "save", 8, env=env, timeout=120)
    outcomes = run_ranks(rank_fns.s3_job, 3, url, "load", 8, env=env, timeout=120)
    assert [o.value for o in outcomes] == [len(rank_fns.LAYOUTS)] * 3
    for name, value in env.items():  # world 1: this process, no process group
        monkeypatch.setenv(name, value)
    state = rank_fns.layout_state(None, 8, blank=True)
    cvd.load(state, url)
    assert rank_fns.check_layout(state, 8, "world 1") == len(rank_fns.LAYOUTS)
    assert cv.verify(url).ok
    whole = cv.load(url)["tensors"]
    assert all(torch.equal(whole[k], v) for k, v in rank_fns.whole_tensors(8).items())


def test_a_writer_pickles_without_its_transaction(tmp_path: Path) -> None:
    writer = cvd.StorageWriter(tmp_path / "ck", metadata={"run": "x"}, overwrite=True, piece_bytes=8192)
    copy = pickle.loads(pickle.dumps(writer))
    assert (copy.path, copy.metadata, copy.overwrite, copy.piece_bytes) == (
        str(tmp_path / "ck"),
        {"run": "x"},
        True,
        8192,
    )
    assert copy._txn is None and copy.committed is None


def test_async_save_thread_and_process_executors(tmp_path: Path) -> None:
    outcomes = run_ranks(rank_fns.async_saves, 2, str(tmp_path), timeout=150)
    for outcome in outcomes:
        assert outcome.value["thread"].get("ok") == len(rank_fns.LAYOUTS), outcome.value["thread"]
    whole = cv.load(tmp_path / "thread")["tensors"]
    assert all(torch.equal(whole[k], v) for k, v in rank_fns.whole_tensors(5).items())
    process = outcomes[0].value["process"]
    if "daemonic processes are not allowed to have children" in process.get("error", ""):
        # run_ranks starts its ranks as daemon processes, and DCP's process executor starts a
        # child of the rank: the harness, not ckptvault or gloo, stops it here.
        pytest.xfail(f"process executor untestable under run_ranks (daemon ranks): {process['error']}")
    assert process.get("ok") == len(rank_fns.LAYOUTS), process
