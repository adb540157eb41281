"""One process on checkpoints that real ranks wrote sharded (the session's chain, worlds 1/2/4):
``ckptvault.load``/``verify``/``open`` and the CLI see whole tensors, as for any checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.distributed import rank_fns
from tests.distributed.conftest import Chain
from typer.testing import CliRunner

import ckptvault as cv
from ckptvault.cli.main import app

pytestmark = pytest.mark.distributed


def cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result.output


def test_the_sharded_files_are_per_rank_and_the_manifest_lists_pieces(chain: Chain) -> None:
    path = chain.path("L4")
    names = {p.name for p in path.iterdir()}
    assert {f"data-r{r:05d}-00000.safetensors" for r in range(4)} <= names
    sharded = json.loads((path / "manifest.json").read_text())["sharded"]
    assert len(sharded["tensors.rows37"]["shards"]) == 4  # 10+10+10+7 rows
    assert len(sharded["tensors.tiny3"]["shards"]) == 3  # 3 rows over 4 ranks: one holds nothing


def test_load_verify_and_open_give_whole_tensors(chain: Chain) -> None:
    path = chain.path("L4")
    want = rank_fns.whole_tensors(4)
    state = cv.load(path)
    for name, tensor in want.items():
        got = state["tensors"][name]
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
    assert state["optim"] == rank_fns.values(4)["optim"]  # tuples come back as tuples
    report = cv.verify(path)
    assert report.ok and report.problems == () and report.tensors_checked >= len(want)
    with cv.open(path) as view:  # lazy: only that tensor's pieces are read
        assert torch.equal(view["tensors"]["cols37"], want["cols37"])
        assert view["step"] == 1004


def test_cli_verify_show_ls_diff(chain: Chain) -> None:
    l2, l4, same = chain.path("L2"), chain.path("L4"), chain.path("L4same")
    assert "OK" in cli("verify", str(l2), str(l4), str(same))
    shown = json.loads(cli("show", "--json", str(l4)))
    shapes = {t["name"]: t["shape"] for t in shown["tensors"]}
    assert shapes["tensors.rows37"] == [37, 8] and shapes["tensors.scalar"] == []
    assert any(name.startswith("data-r00003-") for name in shown["files"])
    listed = {Path(r["path"]).name for r in json.loads(cli("ls", "--json", str(l4.parent)))}
    assert {"L1", "L2", "L4", "L4same", "F2", "F4"} <= listed
    # the same state saved at world 2 and at world 4: every tensor identical despite other pieces
    rows = json.loads(cli("diff", "--json", str(l2), str(same)))
    assert len(rows) == len(rank_fns.LAYOUTS) and {r["status"] for r in rows} == {"identical"}
    rows = json.loads(cli("diff", "--json", str(l2), str(l4)))
    assert {r["status"] for r in rows} == {"changed"}


def test_cli_export_gives_whole_tensors(chain: Chain, tmp_path: Path) -> None:
    out = tmp_path / "l4.safetensors"
    cli("export", str(chain.path("L4")), str(out))
    exported = load_file(str(out))
    for name, tensor in rank_fns.whole_tensors(4).items():
        assert torch.equal(exported[f"tensors.{name}"], tensor), name
    # an FSDP2 checkpoint's model tensors, whole, as a torch state dict
    full = chain.results[(2, "save_fsdp", "F2")]
    cli("export", "--format", "torch", str(chain.path("F2")), str(tmp_path / "f2.pt"))
    weights = torch.load(tmp_path / "f2.pt", weights_only=True)
    assert set(weights) == set(full["model"])
    assert all(torch.equal(weights[k], v) for k, v in full["model"].items())
    # hf needs a recorded architecture, which a DCP save of get_state_dict does not record
    refused = cli("export", "--format", "hf", str(chain.path("F2")), str(tmp_path / "hf"), code=1)
    assert "architecture" in refused and not (tmp_path / "hf").exists()
