"""Data versions: what changes a fingerprint, what does not, and what the cache may and may not skip."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from ckptvault.training import fingerprint as fp_mod
from ckptvault.training.fingerprint import cache_path, fingerprint


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache: never the user's ~/.cache."""
    where = tmp_path / "cache"
    monkeypatch.setenv("CKPTVAULT_CACHE_DIR", str(where))
    return where


@pytest.fixture
def trust_fresh_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files written by a test are seconds old, inside the racy window; let the cache keep them.

    (ctime cannot be set back, so ageing the files is impossible; the racy guard has its own test.)
    """
    monkeypatch.setattr(fp_mod, "RACY_WINDOW_NS", 0)


@pytest.fixture
def hash_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths whose contents were read: ``_hash_file`` is the only function that opens a file's bytes."""
    calls: list[str] = []
    real = fp_mod._hash_file

    def counting(path: str, algorithm: str, size_hint: int) -> tuple[str, int]:
        calls.append(path)
        return real(path, algorithm, size_hint)

    monkeypatch.setattr(fp_mod, "_hash_file", counting)
    return calls


def make_tree(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha")
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)) * 10)
    (root / "sub" / "deeper" / "c.txt").write_bytes(b"")
    return root


def test_unchanged_data_is_not_read_again(tmp_path: Path, trust_fresh_files: None, hash_calls: list[str]):
    tree = make_tree(tmp_path / "data")
    first = fingerprint(tree)
    assert first.startswith("blake3:") and len(first) == len("blake3:") + 64
    assert len(hash_calls) == 3
    hash_calls.clear()
    assert fingerprint(tree) == first
    assert hash_calls == []  # every digest came from the cache
    assert fingerprint(tree, cache=False) == first
    assert len(hash_calls) == 3  # cache=False reads every byte


def test_edit_with_size_and_mtime_restored_is_detected_through_ctime(tmp_path: Path, trust_fresh_files: None):
    tree = make_tree(tmp_path / "data")
    target = tree / "a.txt"
    before = fingerprint(tree)
    st = target.stat()
    target.write_bytes(b"ALPHA")  # same size
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime forced back
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    after = fingerprint(tree)
    assert after != before
    assert after == fingerprint(tree, cache=False)


def test_documented_limitation_identical_stat_trusts_the_cache(tmp_path: Path, trust_fresh_files: None):
    """An edit that keeps size, mtime, ctime, inode and device is invisible with cache=True.

    No user-level call can restore ctime, so we stand in for such an edit by planting a wrong
    digest under the file's exact key; cache=False is the way out and gives the truth.
    """
    tree = make_tree(tmp_path / "data")
    truth = fingerprint(tree)
    cache_file = cache_path()
    doc = json.loads(cache_file.read_text())
    name = f"blake3:{os.path.abspath(tree / 'a.txt')}"
    doc["entries"][name][5] = "0" * 64
    cache_file.write_text(json.dumps(doc))
    assert fingerprint(tree) != truth
    assert fingerprint(tree, cache=False) == truth


def test_freshly_written_files_are_not_cached(tmp_path: Path, hash_calls: list[str]):
    """The racy-git guard: a second same-size write inside one timestamp tick must not be missed."""
    tree = make_tree(tmp_path / "data")
    fingerprint(tree)
    hash_calls.clear()
    fingerprint(tree)
    assert len(hash_calls) == 3


def test_renames_and_moves_change_it(tmp_path: Path):
    tree = make_tree(tmp_path / "data")
    before = fingerprint(tree)
    (tree / "a.txt").rename(tree / "a2.txt")
    renamed = fingerprint(tree)
    assert renamed != before
    (tree / "a2.txt").rename(tree / "sub" / "a2.txt")
    moved = fingerprint(tree)
    assert moved not in (before, renamed)


def test_content_change_changes_it(tmp_path: Path):
    tree = make_tree(tmp_path / "data")
    before = fingerprint(tree)
    (tree / "sub" / "deeper" / "c.txt").write_bytes(b"x")
    assert fingerprint(tree) != before


def test_same_tree_elsewhere_gives_the_same_fingerprint(tmp_path: Path):
    tree = make_tree(tmp_path / "one" / "data")
    copy = tmp_path / "two" / "elsewhere" / "other-name"
    shutil.copytree(tree, copy)
    assert fingerprint(tree) == fingerprint(copy)


def test_single_file_is_not_the_directory_holding_it(tmp_path: Path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.bin").write_bytes(b"payload")
    (tmp_path / "y.bin").write_bytes(b"payload")
    single = fingerprint(tmp_path / "d" / "x.bin")
    assert single != fingerprint(tmp_path / "d")
    assert single == fingerprint(tmp_path / "y.bin")  # a file root's own name is not part of it
    assert single == fingerprint(str(tmp_path / "y.bin"))


def test_empty_directories(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "with_empty_sub" / "sub").mkdir(parents=True)
    (tmp_path / "empty_file").write_bytes(b"")
    empty = fingerprint(tmp_path / "empty")
    assert empty == fingerprint(tmp_path / "empty", cache=False)
    assert empty != fingerprint(tmp_path / "with_empty_sub")  # empty directories are part of the data
    assert empty != fingerprint(tmp_path / "empty_file")


def test_several_paths_in_order(tmp_path: Path):
    a = make_tree(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "v.txt").write_bytes(b"val")
    both = fingerprint([a, tmp_path / "b"])
    assert both == fingerprint((str(a), str(tmp_path / "b")))
    assert both != fingerprint([tmp_path / "b", a])
    assert both not in (fingerprint(a), fingerprint(tmp_path / "b"))


def test_symlinks_are_hashed_by_target_text_never_followed(tmp_path: Path):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"one")
    tree = make_tree(tmp_path / "data")
    (tree / "link").symlink_to(outside)
    (tree / "loop").symlink_to(tree)  # a cycle must not hang the walk
    before = fingerprint(tree)
    outside.write_bytes(b"two, longer")
    assert fingerprint(tree) == before  # the target's content is not part of it
    (tree / "link").unlink()
    (tree / "link").symlink_to(tmp_path / "elsewhere.txt")  # dangling is fine
    assert fingerprint(tree) != before


