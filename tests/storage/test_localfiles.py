"""The local-file helpers of storage/ (issue 14): one atomic writer, one directory publish, the
walk that data fingerprints use, and descriptor helpers; each leaves no partial output behind."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from ckptvault.errors import StorageError
from ckptvault.storage.atomic_file import atomic_output, atomic_path, write_atomically
from ckptvault.storage.localfiles import (
    Refusal,
    durable_output,
    file_size,
    publish_directory,
    read_blocks,
    scratch_directory,
    walk_sorted,
)
from ckptvault.storage.localfiles_fd import close_fd, read_some, write_all


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def test_atomic_output_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    write_atomically(target, b"old")
    with pytest.raises(RuntimeError), atomic_output(target) as handle:
        handle.write(b"half")
        raise RuntimeError("the writer failed")
    assert target.read_bytes() == b"old"
    with atomic_output(target, durable=False) as handle:
        handle.write(b"new")
    assert target.read_bytes() == b"new" and leftovers(tmp_path) == []
    write_atomically(target, b"mine", private=True)
    assert target.stat().st_mode & 0o777 == 0o600


def test_atomic_path_for_path_writers_and_os_errors_named(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    with atomic_path(target, "export to") as temp:
        temp.write_bytes(b"data")
    assert file_size(target) == 4
    with (
        pytest.raises(StorageError, match=r"cannot export to .*missing"),
        atomic_path(tmp_path / "missing" / "x", "export to") as temp,
    ):
        temp.write_bytes(b"never")
    assert leftovers(tmp_path) == []


def refuse(why: Refusal) -> ValueError:
    return ValueError(why)


def publish(target: Path, *, overwrite: bool, marker: str = "config.json") -> None:
    with publish_directory(target, overwrite=overwrite, marker=marker, refuse=refuse) as temp:
        with durable_output(temp / marker) as handle:
            handle.write(b"{}")
        (temp / "weights").write_bytes(b"w")


def test_publish_directory_new_and_replacing_an_earlier_output(tmp_path: Path) -> None:
    target = tmp_path / "hf"
    publish(target, overwrite=False)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "weights"]
    with pytest.raises(ValueError, match="exists"):
        publish(target, overwrite=False)
    (target / "stale").write_bytes(b"")
    publish(target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "weights"]
    assert leftovers(tmp_path) == []


def test_publish_directory_never_replaces_foreign_data(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="foreign"):
        publish(foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    link = tmp_path / "link"
    link.symlink_to(foreign)
    with pytest.raises(ValueError, match="foreign"):
        publish(link, overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    publish(empty, overwrite=False)  # an empty directory is simply taken
    assert (empty / "config.json").exists() and leftovers(tmp_path) == []


def test_publish_directory_failure_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(KeyError), publish_directory(target, overwrite=False, marker="m", refuse=refuse):
        raise KeyError("failed half way")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_scratch_directory_is_removed(tmp_path: Path) -> None:
    with scratch_directory(tmp_path / "model.onnx") as work:
        (work / "graph").write_bytes(b"g")
        assert work.parent == tmp_path
    assert list(tmp_path.iterdir()) == []


def test_walk_sorted_depth_first_links_not_followed(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_bytes(b"1")
    (tmp_path / "a").write_bytes(b"22")
    (tmp_path / "c").symlink_to(tmp_path / "b")
    walked = [(rel, st.st_size if rel != "c" else None) for rel, _full, st in walk_sorted(str(tmp_path))]
    assert [rel for rel, _ in walked] == ["a", "b", "b/x", "c"]
    assert walked[0] == ("a", 2)


def test_read_blocks_streams_the_file(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(bytes(range(256)) * 10)
    buffer = memoryview(bytearray(1000))
    assert b"".join(bytes(b) for b in read_blocks(str(path), buffer)) == bytes(range(256)) * 10


def test_descriptor_helpers_on_a_pipe() -> None:
    """More than a pipe holds (64 KiB on Linux): write_all loops over short writes."""
    read_end, write_end = os.pipe()

    def writer() -> None:
        write_all(write_end, b"x" * 300_000)
        close_fd(write_end)

    thread = threading.Thread(target=writer)
    thread.start()
    received = b""
    while chunk := read_some(read_end):
        received += chunk
    thread.join()
    close_fd(read_end)
    assert received == b"x" * 300_000
