"""LocalStorage(root=...): below the directory the user named no link is followed, whatever the
spelling of the key (absolute or relative), for documents, logs, leases and listings alike."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckptvault.storage.local import LocalStorage
from ckptvault.storage.safeopen import UnsafeFileError


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, Path]:
    """A run whose hidden results directory is a link to a victim directory outside it."""
    run, victim = tmp_path / "run", tmp_path / "victim"
    run.mkdir()
    victim.mkdir()
    (victim / "secret.json").write_text("{}")
    os.symlink(victim, run / ".ckptvault-validation")
    return run, victim


def test_rooted_operations_refuse_a_linked_directory(planted: tuple[Path, Path]) -> None:
    run, victim = planted
    storage = LocalStorage(root=run)
    key = str(run / ".ckptvault-validation" / "secret.json")
    with pytest.raises(UnsafeFileError):
        storage.get(key, max_bytes=1024)
    with pytest.raises(UnsafeFileError):
        storage.put(key, b"overwritten")
    with pytest.raises(UnsafeFileError):
        storage.append(key, b"line\n")
    with pytest.raises(UnsafeFileError):
        storage.list(str(run / ".ckptvault-validation"))
    assert (victim / "secret.json").read_text() == "{}"
    assert sorted(p.name for p in victim.iterdir()) == ["secret.json"]


def test_relative_keys_are_rooted_too(planted: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    run, victim = planted
    monkeypatch.chdir(run.parent)
    storage = LocalStorage(root="run")
    with pytest.raises(UnsafeFileError):
        storage.put("run/.ckptvault-validation/x.json", b"{}")
    assert not (victim / "x.json").exists()


def test_the_root_itself_may_be_a_link(tmp_path: Path) -> None:
    """The user named it, links and all (a run directory on another disk)."""
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "run")
    storage = LocalStorage(root=tmp_path / "run")
    storage.put(str(tmp_path / "run" / "run.json"), b"{}")
    assert (real / "run.json").read_bytes() == b"{}"
    assert [e.name for e in storage.list(str(tmp_path / "run"))] == ["run.json"]


def test_unrooted_storage_opens_the_parent_as_named(planted: tuple[Path, Path]) -> None:
    """Without a root nothing is known to be the user's choice: the parent is used as named (the
    rooted form is what every run, registry and catalog uses)."""
    run, _victim = planted
    storage = LocalStorage()
    assert storage.get(str(run / ".ckptvault-validation" / "secret.json"), max_bytes=1024) is not None
