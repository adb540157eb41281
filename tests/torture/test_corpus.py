"""The hostile input corpus (tests/corpus): every case gives its typed error, fast and small.

``tests/corpus/index.json`` lists each case, the API it attacks and what must happen. One
subprocess (``tests/corpus/run_cases.py``) applies all of them, each in its own forked child with a
per-case kill timeout and a capped address space, and reports per call the outcome, the seconds and
the child's peak RSS growth; these tests judge that report case by case. A subprocess because the
memory figures must not include pytest's, and because a hang must cost a timeout, not the session.

The contract checked for every case:

* the primary API gives the expected outcome -- for an error case, the expected
  :class:`~ckptvault.CheckpointError` subclass, never another exception;
* every other read path of a checkpoint case (load, the lazy open and a walk of it, info, verify;
  at full scale also the ``ckptvault verify`` CLI) raises only ``CheckpointError``, and ``verify``
  (which never raises) reports not-ok exactly when the case is hostile;
* nothing ran: no malicious pickle's marker file exists anywhere, and a refused legacy import
  leaves no checkpoint behind;
* each call takes under ``SECONDS`` (or the case's own bound for a deliberately big input) and
  the case grows RSS by under ``RSS_MB``.

Scale: the CI slice runs every case, but the deliberately big ones (the 100,000-entry header, about
2 s a call here) through their primary API only, and skips the CLI (about 50 ms a case); full
scale runs every read path of every case.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import FULL, Figures, pick

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
INDEX = json.loads((CORPUS / "index.json").read_text())
CASES = {entry["name"]: entry for entry in INDEX["cases"]}
CHECKPOINT_APIS = {"load", "open", "info", "verify", "cli-verify"}
SECONDS = 2.0
RSS_MB = 200.0
HANG_GUARD_S = pick(240, 600)  # the whole run; each case is also killed after 20 s by the runner


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("corpus-work")
    command = [sys.executable, str(CORPUS / "run_cases.py"), "--work", str(work)]
    command += ["--cli"] if FULL else ["--big-primary-only"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=work)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the corpus run hung past {HANG_GUARD_S} s; stderr: {str(exc.stderr)[-2000:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_corpus_is_up_to_date(figures: Figures) -> None:
    """The checked-in files are exactly what make_corpus.py generates (so they are reproducible)."""
    done = subprocess.run(
        [sys.executable, str(CORPUS / "make_corpus.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = [p for p in (CORPUS / "cases").rglob("*") if p.is_file()]
    figures.add("corpus.cases", len(CASES))
    figures.add("corpus.files", len(files))
    figures.add("corpus.bytes", sum(p.stat().st_size for p in files) + (CORPUS / "index.json").stat().st_size)


# What the corpus must attack (the reliability issue's list); a name fragment each.
REQUIRED = {
    "huge header length": "header_length_2_63",
    "truncated headers": "header_truncated_",
    "overlapping offsets": "offsets_overlapping",
    "out-of-range offsets": "offsets_out_of_range",
    "duplicate keys in a header": "header_duplicate_key",
    "duplicate keys in a manifest": "manifest_duplicate_",
    "trailing bytes / polyglots": "polyglot_",
    "shape products overflowing int64": "shape_product_overflows_int64",
    "zero-size tensors reusing offsets": "zero_size_tensors_sharing_offsets",
    "a 100,000-entry header": "header_100000_entries",
    "trees 10,000 deep": "tree_nested_10000_",
    "gigantic integers": "gigantic_int",
    "path traversal": "path_traversal_dotdot",
    "absolute paths": "path_absolute_",
    "symlinks out of the checkpoint": "symlink_data_file_out_of_checkpoint",
    "manifests copied from other checkpoints": "manifest_copied_from_",
    "chunk frames with lying sizes": "chunk_frame_",
    "a malicious legacy pickle": "legacy_pt_reduce_os_system",
    "a model factory module planted where a checkpoint can name it": "architecture_factory_planted_",
}


def test_corpus_covers_the_attack_list() -> None:
    missing = [what for what, fragment in REQUIRED.items() if not any(fragment in name for name in CASES)]
    assert not missing, f"no corpus case for: {missing}"
    apis = {entry["api"] for entry in CASES.values()}
    assert apis == {"load", "verify", "open", "info", "import_legacy", "catalog", "load_model"}, apis


def _check_primary(entry: dict[str, Any], call: dict[str, Any]) -> None:
    expect = entry["expect"]
    if expect == "error":
        assert call["outcome"] == "raised", f"{entry['api']} accepted a hostile input: {call}"
        assert call["typed"], f"{entry['api']} raised a non-CheckpointError:\n{call['traceback']}"
        assert entry["error"] in call["mro"], (
            f"expected {entry['error']}, got {call['error']}: {call['message']}"
        )
    elif expect == "ok":
        assert call["outcome"] == "ok", f"a valid input was refused: {call}"
    elif expect == "not-ok":
        assert call["outcome"] == "not-ok", f"verify passed a hostile checkpoint: {call}"
        assert entry["problem"] in call["problems"], call
    elif expect == "skipped":
        assert call["outcome"] == "ok", f"the catalog failed on a hostile checkpoint: {call}"
        for rows in (call["indexed"], call["indexed_after_rebuild"]):
            assert "run/step_1" in rows, f"the valid neighbour was not indexed: {rows}"
            assert "run/step_2" not in rows, f"the hostile checkpoint was indexed: {rows}"
    else:
        raise AssertionError(f"unknown expectation {expect!r}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_corpus_case(name: str, corpus_run: dict[str, Any], figures: Figures) -> None:
    entry = CASES[name]
    result = corpus_run["cases"][name]
    assert "hang" not in result, f"{name} hung: killed after {result.get('timeout_s')} s"
    assert "crash" not in result, result["crash"]
    assert not result["markers"], f"code ran: marker files {result['markers']}"
    calls = result["calls"]
    _check_primary(entry, calls[entry["api"]])

    hostile = entry["expect"] != "ok"
    for api, call in calls.items():
        if call["outcome"] == "raised":
            assert call["typed"], f"{api} raised a non-CheckpointError:\n{call['traceback']}"
        if api == "verify":
            assert call["outcome"] == ("not-ok" if hostile else "ok"), f"verify: {call}"
        if api == "cli-verify":
            assert call["outcome"] == "exit" and (call["code"] != 0) == hostile, f"ckptvault verify: {call}"
        if api in ("load", "open", "info") and not hostile:
            assert call["outcome"] == "ok", f"{api} refused a valid input: {call}"
    if entry["api"] == "import_legacy" and hostile:
        assert not calls["import_legacy"]["left_target"], "a refused import left a checkpoint behind"

    bound = entry.get("max_seconds", SECONDS)
    slowest = max(call["seconds"] for call in calls.values())
    assert slowest < bound, f"{name}: a call took {slowest:.2f} s (bound {bound} s): {calls}"
    assert result["rss_growth_mb"] < RSS_MB, f"{name}: RSS grew by {result['rss_growth_mb']} MB"

    figures.add("corpus.api_calls", len(calls))
    if entry["expect"] == "error":
        figures.add("corpus.typed_errors")
    if "regression" in entry:
        figures.add("corpus.regressions")
    if "max_seconds" in entry:
        figures.maximum("corpus.max_seconds_large_inputs", slowest)
    else:
        figures.maximum("corpus.max_seconds", slowest)
    figures.maximum("corpus.max_rss_growth_mb", result["rss_growth_mb"])
    if not FULL:
        figures.note("corpus.cli", "ckptvault verify CLI run on every case at full scale only (~50 ms each)")
