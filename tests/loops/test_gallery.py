"""The gallery (issue 19 item 4): loops people actually write, each run through ``check-resume`` with
five random SIGKILLs and restarts; every one must end bit-identical to its uninterrupted run.

The scripts are in ``scripts/``; each reads ``CKPTVAULT_RUN_DIR`` (set by check-resume), restores,
trains a few dozen small steps, saving often, and saves its final state. Sizes are small; most of the
gallery's time (3.5-5 minutes on a loaded 2-core machine, ~3 CPU-minutes) is starting Python and
torch: each check starts its script about eight times. (Checking two loops at a time was slower
there, not faster.) The
determinism pre-check (a second uninterrupted run) is done for the loop of the issue only: the other
loops cover resume, and the pre-check has its own tests in ``tests/cli/test_check_resume.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ckptvault.cli.check_resume import check_resume

SCRIPTS = Path(__file__).with_name("scripts")
LOOPS = {
    "image_classifier": 1,  # the loop of issue 19: workers with random augmentation, EMA, bf16, accumulation
    "grad_accumulation_timed": 2,  # accumulation + every_seconds: saves wait for the boundary
    "iterable_stream": 3,  # IterableDataset, 2 workers, sharded, replayed on resume
    "gan": 4,  # two models, two optimizers
    "grad_scaler": 5,  # GradScaler skipping steps and changing its scale
    "workers_change": 6,  # 2 workers in the killed run, none in the resumed ones
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LOOPS))
def test_loop_resumes_exactly_after_five_kills(name: str, tmp_path: Path) -> None:
    result = check_resume(
        [sys.executable, str(SCRIPTS / f"{name}.py")],
        kills=5,
        seed=LOOPS[name],
        workdir=str(tmp_path),
        timeout=300,
        determinism=name == "image_classifier",
    )
    assert result.first_difference is None, result
    assert result.exact and result.kills >= 3, result  # most kills landed mid-run
    if name == "image_classifier":
        assert result.deterministic is True
