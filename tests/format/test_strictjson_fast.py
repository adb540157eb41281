"""The fast strict JSON reader (msgspec + the colon-count duplicate check) refuses exactly what the
format refuses, with StrictJSONError, and accepts what the writer writes."""

from __future__ import annotations

import gc
import json
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptvault.format.strictjson import StrictJSONError, dumps, gc_paused, loads


@pytest.mark.parametrize(
    "text",
    [
        b'{"a": 1, "a": 2}',
        b'{"x": {"y": [{"z": {"d": 1, "d": 1}}]}}',  # deep inside lists and objects
        b'[{"k": "v"}, {"k": 1, "k": 1}]',
        b'{"a": 1, "\\u0061": 2}',  # the same key spelled with an escape
        b'{"a:": 1, "a\\u003a": 2}',  # an escaped colon: takes the hook-checked path
        b'{"": {}, "": {}}',
        b'{"a": {"b": "x:y"}, "a": {"b": "x:y"}}',  # colons inside the dropped value's strings
    ],
)
def test_duplicate_keys_at_any_depth_are_refused(text: bytes) -> None:
    with pytest.raises(StrictJSONError, match="duplicate key"):
        loads(text)


@pytest.mark.parametrize(
    "text",
    [
        b'{"a": NaN}',
        b"[Infinity]",
        b"[-Infinity]",
        b"[1e400]",  # finite-looking, overflows a double
        b"[-1e400]",
        b"[" + b"9" * 5000 + b"]",  # an integer longer than any the format writes
        b'"\xff"',  # invalid UTF-8 in a value
        b'{"\xc3": 1}',  # truncated UTF-8 in a key
        b'"\\ud800"',  # a lone surrogate escape
        b'{"a": 1} x',  # trailing data
        b"\xef\xbb\xbf{}",  # a byte-order mark
        '{"a": 1}'.encode("utf-16"),
        '{"a": 1}'.encode("utf-32"),
        b"[" * 100_000,
        b"[" * 5_000 + b"]" * 5_000,  # valid but deeper than the interpreter's limit
        b"",
        b"{'a': 1}",
    ],
)
def test_non_strict_json_is_refused_with_a_typed_error(text: bytes) -> None:
    with pytest.raises(StrictJSONError):
        loads(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b'{"a": "b:c", "d": ["e:f", {"g:h": ":"}]}', {"a": "b:c", "d": ["e:f", {"g:h": ":"}]}),
        (b'{"k\\u003a": 1}', {"k:": 1}),  # an escaped colon, no duplicate
        (b'{"k\\u003A": "\\u003a"}', {"k:": ":"}),
        (b'{"a\\\\u003a": 1, "a\\u003a": 2}', {"a\\u003a": 1, "a:": 2}),  # escaped backslash, then text
        ('{"é:€": "ü"}'.encode(), {"é:€": "ü"}),
        (b"12345678901234567890123456789", 12345678901234567890123456789),
        (b"[-0.0, 1.5e308, 5e-324]", [-0.0, 1.5e308, 5e-324]),
        (b' {\n "a" :\t[] } ', {"a": []}),
        (b"[]", []),
        (b'"x"', "x"),
    ],
)
def test_strict_json_accepts_valid_documents(text: bytes, value: Any) -> None:
    assert loads(text) == value
    assert loads(text.decode("utf-8")) == value  # str input too


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
_DOCS = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(_DOCS, st.sampled_from([None, 1]))
def test_round_trip_agrees_with_the_standard_library(doc: Any, indent: int | None) -> None:
    text = dumps(doc, indent=indent)
    assert loads(text) == json.loads(text) == doc


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=6), _DOCS, min_size=1, max_size=5), st.data())
def test_a_repeated_key_is_always_found(doc: dict[str, Any], data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(sorted(doc)))
    value = data.draw(_DOCS)
    body = dumps(doc)[:-1] + b"," + dumps(key) + b":" + dumps(value) + b"}"
    nested = b'{"outer": [1, ' + body + b"]}"
    for text in (body, nested):
        with pytest.raises(StrictJSONError, match="duplicate key"):
            loads(text)


def test_the_collector_is_restored_after_parses_and_errors() -> None:
    assert gc.isenabled()
    loads(b'{"a": [1, 2, {"b": 3}]}')
    with pytest.raises(StrictJSONError):
        loads(b'{"a": 1, "a": 2}')
    with pytest.raises(StrictJSONError):
        loads(b"[" * 100_000)
    assert gc.isenabled()
    gc.disable()
    try:
        loads(b"{}")
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()


def test_concurrent_parses_leave_the_collector_enabled() -> None:
    doc = dumps({f"k{i}": [i, {"x": str(i)}] for i in range(2000)})

    def work() -> None:
        for _ in range(20):
            loads(doc)
            with gc_paused(), gc_paused():
                pass

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert gc.isenabled()
