"""L1: one standalone file written whole or not at all (a temporary file beside it, fsynced, renamed
into place), for outputs that are not checkpoints, such as an exported safetensors file.

It lives in ``storage/`` because it is a file operation: nothing above this layer calls ``os``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import StorageError
from .safeopen import fsync_dir


@contextlib.contextmanager
def atomic_output(target: Path, action: str = "write") -> Iterator[BinaryIO]:
    """Yields a binary handle; on a clean exit its bytes are fsynced and renamed onto ``target``.

    On any failure the temporary file is removed, so a crash or an error never leaves a partial
    ``target``; an :class:`OSError` (from the caller's writes too) becomes a :class:`StorageError`
    saying ``cannot <action> <target>``.
    """
    temp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
    try:
        with open(temp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
        fsync_dir(target.parent)  # the rename itself is durable only once its directory is
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise StorageError(exc.errno or 0, f"cannot {action} {target}: {exc}") from exc
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
