"""``ckptvault check-resume`` tells a non-deterministic script from an inexact resume (issue 19 item 3):
two uninterrupted runs first; when they differ it says so (exit 3), naming the part and the likely
cause, and kills nothing; otherwise the kill-and-resume comparison (exit 0 exact, 1 differs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ckptvault.cli.check_resume import likely_cause

SCRIPT = Path(__file__).with_name("_walk_script.py")


def _check(tmp_path: Path, mode: str, *options: str) -> tuple[int, dict[str, object], str]:
    args = ["check-resume", "--kills", "2", "--workdir", str(tmp_path), *options]
    done = subprocess.run(
        [sys.executable, "-m", "ckptvault.cli.main", *args, "--", sys.executable, str(SCRIPT), mode],
        capture_output=True,
        text=True,
        timeout=300,
    )
    result = json.loads(done.stdout) if "--json" in options else {}
    return done.returncode, result, done.stdout + done.stderr


@pytest.mark.slow
def test_an_exact_script_is_reported_exact(tmp_path: Path) -> None:
    code, result, text = _check(tmp_path, "exact", "--json")
    assert code == 0, text
    assert result["exact"] is True and result["deterministic"] is True and result["kills"] >= 1


@pytest.mark.slow
def test_an_unseeded_script_is_reported_not_deterministic(tmp_path: Path) -> None:
    code, _, text = _check(tmp_path, "unseeded")
    assert code == 3, text
    assert "not deterministic" in text and "rng.numpy" in text and "np.random.seed" in text
    assert not (tmp_path / "resumed").exists()  # no kill was made: resume was not blamed


@pytest.mark.slow
def test_state_kept_outside_the_train_state_is_an_inexact_resume(tmp_path: Path) -> None:
    code, result, text = _check(tmp_path, "forgetful", "--json")
    assert code == 1, text
    assert result["deterministic"] is True and result["exact"] is False
    assert "walk" in str(result["first_difference"])


@pytest.mark.slow
def test_the_determinism_check_can_be_skipped(tmp_path: Path) -> None:
    code, result, text = _check(tmp_path, "unseeded", "--json", "--no-determinism")
    assert code == 1, text  # blamed on resume, as before the check existed
    assert result["deterministic"] is None and not (tmp_path / "reference-again").exists()


@pytest.mark.parametrize(
    "path,words",
    [
        ("rng.python.1.3", "random.seed"),
        ("rng.torch", "torch.manual_seed"),
        ("model.model.weight", "non-deterministic kernel"),
        ("metrics_history.loss", "different metrics"),
    ],
)
def test_likely_causes(path: str, words: str) -> None:
    assert words in likely_cause(path)
