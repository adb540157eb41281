"""DCP's own format in and out: ``ckptvault.distributed.import_dcp`` / ``export_dcp`` and the
``import-dcp`` / ``export-dcp`` commands.

Hostile ``.metadata`` files are hand-assembled pickle opcodes (or DCP's own writer told to lie),
never produced by unpickling anything here: each payload would create a marker file if it ran,
and every test asserts that file does not exist.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from tests.distributed import interop_ranks
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

import ckptvault
import ckptvault.distributed as cvd
from ckptvault.distributed.interop_metadata import MetadataUnpickler
from ckptvault.testing.ranks import run_ranks

TYPED = (ckptvault.CorruptCheckpointError, ckptvault.UnsafeLegacyFileError)


def _state() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(5)
    return {
        "model": {
            "w": torch.randn(6, 4, generator=gen),
            "b16": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
            "ids": torch.randint(-(2**40), 2**40, (7,), generator=gen),
            "deep": {"scale": torch.randn((), generator=gen)},
        },
        "step": 1234,
        "optim": {
            "state": {"w": {"exp_avg": torch.randn(6, 4, generator=gen)}},
            "param_groups": [{"lr": 0.01, "betas": (0.9, 0.95), "params": ["w", "b16"], "name": None}],
        },
    }


def _dcp_save(state: dict[str, Any], directory: Path, writer: Any = None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "torch.distributed is disabled": we know
        dcp.save(state, storage_writer=writer or FileSystemWriter(directory), no_dist=True)


def _equal(a: Any, b: Any, path: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b), path
        return
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: {set(a) ^ set(b)}"
        for k in a:
            _equal(a[k], b[k], f"{path}.{k}")
        return
    if isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _equal(x, y, f"{path}[{i}]")
        return
    assert a == b and type(a) is type(b), f"{path}: {a!r} != {b!r}"


def _empty_like(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    if isinstance(state, dict):
        return {k: _empty_like(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_empty_like(v) for v in state]
    return None if not isinstance(state, int | float | str | tuple) else state


class Opaque:
    """A value only a full unpickle can rebuild (DCP pickles it by reference to this module)."""

    def __init__(self) -> None:
        self.x = 1


# -- importing ------------------------------------------------------------------------------------
def test_single_process_dcp_imports_bitwise(tmp_path: Path) -> None:
    state = _state()
    src, dst = tmp_path / "dcp", tmp_path / "ckpt"
    _dcp_save(state, src)
    manifest = cvd.import_dcp(src, dst)
    assert manifest.checkpoint_id
    _equal(state, ckptvault.load(dst))
    assert ckptvault.verify(dst).ok
    fresh = _empty_like(state)
    fresh["step"] = 0
    fresh["optim"]["param_groups"] = [{"lr": 0.0, "betas": (0.0, 0.0), "params": [], "name": "x"}]
    cvd.load(fresh, dst)
    _equal(state, fresh)
    with pytest.raises(ckptvault.CheckpointExistsError):
        cvd.import_dcp(src, dst)
    cvd.import_dcp(src, dst, overwrite=True)


def test_small_groups_still_one_checkpoint(tmp_path: Path) -> None:
    """Groups of one chunk each: several data files, one manifest, same content."""
    state = _state()
    _dcp_save(state, tmp_path / "dcp")
    cvd.import_dcp(tmp_path / "dcp", tmp_path / "ckpt", group_bytes=1)
    _equal(state, ckptvault.load(tmp_path / "ckpt"))


@pytest.fixture(scope="module")
def two_rank_dcp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("dcp2") / "dcp"
    run_ranks(interop_ranks.save_sharded, 2, str(directory), 3)
    return directory


def test_multi_rank_dcp_imports_sharded(two_rank_dcp: Path, tmp_path: Path) -> None:
    dst = tmp_path / "ckpt"
    manifest = cvd.import_dcp(two_rank_dcp, dst)
    assert {"model.rows", "model.bf16", "model.ids"} <= set(manifest.sharded)
    assert "model.rep" not in manifest.sharded  # replicated: DCP stored it once, whole
    whole = interop_ranks.whole(3)
    loaded = ckptvault.load(dst)
    _equal({"model": whole, "step": 43}, loaded)
    assert ckptvault.verify(dst).ok
    fresh = {"model": {k: torch.zeros_like(v) for k, v in whole.items()}, "step": 0}
    cvd.load(fresh, dst)
    _equal({"model": whole, "step": 43}, fresh)


# -- exporting ------------------------------------------------------------------------------------
def test_export_then_dcp_load(tmp_path: Path) -> None:
    state = _state()
    ckptvault.save(tmp_path / "ckpt", state)
    out = cvd.export_dcp(tmp_path / "ckpt", tmp_path / "dcp")
    assert (out / ".metadata").is_file()
    target = _empty_like(state)
    dcp.load(target, storage_reader=FileSystemReader(out), no_dist=True)
    _equal(state["model"], target["model"])
    _equal(state["optim"]["state"], target["optim"]["state"])
    assert target["step"] == 1234
    with pytest.raises(ckptvault.CheckpointExistsError):
        cvd.export_dcp(tmp_path / "ckpt", out)
    cvd.export_dcp(tmp_path / "ckpt", out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if "dcp-export" in p.name]  # no staging left


def test_export_of_a_sharded_checkpoint(two_rank_dcp: Path, tmp_path: Path) -> None:
    cvd.import_dcp(two_rank_dcp, tmp_path / "ckpt")
    out = cvd.export_dcp(tmp_path / "ckpt", tmp_path / "dcp")
    whole = interop_ranks.whole(3)
    target = {"model": {k: torch.zeros_like(v) for k, v in whole.items()}, "step": 0}
    dcp.load(target, storage_reader=FileSystemReader(out), no_dist=True)
    _equal({"model": whole, "step": 43}, target)


# -- hostile metadata -----------------------------------------------------------------------------
def _u(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _short(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE (for STACK_GLOBAL)


def _payloads(marker: Path) -> dict[str, bytes]:
    """Pickles that would create ``marker`` if anything ran them."""
    m = str(marker)
    meta = b"ctorch.distributed.checkpoint.metadata\nMetadata\n)\x81}("
    return {
        "os_system": b"\x80\x02cos\nsystem\n(" + _u(f"touch {m}") + b"tR.",
        "builtins_eval": b"\x80\x02cbuiltins\neval\n(" + _u(f"open({m!r}, 'w')") + b"tR.",
        "subprocess_popen": b"\x80\x02csubprocess\nPopen\n(](" + _u("touch") + _u(m) + b"etR.",
        # what pickle.dumps writes for an object whose __reduce__ returns (os.system, (cmd,)):
        "reduce_stack_global": b"\x80\x04"
        + _short("posix")
        + _short("system")
        + b"\x93"
        + _u(f"touch {m}")
        + b"\x85R.",
        # the same call hidden inside an otherwise allowed Metadata's state
        "inside_metadata": b"\x80\x02"
        + meta
        + _u("state_dict_metadata")
        + b"cos\nsystem\n("
        + _u(f"touch {m}")
        + b"tRub.",
        "torch_load_global": b"\x80\x02ctorch\nload\n(" + _u(m) + b"tR.",
    }


@pytest.mark.parametrize("name", sorted(_payloads(Path("x"))))
def test_hostile_metadata_never_runs(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    src = tmp_path / "dcp"
    src.mkdir()
    (src / ".metadata").write_bytes(_payloads(marker)[name])
    with pytest.raises(TYPED) as info:
        cvd.import_dcp(src, tmp_path / "ckpt")
    assert isinstance(info.value, ckptvault.UnsafeLegacyFileError), info.value
    assert any(word in str(info.value) for word in ("system", "eval", "Popen", "load")), info.value
    assert not marker.exists(), "the payload ran"
    assert not (tmp_path / "ckpt").exists()


def test_build_cannot_reach_real_classes(tmp_path: Path) -> None:
    """pickle's BUILD sets attributes on whatever is on its stack, a class or function pushed by
    GLOBAL included: the unpickler hands out fresh stand-ins, so torch's own objects stay intact."""
    import torch.serialization
    from torch.distributed.checkpoint.metadata import Metadata

    poison_cache = (
        b"\x80\x02ctorch.serialization\n_get_layout\nN}"
        + _u("cache")
        + b"}"
        + _u("torch.strided")
        + b"ctorch\nfloat32\nss\x86b."
    )
    poison_class = b"\x80\x02ctorch.distributed.checkpoint.metadata\nMetadata\nN}" + _u("__eq__") + _u("x")
    poison_class += b"s\x86b."
    src = tmp_path / "dcp"
    src.mkdir()
    for data in (poison_cache, poison_class):
        (src / ".metadata").write_bytes(data)
        with pytest.raises(ckptvault.CorruptCheckpointError):
            cvd.import_dcp(src, tmp_path / "ckpt")
    assert torch.serialization._get_layout.cache.get("torch.strided", torch.strided) is torch.strided
    assert Metadata.__eq__ != "x"


