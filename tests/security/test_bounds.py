"""Amplification (issue 13, classes 3 and 6): work and memory follow the bytes actually stored.

Each hostile checkpoint here is a real save whose manifest is then rewritten the way an attacker
would: one stored chunk referenced thousands of times, a stride-0 view claiming a TiB, dict keys
whose hashes all collide, duplicate keys a lazy reader used to accept. Memory-sensitive cases run
in a child process under ``RLIMIT_AS`` so a regression fails the test instead of the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptvault as cv
from ckptvault import errors
from ckptvault.engine.writer import NO_LEAVES
from ckptvault.format.digest import chunked_tensor_digest
from ckptvault.format.tree import TreeDecodeError, TreeDecoder

MIB = 1 << 20
P61 = 2**61 - 1  # Python hashes an int as its value modulo this prime: its multiples all hash to 0


def _rewrite_manifest(ckpt: Path, change: Any) -> None:
    path = ckpt / "manifest.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.chmod(0o644)
    path.write_text(json.dumps(doc))


def _repeated_chunk_checkpoint(tmp_path: Path, refs: int) -> Path:
    """One 1 MiB chunk on disk, referenced ``refs`` times by a consistent manifest."""
    ckpt = tmp_path / "run" / "step_1"
    cv.save(ckpt, {"w": np.arange(MIB // 4, dtype=np.float32)}, incremental=True, chunk_bytes=MIB)

    def repeat(doc: dict[str, Any]) -> None:
        (name,) = doc["tensors"]
        entry = doc["tensors"][name]
        (chunk,) = entry["chunks"]
        entry["chunks"] = [chunk] * refs
        entry["shape"] = [refs * MIB // 4]
        entry["digest"] = chunked_tensor_digest("blake3", refs * MIB, [chunk[0]] * refs)
        doc["tree"]["v"]["w"]["shape"] = [refs * MIB // 4]

    _rewrite_manifest(ckpt, repeat)
    return ckpt


def _run_limited(code: str, *, address_space: int = 3 << 30, timeout: float = 60) -> str:
    """Runs ``code`` in a child under an address-space limit; returns its stdout (last line)."""
    prelude = textwrap.dedent(
        f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({address_space}, {address_space}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_load_refuses_a_chunk_referenced_100k_times(tmp_path: Path) -> None:
    # 1 MiB stored, 100 GiB declared: refused before allocating, with the typed error.
    ckpt = _repeated_chunk_checkpoint(tmp_path, 100_000)
    started = time.perf_counter()
    out = _run_limited(
        f"""
        import ckptvault as cv
        try:
            cv.load({str(ckpt)!r})
        except Exception as exc:
            print(type(exc).__name__)
        else:
            print("loaded")
        """
    )
    assert out == "ResourceLimitError"
    assert time.perf_counter() - started < 30


def test_export_refuses_a_chunk_referenced_100k_times(tmp_path: Path) -> None:
    # Exporting writes every reference out in full: 1 MiB stored must not become a 100 GiB file.
    ckpt = _repeated_chunk_checkpoint(tmp_path, 100_000)
    out = _run_limited(
        f"""
        from ckptvault.engine.inspect import export_safetensors
        from ckptvault.storage.local import LocalStorage
        try:
            export_safetensors(LocalStorage(), {str(ckpt)!r}, {str(tmp_path / "x.safetensors")!r})
        except Exception as exc:
            print(type(exc).__name__)
        else:
            print("exported")
        """
    )
    assert out == "ResourceLimitError"
    assert not (tmp_path / "x.safetensors").exists()


def test_max_bytes_is_settable_and_typed(tmp_path: Path) -> None:
    ckpt = tmp_path / "c"
    cv.save(ckpt, {"w": np.zeros(MIB, dtype=np.uint8)})
    with pytest.raises(errors.ResourceLimitError) as caught:
        cv.load(ckpt, max_bytes=MIB - 1)
    assert isinstance(caught.value, cv.CheckpointError)
    assert cv.load(ckpt, max_bytes=MIB)["w"].nbytes == MIB
    with cv.open(ckpt, max_bytes=MIB - 1) as view, pytest.raises(errors.ResourceLimitError):
        view["w"]


def test_verify_streams_a_chunk_referenced_20k_times(tmp_path: Path) -> None:
    # 20 GiB logical from 1 MiB stored: verify checks the one chunk once, in bounded memory.
    ckpt = _repeated_chunk_checkpoint(tmp_path, 20_000)
    out = _run_limited(
        f"""
        import time, ckptvault as cv
        started = time.perf_counter()
        report = cv.verify({str(ckpt)!r})
        print(report.ok, [p.kind for p in report.problems], time.perf_counter() - started < 10)
        """
    )
    assert out == "True [] True"


def _view_checkpoint(path: Path, numel: int, fill: float = 0.0) -> Path:
    """A 4-byte stored tensor presented as a stride-0 view of ``numel`` elements."""
    import torch

    cv.save(path, {"w": torch.full((1,), fill)})

    def widen(doc: dict[str, Any]) -> None:
        leaf = doc["tree"]["v"]["w"]
        leaf["shape"] = [numel]
        leaf["view"] = {"byte_offset": 0, "stride": [0]}

    _rewrite_manifest(path, widen)
    return path


def test_load_and_open_refuse_a_stride0_view_of_a_tib(tmp_path: Path) -> None:
    ckpt = _view_checkpoint(tmp_path / "c", 2**38)  # 1 TiB of float32 from 4 stored bytes
    assert cv.verify(ckpt).ok is False  # what load refuses, verify reports
    with pytest.raises(errors.ResourceLimitError):
        cv.load(ckpt)
    with cv.open(ckpt) as view, pytest.raises(errors.ResourceLimitError):
        view["w"]


def test_diff_of_huge_views_is_refused_not_allocated(tmp_path: Path) -> None:
    a = _view_checkpoint(tmp_path / "a", 2**38, 1.0)
    b = _view_checkpoint(tmp_path / "b", 2**38, 2.0)
    from ckptvault.engine.inspect import diff_checkpoints
    from ckptvault.storage.local import LocalStorage

    with pytest.raises(errors.ResourceLimitError):
        diff_checkpoints(LocalStorage(), str(a), str(b))


def test_diff_streams_views_in_bounded_memory(tmp_path: Path) -> None:
    # 512 MiB logical per side (a float64 copy would be 1 GiB each): compared in blocks under 1.5 GiB.
    a = _view_checkpoint(tmp_path / "a", 2**27, 1.0)
    b = _view_checkpoint(tmp_path / "b", 2**27, 3.0)
    out = _run_limited(
        f"""
        import torch  # noqa: F401  (loaded before the limit bites: its import maps much address space)
        from ckptvault.engine.inspect import diff_checkpoints
        from ckptvault.storage.local import LocalStorage
        (row,) = diff_checkpoints(LocalStorage(), {str(a)!r}, {str(b)!r})
        print(row.status, row.max_abs)
        """,
        address_space=6 << 30,
    )
    assert out == "changed 2.0"


# -- manifest decoding is linear -------------------------------------------------------------------
def _colliding_dict(keys: list[Any]) -> dict[str, Any]:
    return {"t": "dict", "items": [[k, i] for i, k in enumerate(keys)]}


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "node",
    [
        _colliding_dict([{"t": "int", "hex": hex(k * P61)} for k in range(1, 60_001)]),
        # -1 and -2 hash alike, so tuples of them collide as a whole: 2**16 distinct keys, one hash.
        _colliding_dict(
            [{"t": "tuple", "v": [-1 - ((k >> i) & 1) for i in range(16)]} for k in range(2**16)]
        ),
        {"t": "set", "v": [{"t": "int", "hex": hex(k * P61)} for k in range(1, 60_001)]},
        {
            "t": "frozenset",
            "v": [{"t": "complex", "re": float(k * 1000003), "im": float(-k)} for k in range(60_000)],
        },
    ],
    ids=["bigint-keys", "tuple-keys", "bigint-set", "complex-frozenset"],
)
def test_hash_colliding_members_are_refused_fast(node: dict[str, Any]) -> None:
    started = time.perf_counter()
    with pytest.raises(TreeDecodeError, match="collide"):
        TreeDecoder(NO_LEAVES).decode(node)
    assert time.perf_counter() - started < 5


@pytest.mark.timeout(20)
def test_shared_ids_must_be_small_integers(tmp_path: Path) -> None:
    # Ids that are multiples of 2**61-1 would make the shared-object table quadratic.
    ckpt = tmp_path / "c"
    arrays = {f"a{i}": np.zeros(1) for i in range(3)}
    cv.save(ckpt, {"x": arrays, "y": arrays})

    def huge_ids(doc: dict[str, Any]) -> None:
        text = json.dumps(doc["tree"])
        for i in range(3):
            text = text.replace(f'"id": {i}', f'"id": {(i + 1) * P61 * 2**64}')
        doc["tree"] = json.loads(text)

    _rewrite_manifest(ckpt, huge_ids)
    with pytest.raises(cv.CorruptCheckpointError):
        cv.load(ckpt)
    with pytest.raises(cv.CorruptCheckpointError), cv.open(ckpt) as view:
        view["x"]


# -- every reader agrees ------------------------------------------------------------------------------
def test_lazy_open_refuses_duplicate_keys_like_load(tmp_path: Path) -> None:
    ckpt = tmp_path / "c"
    cv.save(ckpt, {1: np.zeros(2), 2: np.ones(2)})

    def duplicate(doc: dict[str, Any]) -> None:
        doc["tree"]["items"][1][0] = 1

    _rewrite_manifest(ckpt, duplicate)
    with pytest.raises(cv.CorruptCheckpointError):
        cv.load(ckpt)
    with pytest.raises(cv.CorruptCheckpointError), cv.open(ckpt) as view:
        view.keys()


def test_lazy_open_applies_the_node_limits_of_load(tmp_path: Path) -> None:
    ckpt = tmp_path / "c"
    cv.save(ckpt, {"a": {"b": 1}})

    def unknown_field(doc: dict[str, Any]) -> None:
        doc["tree"]["v"]["a"]["surprise"] = 1

    _rewrite_manifest(ckpt, unknown_field)
    with pytest.raises(cv.CorruptCheckpointError):
        cv.load(ckpt)
    with pytest.raises(cv.CorruptCheckpointError), cv.open(ckpt) as view:
        view["a"]["b"]


# -- verify: manifest and sidecar agree -----------------------------------------------------------------
def test_verify_reports_metrics_that_disagree_with_the_sidecar(tmp_path: Path) -> None:
    ckpt = tmp_path / "c"
    cv.save(ckpt, {"w": np.zeros(3)}, metadata={"step": 5, "metrics": {"loss": 1.25}})
    assert cv.verify(ckpt).ok

    def better_loss(doc: dict[str, Any]) -> None:
        doc["metadata"]["v"]["metrics"]["v"]["loss"] = 0.01  # the sidecar (digested) still says 1.25

    _rewrite_manifest(ckpt, better_loss)
    report = cv.verify(ckpt)
    assert not report.ok
    assert [p.kind for p in report.problems] == ["metadata-mismatch"]
    assert "loss" in report.problems[0].message


# -- legacy import is bounded ------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_import_of_a_shared_reference_bomb_is_refused(tmp_path: Path) -> None:
    import torch

    node: Any = [torch.zeros(1)]
    for _ in range(20):
        node = [node] * 1000  # 1000**20 paths through 20 small lists
    source = tmp_path / "bomb.pt"
    torch.save({"x": node}, source)
    from ckptvault.legacy import import_legacy

    started = time.perf_counter()
    with pytest.raises(errors.ResourceLimitError):
        import_legacy(source, tmp_path / "out")
    assert time.perf_counter() - started < 10
    assert not (tmp_path / "out").exists()


def test_import_of_an_expanded_tensor_is_refused(tmp_path: Path) -> None:
    import torch

    source = tmp_path / "expanded.pt"
    torch.save({"w": torch.zeros(1).expand(2**36)}, source)  # 4 bytes stored, 256 GiB logical
    assert source.stat().st_size < 10_000
    out = _run_limited(
        f"""
        import torch  # noqa: F401
        from ckptvault.legacy import import_legacy
        try:
            import_legacy({str(source)!r}, {str(tmp_path / "out")!r})
        except BaseException as exc:
            print(type(exc).__name__)
        else:
            print("imported")
        """,
        address_space=6 << 30,
    )
    assert out == "ResourceLimitError"
