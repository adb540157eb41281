"""What ``load`` and ``open`` return is exactly the verified bytes (issue 13, class 4).

A verified load must not hand back memory that a later change to the file can alter (a private
file map still shows the file's page for every page not yet written) or that truncating the file
turns into SIGBUS. Each check runs in a child process so a SIGBUS fails the test, not pytest.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

import ckptvault as cv

N = 1 << 21  # 8 MiB of float32: many pages


def _child(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _save(tmp_path: Path) -> Path:
    ckpt = tmp_path / "c"
    cv.save(ckpt, {"w": np.arange(N, dtype=np.float32)})
    return ckpt


_TAMPER = """
    import os, numpy as np, ckptvault as cv
    from pathlib import Path
    ckpt = Path({ckpt!r})
    (data,) = ckpt.glob("data-*.safetensors")
    os.chmod(data, 0o644)
    {get}
    expected = np.arange({n}, dtype=np.float32)
    size = data.stat().st_size
    with open(data, "r+b") as handle:  # overwrite in place: same inode, same size
        handle.seek(size - 4 * {n})
        handle.write(b"\\xff" * (4 * {n}))
        handle.flush()
        os.fsync(handle.fileno())
    print("after-overwrite", bool(np.array_equal(np.asarray(w), expected)))
    os.truncate(data, 0)
    print("after-truncate", float(np.asarray(w, dtype=np.float64).sum()) == float(expected.sum()))
"""


def test_load_is_unchanged_by_overwrite_and_survives_truncation(tmp_path: Path) -> None:
    ckpt = _save(tmp_path)
    done = _child(_TAMPER.format(ckpt=str(ckpt), n=N, get='w = cv.load(ckpt)["w"]'))
    assert done.returncode == 0, f"rc={done.returncode} (SIGBUS is -7) {done.stderr[-1500:]}"
    assert done.stdout.split() == ["after-overwrite", "True", "after-truncate", "True"]


def test_lazy_open_is_unchanged_by_overwrite_and_survives_truncation(tmp_path: Path) -> None:
    ckpt = _save(tmp_path)
    get = 'view = cv.open(ckpt); w = view["w"]; view.close()'
    done = _child(_TAMPER.format(ckpt=str(ckpt), n=N, get=get))
    assert done.returncode == 0, f"rc={done.returncode} (SIGBUS is -7) {done.stderr[-1500:]}"
    assert done.stdout.split() == ["after-overwrite", "True", "after-truncate", "True"]