def test_allow_list_is_exact() -> None:
    u = MetadataUnpickler(b"", "x")
    assert u.find_class("torch", "float32") is torch.float32
    assert u.find_class("torch", "Size") is torch.Size
    for module, name in [
        ("torch", "load"),
        ("torch", "tensor"),
        ("builtins", "set"),
        ("torch.serialization", "load"),
        ("torch.distributed.checkpoint.metadata", "torch"),
        ("torch.distributed.checkpoint.filesystem", "FileSystemReader"),
        ("pathlib", "Path.write_text"),
    ]:
        with pytest.raises(ckptvault.UnsafeLegacyFileError, match=name.split(".")[-1]):
            u.find_class(module, name)
    # allowed DCP classes are fresh stand-ins: a file cannot reach the real ones
    from torch.distributed.checkpoint.metadata import Metadata

    assert u.find_class("torch.distributed.checkpoint.metadata", "Metadata") is not Metadata


def test_truncated_and_garbage_metadata(tmp_path: Path) -> None:
    src = tmp_path / "dcp"
    _dcp_save(_state(), src)
    whole = (src / ".metadata").read_bytes()
    variants = [whole[:n] for n in range(0, len(whole), max(1, len(whole) // 23))]
    variants += [b"garbage" * 50, bytes(range(256)) * 4, whole[:-1] + b"\x00"]
    for i, data in enumerate(variants):
        (src / ".metadata").write_bytes(data)
        with pytest.raises(TYPED):
            cvd.import_dcp(src, tmp_path / f"out{i}")
        assert not (tmp_path / f"out{i}").exists()


def test_garbage_and_truncated_distcp(tmp_path: Path) -> None:
    src = tmp_path / "dcp"
    _dcp_save(_state(), src)
    (data_file,) = src.glob("*.distcp")
    whole = data_file.read_bytes()
    for i, data in enumerate(
        [whole[: len(whole) // 2], b"\x5a" * len(whole), bytes(64) + whole[64:], whole[:-64] + bytes(64)]
    ):
        data_file.write_bytes(data)
        with pytest.raises(TYPED):
            cvd.import_dcp(src, tmp_path / f"out{i}")
        assert not (tmp_path / f"out{i}").exists()
    data_file.unlink()
    with pytest.raises(ckptvault.CorruptCheckpointError, match="missing"):
        cvd.import_dcp(src, tmp_path / "out")


class _LyingWriter(FileSystemWriter):
    """DCP's writer, told to record a chosen lie about one item's place before it pickles."""

    def __init__(self, path: Path, lie: str) -> None:
        super().__init__(path)
        self.lie = lie

    def finish(self, metadata: Any, results: list[list[Any]]) -> None:
        infos = [r.storage_data for rank in results for r in rank]
        first = infos[0]
        if self.lie == "past_end":
            first.offset += 10**6
        elif self.lie == "huge_length":
            first.length = 2**62
        elif self.lie == "traversal":
            first.relative_path = "../outside.distcp"
        elif self.lie == "overlap":
            infos[1].offset, infos[1].length = first.offset, first.length
        super().finish(metadata, results)


@pytest.mark.parametrize("lie", ["past_end", "huge_length", "traversal", "overlap"])
def test_storage_data_outside_its_file(tmp_path: Path, lie: str) -> None:
    src = tmp_path / "dcp"
    _dcp_save(_state(), src, _LyingWriter(src, lie))
    (tmp_path / "outside.distcp").write_bytes(b"x" * 100)
    with pytest.raises(ckptvault.CorruptCheckpointError):
        cvd.import_dcp(src, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_not_a_dcp_directory(tmp_path: Path) -> None:
    with pytest.raises(ckptvault.CheckpointNotFoundError):
        cvd.import_dcp(tmp_path, tmp_path / "ckpt")


def test_unsafe_value_item_names_its_key(tmp_path: Path) -> None:
    """A bytes item that weights_only refuses: UnsafeLegacyFileError naming the value's key."""
    src = tmp_path / "dcp"
    state = {"w": torch.ones(2), "extra": Opaque()}
    _dcp_save(state, src)
    with pytest.raises(ckptvault.UnsafeLegacyFileError, match="extra"):
        cvd.import_dcp(src, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


# -- the commands ---------------------------------------------------------------------------------
def test_cli_import_and_export(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ckptvault.cli.main import app

    state = _state()
    _dcp_save(state, tmp_path / "dcp")
    runner = CliRunner()
    done = runner.invoke(app, ["import-dcp", str(tmp_path / "dcp"), str(tmp_path / "ckpt")])
    assert done.exit_code == 0, done.output
    assert "imported" in done.output
    _equal(state, ckptvault.load(tmp_path / "ckpt"))
    done = runner.invoke(app, ["export-dcp", str(tmp_path / "ckpt"), str(tmp_path / "back")])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "back" / ".metadata").is_file()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ".metadata").write_bytes(b"\x80\x02cos\nsystem\n(" + _u("true") + b"tR.")
    done = runner.invoke(app, ["import-dcp", str(tmp_path / "bad"), str(tmp_path / "x")])
    assert done.exit_code == 1
    assert "UnsafeLegacyFileError" in done.output
