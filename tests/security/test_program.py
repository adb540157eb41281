"""A stored ``torch.export`` program is code: ``load_program`` refuses it unless the caller trusts it.

``torch.export.load`` honours a ``use_pickle`` flag in the archive's weight table and then calls
``torch.load(weights_only=False)`` on the weight's bytes: a hand-made checkpoint whose program
carries such a weight runs code when the program is loaded. These tests craft that archive with
the library's own writer (an attacker can write any digest-consistent checkpoint) and check that
nothing runs unless ``trusted=True`` is passed.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

import ckptvault as cv
from ckptvault.api import PROGRAM_FILE


class _Plant:
    """Unpickling this creates a directory: the observable trace of code run by a load."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (self.marker,))


def _hostile_program(marker: Path) -> bytes:
    model = torch.nn.Linear(3, 2)
    program = torch.export.export(model, (torch.zeros(1, 3),))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                config["config"]["weight"]["use_pickle"] = True
                data = json.dumps(config).encode()
            elif item.filename.endswith("weights/weight_0"):
                payload = io.BytesIO()
                torch.save(_Plant(str(marker)), payload)
                data = payload.getvalue()
            target.writestr(item, data)
    return out.getvalue()


def test_hostile_program_runs_code_in_torch_itself(tmp_path: Path) -> None:
    """The control: the crafted archive really does run code through torch.export.load."""
    marker = tmp_path / "ran"
    with pytest.raises(Exception):  # noqa: B017 - torch fails after the code has run
        torch.export.load(io.BytesIO(_hostile_program(marker)))
    assert marker.exists()


def test_load_program_refuses_an_untrusted_program_before_torch_sees_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    cv.save(tmp_path / "ck", {"w": torch.zeros(2)}, extra_files={PROGRAM_FILE: _hostile_program(marker)})
    with pytest.raises(cv.UnsafeCheckpointError, match="trusted=True"):
        cv.load_program(tmp_path / "ck")
    assert not marker.exists()
