"""Acceptance: a run killed with SIGKILL at random points and resumed each time ends bit-identical
to an uninterrupted run — weights, optimizer, scheduler, scaler, every RNG and the metrics history."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.helpers import assert_exact

import ckptvault as cv

SCRIPT = Path(__file__).with_name("_train_script.py")
REPO = Path(__file__).resolve().parents[2]


def _start(run_dir: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CKPTVAULT_RUN_DIR": str(run_dir), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(SCRIPT)], env=env, stderr=subprocess.PIPE)


def _run_to_end(run_dir: Path) -> None:
    child = _start(run_dir)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 0, err.decode()[-3000:]


@pytest.mark.slow
def test_killed_and_resumed_run_is_bit_identical(tmp_path: Path) -> None:
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    _run_to_end(reference)
    rng = random.Random(1234)
    kills = 0
    while kills < 10:
        marker = interrupted / "started"
        marker.unlink(missing_ok=True)
        child = _start(interrupted)
        deadline = time.monotonic() + 60
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))  # mid-epoch, between steps, during a save
        if child.poll() is not None:
            break  # the run finished before this kill: it is complete
        child.send_signal(signal.SIGKILL)
        child.wait()
        kills += 1
    if not (interrupted / "final").exists():
        _run_to_end(interrupted)
    assert kills >= 10, f"only {kills} kills landed before the run finished"
    expected, got = cv.load(reference / "final"), cv.load(interrupted / "final")
    assert_exact(expected, got)
    steps = got["metrics_history"]["step"].tolist()
    assert steps == list(range(1, expected["step"] + 1))  # one loss per step, none lost or repeated


@pytest.mark.slow
def test_sigterm_commits_a_full_checkpoint_and_exits_cleanly(tmp_path: Path) -> None:
    child = _start(tmp_path)
    while not (tmp_path / "started").exists():
        time.sleep(0.005)
    time.sleep(0.3)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 0, err.decode()[-2000:]
    assert not (tmp_path / "final").exists()  # it stopped early, cleanly
    newest = max(cv.list_checkpoints(tmp_path))
    info = cv.info(newest)
    assert info.metadata["reason"] == "preemption" and info.metadata["scope"] == "full"
    assert cv.verify(newest).ok


@pytest.mark.slow
def test_check_resume_command_reports_exact(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ckptvault.cli.main",
            "check-resume",
            "--kills",
            "2",
            "--workdir",
            str(tmp_path),
            "--json",
            "--",
            sys.executable,
            str(SCRIPT),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    result = json.loads(done.stdout)
    assert result["exact"] is True and result["kills"] >= 1 and result["first_difference"] is None
