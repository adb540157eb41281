"""Run provenance: run ids, config normalisation, and what capture_provenance records (git in a
throwaway repository made here, never this checkout's own state)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import enum
import json
import re
import subprocess
import sys
import time
import types
from pathlib import Path, PurePosixPath

import numpy as np
import pytest

from ckptvault.training import provenance as prov
from ckptvault.training.provenance import capture_provenance, new_run_id, normalize_config

RUN_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")


# --- run ids ---------------------------------------------------------------------------------------


def test_run_id_format_and_uniqueness():
    ids = {new_run_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(RUN_ID.match(i) for i in ids)
    now = datetime.datetime.now(datetime.timezone.utc)
    stamp = datetime.datetime.strptime(next(iter(ids))[:15], "%Y%m%dT%H%M%S").replace(
        tzinfo=datetime.timezone.utc
    )
    assert abs((now - stamp).total_seconds()) < 60


def test_run_ids_sort_by_time_to_the_second():
    """Within one second the random suffix orders ids arbitrarily; across seconds order is time order."""
    utc = datetime.timezone.utc
    instants = [
        datetime.datetime(2026, 11, 28, 5, 12, 0, tzinfo=utc),
        datetime.datetime(2026, 11, 28, 5, 12, 1, tzinfo=utc),
        datetime.datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=utc),
        datetime.datetime(2027, 1, 1, 0, 0, 0, tzinfo=utc),
        datetime.datetime(2030, 1, 1, 0, 0, 0, tzinfo=utc),
    ]
    for _ in range(200):  # whatever the random suffixes
        ids = [prov._run_id_at(t) for t in instants]
        assert sorted(ids) == ids
    assert prov._run_id_at(instants[0]).startswith("20261128T051200Z-")


# --- normalize_config ------------------------------------------------------------------------------


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


@dataclasses.dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclasses.dataclass
class Config:
    name: str = "exp"
    optim: Optim = dataclasses.field(default_factory=Optim)
    out: Path = Path("runs/exp1")
    color: Color = Color.RED


class Opaque:
    def __repr__(self) -> str:
        return "<Opaque thing>"


def test_none_stays_none():
    assert normalize_config(None) is None


def test_dict_nested_tuples_paths_enums_and_keys():
    got = normalize_config(
        {
            "lr": 0.1,
            1: "int key",
            Color.RED: "enum key",
            "nested": {"t": (1, (2, 3)), "p": PurePosixPath("/data/x"), "e": Color.RED, "lvl": Level.HIGH},
            "flags": [True, None, "s"],
            "set": {3, 1, 2},
        }
    )
    assert got == {
        "lr": 0.1,
        "1": "int key",
        "red": "enum key",
        "nested": {"t": [1, [2, 3]], "p": "/data/x", "e": "red", "lvl": 3},
        "flags": [True, None, "s"],
        "set": [1, 2, 3],
    }
    assert type(got["nested"]["lvl"]) is int  # type: ignore[index]
    json.dumps(got, allow_nan=False)


def test_dataclass_recursively():
    assert normalize_config(Config()) == {
        "name": "exp",
        "optim": {"lr": 1e-3, "betas": [0.9, 0.999]},
        "out": "runs/exp1",
        "color": "red",
    }


def test_namespace():
    ns = argparse.Namespace(lr=0.5, data=Path("d"), sub=argparse.Namespace(k=(1,)))
    assert normalize_config(ns) == {"lr": 0.5, "data": "d", "sub": {"k": [1]}}


def test_numpy_scalars_and_arrays():
    got = normalize_config(
        {
            "f": np.float32(0.5),
            "i": np.int64(7),
            "b": np.bool_(True),
            "a": np.arange(3),
            "big": np.zeros(1000),
        }
    )
    assert got is not None
    assert got["f"] == 0.5 and type(got["f"]) is float
    assert got["i"] == 7 and type(got["i"]) is int
    assert got["b"] is True
    assert got["a"] == [0, 1, 2]
    assert isinstance(got["big"], str)  # a large array is not worth a config entry: its repr


def test_torch_scalars_when_torch_is_there():
    torch = pytest.importorskip("torch")
    got = normalize_config({"t": torch.tensor(2.5), "v": torch.tensor([1, 2]), "d": torch.float16})
    assert got == {"t": 2.5, "v": [1, 2], "d": "torch.float16"}


def test_non_finite_floats_unknown_objects_and_cycles():
    loop: dict[str, object] = {"name": "x"}
    loop["self"] = loop
    got = normalize_config({"nan": float("nan"), "inf": float("-inf"), "obj": Opaque(), "loop": loop})
    assert got is not None
    assert got["nan"] == "nan" and got["inf"] == "-inf"
    assert got["obj"] == "<Opaque thing>"
    assert got["loop"] == {"name": "x", "self": "<cycle: dict>"}
    json.dumps(got, allow_nan=False)
    assert normalize_config(Config) == {"value": repr(Config)}  # a class, not an instance
    assert normalize_config([1, (2,)]) == {"value": [1, [2]]}


def test_omegaconf_detected_by_module_name(monkeypatch: pytest.MonkeyPatch):
    """A stand-in omegaconf: the real one is optional. Resolution is requested; failures fall back."""
    calls: list[bool] = []

    class FakeOmegaConf:
        @staticmethod
        def to_container(cfg: object, resolve: bool) -> object:
            calls.append(resolve)
            if resolve and getattr(cfg, "broken", False):
                raise ValueError("missing interpolation")
            return {"model": {"width": 128, "path": Path("p")}, "resolved": resolve}

    fake = types.ModuleType("omegaconf")
    fake.OmegaConf = FakeOmegaConf  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "omegaconf", fake)
    DictConfig = type("DictConfig", (), {"__module__": "omegaconf.dictconfig"})

    assert normalize_config(DictConfig()) == {"model": {"width": 128, "path": "p"}, "resolved": True}
    broken = DictConfig()
    broken.broken = True
    assert normalize_config(broken) == {"model": {"width": 128, "path": "p"}, "resolved": False}
    assert calls == [True, True, False]


def test_nothing_heavy_is_imported():
    """torch and omegaconf stay out of a process that did not import them (checked in a fresh one)."""
    code = (
        "import sys, json\n"
        "from ckptvault.training.provenance import capture_provenance\n"
        "from ckptvault.training.fingerprint import fingerprint\n"
        "doc = capture_provenance(config={'a': 1})\n"
        "json.dumps(doc, allow_nan=False)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'omegaconf' not in sys.modules, 'omegaconf imported'\n"
        "assert 'torch' not in doc['system']\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# --- capture_provenance ----------------------------------------------------------------------------


@pytest.fixture
def isolated_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No user or system git config, no inherited GIT_DIR, and no repository above tmp_path."""
    for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_CONFIG", "GIT_OBJECT_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(home / "gitconfig"))
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    for who in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{who}_NAME", "Test")
        monkeypatch.setenv(f"GIT_{who}_EMAIL", "test@example.invalid")
    return tmp_path


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(isolated_git: Path) -> Path:
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("git is not installed")
    where = isolated_git / "repo"
    where.mkdir()
    git(where, "init", "-q", "-b", "trunk")
    (where / "train.py").write_text("print('v1')\n")
    git(where, "add", "train.py")
    git(where, "commit", "-q", "-m", "first")
    return where


