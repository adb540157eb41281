"""Smoke test of ``benchmarks/scaling.py``: its two intricate curves on tiny points, one repetition.

It checks that the benchmark runs end to end (the cloned run indexes, restores and deletes; the
catalog's SQLite replication doubles the rows) and writes its JSON and PNG; numbers are not judged.
The size and count curves are plain save/load loops, left to ``--quick`` runs.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.timeout(180)
def test_scaling_quick_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("scaling_bench", BENCH / "scaling.py")
        assert spec is not None and spec.loader is not None
        scaling = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(scaling)
        out_json, out_png = tmp_path / "scaling.json", tmp_path / "scaling.png"
        argv = ["--quick", "--fresh", "--reps", "1", "--dir", str(tmp_path)]
        argv += ["--json", str(out_json), "--png", str(out_png)]
        argv += ["--only", "runs,catalog", "--points", "runs=3,10"]
        argv += ["--points", "catalog=20,40", "--catalog-per-run", "20", "--catalog-real", "20"]
        assert scaling.main(argv) == 0
    finally:
        sys.path.remove(str(BENCH))
    results = json.loads(out_json.read_text())
    assert set(results["curves"]) == {"runs", "catalog"}
    for curve in results["curves"].values():
        for series in curve["series"].values():
            assert all(m > 0 for m in series["median_s"]), series["label"]
    assert results["curves"]["runs"]["x"] == [3.0, 10.0]
    assert [p["replicated"] for p in results["curves"]["catalog"]["point_info"]] == [False, True]
    assert results["curves"]["catalog"]["x"] == [20.0, 40.0]
    assert out_png.stat().st_size > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("scaling_")]  # scratch deleted
    assert "Summary" in capsys.readouterr().out
