"""The registry over storage documents (issue 14): concurrent changes by compare-and-swap lose
nothing, a lost race leaves no stale pin, and planted links are refused as before."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptvault as cv
from ckptvault.catalog.registry import REGISTERED_NAME, Registry, registered_in
from ckptvault.catalog.store import CATALOG_DIR
from ckptvault.errors import CheckpointError


def save(path: Path, seed: int = 0) -> Path:
    cv.save(path, {"w": np.full(4, seed, dtype=np.float32)})
    return path


def pins(run: Path) -> dict[str, Any]:
    return dict(json.loads((run / REGISTERED_NAME).read_text())["checkpoints"])


def test_an_interleaved_register_loses_the_race_and_retries(tmp_path: Path) -> None:
    """A reads the model, pins its checkpoint, and before A writes, B registers: A's write is
    refused (compare-and-swap), A retries as the next version; both survive, and the pin A added
    for the number it lost is gone."""
    root = tmp_path / "root"
    a_ckpt, b_ckpt = save(root / "run" / "step_1", 1), save(root / "run" / "step_2", 2)
    a, b = Registry(root), Registry(root)
    original_pin = a._pin
    interleaved: list[int] = []

    def pin_then_let_b_in(rel: str, name: str, version: int) -> None:
        original_pin(rel, name, version)
        if not interleaved:
            interleaved.append(version)
            b.register("m", b_ckpt)  # B wins the race for that version number

    a._pin = pin_then_let_b_in  # type: ignore[method-assign]
    version = a.register("m", a_ckpt, alias="production")
    assert interleaved == [1] and version["version"] == 2
    doc = Registry(root).show("m")
    assert [(v["version"], v["checkpoint"]) for v in doc["versions"]] == [
        (1, "run/step_2"),
        (2, "run/step_1"),
    ]
    assert doc["aliases"] == {"production": 2}
    assert pins(root / "run") == {"step_1": [["m", 2]], "step_2": [["m", 1]]}
    assert registered_in(root / "run") == {"step_1", "step_2"}


def test_concurrent_registrations_from_two_registries_all_survive(tmp_path: Path) -> None:
    root = tmp_path / "root"
    per_thread = 6
    checkpoints = {t: [save(root / f"run{t}" / f"step_{i}", i) for i in range(per_thread)] for t in (0, 1)}
    registries = {t: Registry(root) for t in (0, 1)}
    start = threading.Barrier(2)
    failures: list[BaseException] = []

    def work(t: int) -> None:
        try:
            start.wait()
            for path in checkpoints[t]:
                registries[t].register("m", path)
                registries[t].alias("m", 1, f"seen-by-{t}")
        except BaseException as exc:  # reported below, not lost in the thread
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures
    doc = Registry(root).show("m")
    assert [v["version"] for v in doc["versions"]] == list(range(1, 2 * per_thread + 1))
    registered = sorted(v["checkpoint"] for v in doc["versions"])
    assert registered == sorted(f"run{t}/step_{i}" for t in (0, 1) for i in range(per_thread))
    assert doc["aliases"] == {"seen-by-0": 1, "seen-by-1": 1}
    assert len(doc["history"]) == 2 * per_thread
    for t in (0, 1):
        refs = pins(root / f"run{t}")
        assert registered_in(root / f"run{t}") == {f"step_{i}" for i in range(per_thread)}
        for version in doc["versions"]:  # each pin names exactly the version holding it
            if version["checkpoint"].startswith(f"run{t}/"):
                assert refs[version["checkpoint"].split("/")[1]] == [["m", version["version"]]]


@pytest.mark.parametrize("planted", ["entry", "marker", "directory"])
def test_a_symlinked_registry_file_is_refused(tmp_path: Path, planted: str) -> None:
    root, victim = tmp_path / "root", tmp_path / "victim"
    checkpoint = save(root / "run" / "step_1")
    victim.mkdir()
    (victim / "m.json").write_text("{}")
    (victim / REGISTERED_NAME).write_text("{}")
    if planted == "directory":
        (root / CATALOG_DIR).mkdir()
        (root / CATALOG_DIR / "registry").symlink_to(victim)
    else:
        Registry(root).register("m", checkpoint)
        link = (
            root / CATALOG_DIR / "registry" / "m.json"
            if planted == "entry"
            else root / "run" / REGISTERED_NAME
        )
        link.unlink()
        link.symlink_to(victim / link.name)
    with pytest.raises(CheckpointError, match="symbolic link"):
        Registry(root).register("m", checkpoint)
    assert (victim / "m.json").read_text() == "{}" and (victim / REGISTERED_NAME).read_text() == "{}"
    if planted == "directory":
        with pytest.raises(CheckpointError, match="symbolic link"):
            Registry(root).names()