def test_clean_repository(repo: Path):
    doc = capture_provenance(cwd=str(repo))
    commit = git(repo, "rev-parse", "HEAD")
    assert doc["git"] == {"commit": commit, "branch": "trunk", "dirty": False, "diff_digest": None}
    assert doc["cwd"] == str(repo)


def test_dirty_repository_has_a_diff_digest(repo: Path):
    (repo / "train.py").write_text("print('v2')\n")
    first = capture_provenance(cwd=str(repo))["git"]
    assert isinstance(first, dict)
    assert first["dirty"] is True
    assert isinstance(first["diff_digest"], str) and re.fullmatch(
        r"blake3:[0-9a-f]{64}", first["diff_digest"]
    )
    assert capture_provenance(cwd=str(repo))["git"] == first  # the same edit, the same digest
    (repo / "train.py").write_text("print('v3')\n")
    third = capture_provenance(cwd=str(repo))["git"]
    assert isinstance(third, dict) and third["diff_digest"] != first["diff_digest"]


def test_staged_changes_count_and_untracked_files_do_not(repo: Path):
    (repo / "outputs.log").write_text("untracked\n")
    git_doc = capture_provenance(cwd=str(repo))["git"]
    assert isinstance(git_doc, dict) and git_doc["dirty"] is False
    (repo / "new.py").write_text("x = 1\n")
    git(repo, "add", "new.py")
    git_doc = capture_provenance(cwd=str(repo))["git"]
    assert isinstance(git_doc, dict) and git_doc["dirty"] is True and git_doc["diff_digest"]


def test_detached_head_has_no_branch(repo: Path):
    git(repo, "checkout", "-q", "--detach")
    git_doc = capture_provenance(cwd=str(repo))["git"]
    assert isinstance(git_doc, dict) and git_doc["branch"] is None and git_doc["dirty"] is False


def test_outside_a_repository(isolated_git: Path):
    plain = isolated_git / "plain"
    plain.mkdir()
    assert capture_provenance(cwd=str(plain))["git"] is None


def test_repository_without_commits(isolated_git: Path):
    empty = isolated_git / "empty"
    empty.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=empty, check=True)
    assert capture_provenance(cwd=str(empty))["git"] is None


def test_without_git_installed(repo: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    nothing = tmp_path / "empty-path"
    nothing.mkdir()
    monkeypatch.setenv("PATH", str(nothing))
    assert capture_provenance(cwd=str(repo))["git"] is None


def test_everything_else_recorded(isolated_git: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(isolated_git)
    doc = capture_provenance(config=Config(), data_version="blake3:" + "ab" * 32)
    assert RUN_ID.match(str(doc["run_id"]))
    created = datetime.datetime.fromisoformat(str(doc["created_at"]).replace("Z", "+00:00"))
    assert created.tzinfo is not None and str(doc["run_id"])[:15] == created.strftime("%Y%m%dT%H%M%S")
    assert doc["command"] == sys.argv and doc["executable"] == sys.executable
    assert doc["cwd"] == str(isolated_git)
    assert doc["config"] == normalize_config(Config())
    assert doc["data_version"] == "blake3:" + "ab" * 32
    system = doc["system"]
    assert isinstance(system, dict)
    assert {"hostname", "os", "python", "numpy"} <= system.keys()
    packages = doc["packages"]
    assert isinstance(packages, dict)
    assert packages["numpy"] == np.__version__
    assert list(packages) == sorted(packages)
    assert all(name == name.lower() and "_" not in name for name in packages)
    json.dumps(doc, allow_nan=False)


def test_fast_enough_for_every_run(repo: Path):
    (repo / "train.py").write_text("print('dirty')\n")
    capture_provenance(cwd=str(repo))  # warm the OS file cache
    start = time.perf_counter()
    capture_provenance(cwd=str(repo))
    assert time.perf_counter() - start < 1.0  # ~0.1 s measured; generous for a loaded CI box
