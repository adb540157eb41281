"""Acceptance: SIGKILL at random moments of repeated saves never leaves a broken or visible half
checkpoint, never harms earlier checkpoints, and the next save sweeps every staging leftover."""

import importlib.util
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ckptvault

HERE = Path(__file__).resolve().parent
ZYGOTE = HERE / "_kill_zygote.py"
STAGING_MARK = ".ckptvault-tmp."
KILLS = 60
SEED = 20240611

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def _zygote_module():
    spec = importlib.util.spec_from_file_location("_ckptvault_kill_zygote", ZYGOTE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same(a, b, where="state"):
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: tensor values differ"
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def check_intact(path, expected):
    report = ckptvault.verify(path)
    assert report.ok, f"{path}: {report.problems}"
    assert_same(ckptvault.load(path), expected)


class Zygote:
    def __init__(self, run, scratch, log):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, str(ZYGOTE), str(run), str(scratch)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=scratch.parent,
        )
        words = self.expect("ready")
        self.save_seconds = float(words[1])

    def expect(self, word):
        line = self.proc.stdout.readline()
        if not line.startswith(word):
            self.proc.kill()
            self.log.flush()
            raise AssertionError(f"helper said {line!r}, stderr: {Path(self.log.name).read_text()[-3000:]}")
        return line.split()

    def send(self, text):
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def scan(run):
    """(visible checkpoint dirs, hidden staging names); asserts nothing else is in the run dir."""
    visible, staging = set(), set()
    for name in os.listdir(run):
        path = run / name
        if name.startswith("."):
            assert STAGING_MARK in name, f"unexpected hidden entry {name}"
            staging.add(name)
            continue
        assert path.is_dir(), f"visible non-directory {name}"
        assert (path / "manifest.json").is_file(), f"visible directory without a manifest: {name}"
        visible.add(str(path))
    listed = set(ckptvault.list_checkpoints(run))
    assert listed == visible, (listed ^ visible, "list_checkpoints disagrees with the directory")
    return visible, staging


@pytest.mark.timeout(150)
def test_sigkill_during_saves(tmp_path):
    zygote_mod = _zygote_module()
    worker_state = zygote_mod.make_state(1234)
    earlier_state = zygote_mod.make_state(99)
    run = tmp_path / "run"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    earlier = run / "step_00000000"
    ckptvault.save(earlier, earlier_state, metadata={"step": 0, "note": "before the kills"})
    check_intact(earlier, earlier_state)

    rng = random.Random(SEED)
    seen = {str(earlier)}
    kills_with_leftovers = 0
    with (tmp_path / "helper.log").open("w+") as log:
        zygote = Zygote(run, scratch, log)
        try:
            window = 2 * zygote.save_seconds
            assert zygote.save_seconds < 1.0, f"one save takes {zygote.save_seconds:.3f} s; state too big"
            for k in range(KILLS):
                zygote.send(f"go {(k + 1) * 1000}")
                pid = int(zygote.expect("pid")[1])
                time.sleep(rng.uniform(0, window))
                os.kill(pid, signal.SIGKILL)
                status = int(zygote.expect("dead")[1])
                assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
                    f"child ended with status {status} before the kill: {Path(log.name).read_text()[-3000:]}"
                )

                visible, staging = scan(run)
                kills_with_leftovers += bool(staging)
                assert seen <= visible, f"kill {k}: committed checkpoints vanished: {seen - visible}"
                for path in sorted(visible - seen):
                    check_intact(path, worker_state)
                seen |= visible
                check_intact(earlier, earlier_state)
        finally:
            zygote.close()

    # Every committed checkpoint is still intact at the end, not just when it first appeared.
    visible, staging = scan(run)
    assert visible == seen
    for path in sorted(visible):
        check_intact(path, earlier_state if path == str(earlier) else worker_state)
    print(
        f"kills={KILLS} save={zygote.save_seconds:.3f}s committed={len(visible) - 1} "
        f"kills_with_leftovers={kills_with_leftovers}"
    )
    assert len(visible) > 1, "no child save ever committed: the kill window is too short to test anything"
    assert kills_with_leftovers > 0, "no kill ever landed inside a save: the test exercised nothing"

    # The next save in this directory succeeds and sweeps every dead writer's staging directory.
    final = run / "step_99999999"
    ckptvault.save(final, earlier_state)
    check_intact(final, earlier_state)
    leftovers = [n for n in os.listdir(run) if STAGING_MARK in n]
    assert leftovers == [], f"staging leftovers survived the next save: {leftovers}"
    assert not any(n.startswith(".") for n in os.listdir(run))