def test_a_named_root_symlink_is_followed(tmp_path: Path):
    tree = make_tree(tmp_path / "data")
    (tmp_path / "current").symlink_to(tree)
    assert fingerprint(tmp_path / "current") == fingerprint(tree)


def test_fifo_is_recorded_without_being_opened(tmp_path: Path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no fifos on this platform")
    tree = make_tree(tmp_path / "data")
    without = fingerprint(tree)
    os.mkfifo(tree / "pipe")
    done: list[str] = []
    worker = threading.Thread(target=lambda: done.append(fingerprint(tree)), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert done and done[0] != without


def test_missing_path_names_it(tmp_path: Path):
    tree = make_tree(tmp_path / "data")
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope") as info:
        fingerprint([tree, missing])
    assert info.value.filename == str(missing)
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="dangling"):
        fingerprint(tmp_path / "dangling")


def test_bad_arguments(tmp_path: Path):
    with pytest.raises(ValueError, match="algorithm"):
        fingerprint(tmp_path, algorithm="md5")
    with pytest.raises(ValueError, match="at least one"):
        fingerprint([])


def test_sha256(tmp_path: Path):
    tree = make_tree(tmp_path / "data")
    digest = fingerprint(tree, algorithm="sha256")
    assert digest.startswith("sha256:") and len(digest) == len("sha256:") + 64
    assert digest == fingerprint(tree, algorithm="sha256", cache=False)


def test_corrupt_cache_is_ignored_and_rebuilt(tmp_path: Path, trust_fresh_files: None, hash_calls: list[str]):
    tree = make_tree(tmp_path / "data")
    truth = fingerprint(tree, cache=False)
    for garbage in (b"{not json", b"\xff\xfe", b"[]", b'{"version": 1, "entries": {"x": [1, 2]}}'):
        cache_path().parent.mkdir(parents=True, exist_ok=True)
        cache_path().write_bytes(garbage)
        assert fingerprint(tree) == truth
        json.loads(cache_path().read_text())  # rewritten as a valid cache
    hash_calls.clear()
    assert fingerprint(tree) == truth
    assert hash_calls == []


def test_cache_is_bounded_and_written_atomically(
    tmp_path: Path, trust_fresh_files: None, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(fp_mod, "MAX_CACHE_ENTRIES", 2)
    tree = make_tree(tmp_path / "data")
    fingerprint(tree)
    doc = json.loads(cache_path().read_text())
    assert doc["version"] == 1 and len(doc["entries"]) == 2
    assert [p.name for p in cache_path().parent.iterdir()] == ["fingerprints.json"]  # no temp files left


def test_cache_false_neither_reads_nor_writes_the_cache(tmp_path: Path):
    tree = make_tree(tmp_path / "data")
    fingerprint(tree, cache=False)
    assert not cache_path().exists()


def test_unwritable_cache_does_not_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    monkeypatch.setenv("CKPTVAULT_CACHE_DIR", str(blocker / "below-a-file"))
    tree = make_tree(tmp_path / "data")
    assert fingerprint(tree) == fingerprint(tree, cache=False)


def test_file_changing_while_read_is_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    tree = make_tree(tmp_path / "data")
    target = tree / "a.txt"
    real = fp_mod._hash_file
    calls: list[str] = []

    def edit_during_first_read(path: str, algorithm: str, size_hint: int) -> tuple[str, int]:
        result = real(path, algorithm, size_hint)
        if path.endswith("a.txt") and not calls:
            calls.append(path)
            target.write_bytes(b"alpha, grown while being read")
        return result

    monkeypatch.setattr(fp_mod, "_hash_file", edit_during_first_read)
    got = fingerprint(tree)
    monkeypatch.setattr(fp_mod, "_hash_file", real)
    assert calls and got == fingerprint(tree, cache=False)


def test_record_format_is_the_documented_one(tmp_path: Path):
    """Data versions land in run.json and are compared across library versions: the format must not drift.

    Rebuilt here from the module docstring's rules with blake3 directly.
    """
    import blake3

    tree = make_tree(tmp_path / "data")
    (tree / "link").symlink_to("a.txt")

    def h(data: bytes) -> str:
        return blake3.blake3(data).hexdigest()

    records = [
        ["root", 0, "dir"],
        ["file", "a.txt", 5, h(b"alpha")],
        ["link", "link", "a.txt"],
        ["dir", "sub"],
        ["file", "sub/b.bin", 2560, h(bytes(range(256)) * 10)],
        ["dir", "sub/deeper"],
        ["file", "sub/deeper/c.txt", 0, h(b"")],
    ]
    text = "ckptvault-fingerprint-v1\n" + "".join(
        json.dumps(r, separators=(",", ":")) + "\n" for r in records
    )
    assert fingerprint(tree, cache=False) == "blake3:" + h(text.encode())
    assert fingerprint(tree, cache=False) == PINNED


PINNED = "blake3:f7246555fa66621625a50314d2fdcd8d06099ebad8d9563ed0cda033253cefcd"
