"""The reliability document's figures are the rendering of its run file -- checked, not trusted.

Outside tests/torture on purpose: the full run that writes docs/reliability-run.json cannot check
its own rendering; every later `make test` does."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC, RUN = ROOT / "docs" / "reliability.md", ROOT / "docs" / "reliability-run.json"


def _renderer():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "render_report", ROOT / "tests" / "torture" / "render_report.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_document_figures_are_the_rendered_run() -> None:
    if not RUN.exists():
        pytest.fail("docs/reliability-run.json is missing: run `make torture`")
    renderer = _renderer()
    doc = json.loads(RUN.read_text())
    section = re.search(
        re.escape(renderer.BEGIN) + r"\n(.*)\n" + re.escape(renderer.END), DOC.read_text(), re.S
    )
    assert section is not None, "no figures section in docs/reliability.md"
    fuzz_run = ROOT / "docs" / "fuzz-run.json"
    fuzz = json.loads(fuzz_run.read_text()) if fuzz_run.exists() else None
    assert section.group(1) == renderer.render(doc, fuzz), "docs/reliability.md is stale: run `make torture`"
    if fuzz is not None:
        assert all(not r["findings"] and r["exit_code"] == 0 for r in fuzz["harnesses"].values())
    assert doc["scale"] == "full" and doc["exit_status"] == 0, "the published run must be a green full run"
    assert not [k for k, v in doc["tests"].items() if v["outcome"] == "failed"]


def test_render_reports_failures_and_notes(tmp_path: Path) -> None:
    renderer = _renderer()
    doc = {
        "scale": "full",
        "exit_status": 1,
        "wall_s": 12.5,
        "figures": {"fault_loops.faults_injected": 42, "kills.random": 3},
        "notes": {"errors.enospc": "mount refused"},
        "tests": {"tests/torture/test_fault_loops.py::t": {"outcome": "failed", "seconds": 1.0}},
    }
    text = renderer.render(doc)
    assert "| `faults_injected` | 42 |" in text and "1 failed" in text and "mount refused" in text
