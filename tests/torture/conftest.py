"""The reliability suite's shared pieces: its scale, and the figures it reports.

Scale: ``CKPTVAULT_TORTURE=full`` (what ``make torture`` sets) runs every case; otherwise the quick
slice CI runs inside ``make test`` (each test picks its slice with :func:`pick`).

Figures: tests add counts (faults injected, crash states replayed, corpus files, fuzz executions,
"nothing lost" checks...) to the session's :class:`Figures`; with ``CKPTVAULT_TORTURE_REPORT=FILE``
they are written to FILE as JSON at the end of the session together with every test's outcome, and
``tools/reliability_report.py`` renders that file into ``docs/reliability.md`` -- so the document's
figures come from a run's output, never from prose.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

FULL = os.environ.get("CKPTVAULT_TORTURE", "") == "full"
SCALE = "full" if FULL else "ci"


def pick(ci: Any, full: Any) -> Any:
    """The value for this session's scale."""
    return full if FULL else ci


class Figures:
    """Counters keyed by ``"<area>.<figure>"`` (summed across tests); thread-safe."""

    def __init__(self) -> None:
        self.counts: dict[str, float] = defaultdict(float)
        self.notes: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, key: str, n: float = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def maximum(self, key: str, value: float) -> None:
        with self._lock:
            self.counts[key] = max(self.counts.get(key, value), value)

    def note(self, key: str, text: str) -> None:
        """A short free-text fact for the report (e.g. why a case was skipped on this machine)."""
        with self._lock:
            self.notes[key] = text


_FIGURES = Figures()
_OUTCOMES: dict[str, dict[str, Any]] = {}
_STARTED = time.time()


@pytest.fixture(scope="session")
def figures() -> Figures:
    return _FIGURES


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.torture)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "torture/" not in report.nodeid.replace(os.sep, "/"):
        return
    entry = _OUTCOMES.setdefault(report.nodeid, {"outcome": "passed", "seconds": 0.0})
    entry["seconds"] += report.duration
    if report.failed:
        entry["outcome"] = "failed"
    elif report.skipped and report.when in ("setup", "call"):
        entry["outcome"] = "skipped"
        entry["reason"] = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    out = os.environ.get("CKPTVAULT_TORTURE_REPORT")
    if not out:
        return
    doc = {
        "scale": SCALE,
        "exit_status": int(exitstatus),
        "wall_s": round(time.time() - _STARTED, 1),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "system": platform.platform(),
        },
        "figures": dict(sorted(_FIGURES.counts.items())),
        "notes": dict(sorted(_FIGURES.notes.items())),
        "tests": dict(sorted(_OUTCOMES.items())),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(doc, indent=1) + "\n")
