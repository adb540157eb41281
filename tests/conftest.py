"""Shared fixtures: every test gets its own directory; nothing touches the repository tree."""

from __future__ import annotations

from pathlib import Path

import pytest

# moto_server / s3_bucket / fault_proxy: a real S3-compatible server on loopback.
pytest_plugins = ["tests.s3_fixtures"]


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    """A fresh directory to save checkpoints into."""
    out = tmp_path / "ckpts"
    out.mkdir()
    return out
