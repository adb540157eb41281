"""distributed.portable: a rank's error crosses DCP's collectives intact, or as a CheckpointError
naming it -- decided without pickling anything."""

from __future__ import annotations

import pickle

from ckptvault.distributed.portable import portable
from ckptvault.errors import CheckpointError, CorruptCheckpointError, UnsupportedStateError


def test_an_error_rebuilt_from_its_args_is_kept() -> None:
    error = ValueError("bad shard", 3)
    assert portable(error) is error
    error2 = CheckpointError("plain")
    assert portable(error2) is error2


def test_an_error_its_args_cannot_rebuild_becomes_a_checkpoint_error_naming_it() -> None:
    error = UnsupportedStateError("state/x", "cannot be saved safely")
    try:  # the failure portable() guards against: the receiving rank could not rebuild it
        pickle.loads(pickle.dumps(error))
        rebuilds = True
    except TypeError:
        rebuilds = False
    result = portable(error)
    if rebuilds:
        assert result is error
    else:
        assert type(result) is CheckpointError and "UnsupportedStateError" in str(result)
    corrupt = CorruptCheckpointError("digest mismatch", path="p")
    assert isinstance(portable(corrupt), CheckpointError)
