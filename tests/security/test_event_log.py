"""The run's event log is untrusted input: damaged lines are skipped, never a failure or a huge read."""

from __future__ import annotations

import json
from pathlib import Path

from ckptvault.manager import EVENTS_NAME, read_events


def test_non_utf8_and_overlong_lines_are_skipped(tmp_path: Path) -> None:
    good = {"event": "commit", "name": "step_00000001"}
    (tmp_path / EVENTS_NAME).write_bytes(
        json.dumps(good).encode()
        + b"\n\xff\xfe not utf-8 \x80\n"
        + b'{"event": "'
        + b"x" * (3 << 20)
        + b'"}\n'
        + json.dumps({**good, "name": "step_00000002"}).encode()
        + b"\n"
    )
    assert [e["name"] for e in read_events(tmp_path)] == ["step_00000001", "step_00000002"]
