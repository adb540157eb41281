"""``ckptvault check-resume --nproc 2``: the example FSDP2 script, run as a 2-rank gloo job,
uninterrupted and killed (every rank at once, SIGKILL) then restarted, ends bit-identical."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ckptvault.cli.main import app

pytestmark = pytest.mark.distributed

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fsdp2_train.py"


def test_check_resume_two_ranks_exact(tmp_path: Path) -> None:
    command = [sys.executable, str(EXAMPLE), "--steps", "16", "--every", "4", "--step-seconds", "0.1"]
    args = ["check-resume", "--nproc", "2", "--kills", "1", "--workdir", str(tmp_path), "--", *command]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "exact" in result.output and "killed 1 times" in result.output, result.output
    # both runs left sharded checkpoints written by both ranks
    for run in ("reference", "resumed"):
        assert (tmp_path / run / "step_00000016").is_dir()
