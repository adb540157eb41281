"""Property tests: random nested states of every supported kind round-trip exactly."""

from __future__ import annotations

import math
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tests.helpers import assert_exact

import ckptvault as cv

TORCH_DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64,
    torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
    torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
]  # fmt: skip


@st.composite
def torch_tensors(draw: st.DrawFn) -> torch.Tensor:
    """Tensors of every dtype with random bits (NaN payloads included), 0-d, empty and strided."""
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    itemsize = torch.empty(0, dtype=dtype).element_size()
    numel = math.prod(shape)
    raw = draw(st.binary(min_size=numel * itemsize, max_size=numel * itemsize))
    base = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    tensor = base.view(dtype).reshape(shape) if numel else torch.empty(shape, dtype=dtype)
    if dtype == torch.bool:
        tensor = tensor.view(torch.uint8).remainder(2).view(torch.bool)
    if len(shape) >= 2 and draw(st.booleans()):
        tensor = tensor.transpose(0, 1)  # non-contiguous
    return tensor


numpy_arrays = hnp.arrays(
    dtype=st.one_of(
        hnp.integer_dtypes(endianness="="), hnp.unsigned_integer_dtypes(endianness="="),
        hnp.floating_dtypes(endianness="="), hnp.complex_number_dtypes(endianness="="), hnp.boolean_dtypes(),
        hnp.floating_dtypes(endianness=">"), hnp.datetime64_dtypes(), hnp.byte_string_dtypes(min_len=1),
    ),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # arbitrary size
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.builds(lambda b: struct.unpack(">d", b)[0], st.binary(min_size=8, max_size=8)),  # any bit pattern
    st.text(max_size=20),
    st.binary(max_size=20),
    st.complex_numbers(allow_nan=False),
    numpy_arrays.filter(lambda a: a.ndim == 0).map(lambda a: a[()]),
    st.sampled_from(
        [torch.float32, torch.bfloat16, torch.int64, torch.device("cpu"), torch.device("cuda", 1)]
    ),
    st.lists(st.integers(0, 5), max_size=4).map(torch.Size),
)
keys = st.one_of(st.text(max_size=8), st.integers(-5, 5))


def states() -> st.SearchStrategy[object]:
    leaves = st.one_of(scalars, torch_tensors(), numpy_arrays)
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.lists(children, max_size=4).map(tuple),
            st.dictionaries(keys, children, max_size=4),
            st.dictionaries(st.text(max_size=6), children, max_size=4).map(OrderedDict),
        ),
        max_leaves=12,
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=states())
def test_random_states_round_trip_exactly(tmp_path: Path, state: object) -> None:
    target = tmp_path / f"ck{abs(hash(repr(state))) % 10**9}"
    cv.save(target, {"state": state}, overwrite=True)
    assert_exact({"state": state}, cv.load(target))
    assert cv.verify(target).ok


@settings(max_examples=60, deadline=None)
@given(value=scalars)
def test_numpy_scalars_and_plain_values_keep_their_exact_type(value: object) -> None:
    # Encoding alone (no disk) must be exact too: the tree codec is pure.
    from ckptvault.engine.arrays import BlobCollector
    from ckptvault.format.strictjson import dumps, loads
    from ckptvault.format.tree import TreeDecoder, TreeEncoder

    tree = TreeEncoder(BlobCollector()).encode({"v": value})
    back = TreeDecoder(_NoTensors()).decode(loads(dumps(tree)))
    assert_exact({"v": value}, back)


class _NoTensors:
    def decode_leaf(self, node: dict[str, object], path: str) -> object:
        from ckptvault.engine.arrays import BlobReader

        return BlobReader(lambda name: np.zeros(0, np.uint8)).decode_leaf(node, path)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value", [float("nan"), -0.0, float("inf"), -float("inf"), 2**64, -(2**200), 1e-310, 5e-324]
)
def test_special_floats_and_big_ints(tmp_path: Path, value: float) -> None:
    cv.save(tmp_path / "c", {"x": value, "l": [value]})
    assert_exact({"x": value, "l": [value]}, cv.load(tmp_path / "c"))
