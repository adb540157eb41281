"""Property-based fuzzing of the four decoders that read untrusted bytes.

The decoders and the typed error each may raise (the engine wraps the last three into
:class:`~ckptvault.CorruptCheckpointError`, naming the file):

* the manifest decoder, ``format.manifest.parse_manifest`` -- ``CheckpointError`` itself;
* the tensor-file header parser, ``format.tensorfile.header_length`` / ``parse_header`` --
  ``HeaderError``;
* the state-tree decoder, ``format.tree.TreeDecoder`` (with the leaf codecs verify and load use,
  with and without a byte cap) and the leaf walkers ``iter_leaves`` / ``shared_leaves`` that
  ``open`` runs first -- ``TreeDecodeError`` (``ResourceLimitError`` past a cap); members whose
  hashes collide are refused past ``MAX_HASH_COLLISIONS`` and accepted below it;
* the chunk-frame decoder, ``format.codec.decode_into`` -- ``CodecError``.

Each gets arbitrary bytes, structured mutations of valid inputs (valid JSON with wrong types,
mutated numbers, deleted or added keys; frames with rewritten header fields and plane tables) and
byte-level mutations (truncations, bit flips, insertions). The property: a valid result or the typed
error, nothing else -- and where the input is accepted, what the decoder promises about it holds
(offsets dense and inside the file, the safetensors library agreeing, a manifest the reader fully
accepts re-serialising to itself). Valid inputs also round-trip.

Time-boxed: ``max_examples`` comes from the suite's scale (:func:`pick`), derandomised in CI so a
CI failure reproduces; every execution is counted into the ``fuzz.hypothesis_executions.<target>``
figures. The longer, coverage-guided runs are the atheris harnesses in ``fuzz/``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import struct
from collections import Counter, OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptvault.engine.arrays import BlobReader, LeafChecker
from ckptvault.engine.writer import NO_LEAVES
from ckptvault.errors import CheckpointError, ResourceLimitError
from ckptvault.format import codec
from ckptvault.format.dtypes import SAFETENSORS_ITEMSIZE
from ckptvault.format.manifest import parse_manifest
from ckptvault.format.strictjson import dumps, loads
from ckptvault.format.tensorfile import HeaderError, build_header, header_length, parse_header
from ckptvault.format.tree import (
    MAX_HASH_COLLISIONS,
    TAGS,
    TreeDecodeError,
    TreeDecoder,
    TreeEncoder,
    iter_leaves,
    shared_leaves,
)

from .conftest import FULL, Figures, pick

EXECUTIONS: Counter[str] = Counter()


def fuzz_settings(ci: int, full: int) -> settings:
    return settings(
        max_examples=pick(ci, full),
        deadline=None,
        derandomize=not FULL,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


@pytest.fixture(scope="module", autouse=True)
def _record_executions(figures: Figures) -> Iterator[None]:
    before = EXECUTIONS.copy()
    yield
    for target in ("manifest", "header", "tree", "codec"):
        figures.add(f"fuzz.hypothesis_executions.{target}", EXECUTIONS[target] - before[target])


# -- generic mutation strategies ------------------------------------------------------------------
NASTY = [
    -1, 0, 1, 255, 256, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30,
    0.5, -0.0, 1e308, True, False, None, "", "0", [], {}, [0, 0], [2**62, 2**62],
]  # fmt: skip

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(NASTY),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _slots(doc: Any, limit: int = 400) -> list[tuple[Any, Any]]:
    """(container, key) for every value inside ``doc``, breadth first, at most ``limit``."""
    out: list[tuple[Any, Any]] = []
    queue = [doc]
    while queue and len(out) < limit:
        node = queue.pop(0)
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            out.append((node, key))
            queue.append(value)
    return out


@st.composite
def mutated(draw: st.DrawFn, doc: Any) -> Any:
    """``doc`` with 1-3 structural mutations: a value replaced (by any JSON value or a nasty one), a
    key deleted, an unknown key added, a value wrapped in a list, a number nudged."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        slots = _slots(doc)
        if not slots:
            break
        container, key = draw(st.sampled_from(slots))
        action = draw(st.sampled_from(["replace", "nasty", "delete", "add", "wrap", "nudge"]))
        value = container[key]
        # deep copies: a drawn value may be a strategy's shared constant, and a later mutation of
        # it in place would change what that strategy draws in the next test case (flaky data)
        if action == "replace":
            container[key] = copy.deepcopy(draw(json_values))
        elif action == "nasty":
            container[key] = copy.deepcopy(draw(st.sampled_from(NASTY)))
        elif action == "delete":
            del container[key]
        elif action == "add" and isinstance(container, dict):
            container[draw(st.text(max_size=6))] = copy.deepcopy(draw(json_values))
        elif action == "wrap":
            container[key] = [value]
        elif action == "nudge" and type(value) is int:
            container[key] = value + draw(st.sampled_from([-1, 1, 2**32, 2**64, -(2**64)]))
    return doc


@st.composite
def byte_mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` truncated, bit-flipped, with bytes inserted, deleted or overwritten."""
    raw = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "overwrite"]))
        at = draw(st.integers(0, len(raw)))
        if op == "truncate":
            del raw[at:]
        elif op == "flip" and at < len(raw):
            raw[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del raw[at : at + draw(st.integers(1, 16))]
        elif op == "overwrite":
            piece = draw(st.binary(min_size=1, max_size=8))
            raw[at : at + len(piece)] = piece
    return bytes(raw)


HEX64 = st.text("0123456789abcdef", min_size=64, max_size=64)
FILE_NAMES = st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9._-]{0,20}\Z").filter(lambda n: n != "manifest.json")


# -- the manifest decoder ---------------------------------------------------------------------------
@st.composite
def manifest_docs(draw: st.DrawFn) -> dict[str, Any]:
    """Valid manifests: data files with dense tensors, plain files, chunked tensors, any tree."""
    files: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    names = draw(st.lists(FILE_NAMES, max_size=3, unique=True))
    for i, name in enumerate(names):
        if i == 0 or draw(st.booleans()):
            cursor = 0
            for t in draw(st.lists(st.text(min_size=1, max_size=10), max_size=3, unique=True)):
                if t in tensors:
                    continue
                dtype = draw(st.sampled_from(sorted(SAFETENSORS_ITEMSIZE)))
                shape = draw(st.lists(st.integers(0, 5), max_size=3))
                n = SAFETENSORS_ITEMSIZE[dtype] * math.prod(shape)
                tensors[t] = {
                    "file": name,
                    "dtype": dtype,
                    "shape": shape,
                    "offsets": [cursor, cursor + n],
                    "digest": draw(HEX64),
                }
                cursor += n
            header = draw(st.integers(0, 4096))
            files[name] = {
                "size": 8 + header + cursor,
                "digest": draw(HEX64),
                "header_size": header,
                "header_digest": draw(HEX64),
            }
        else:
            files[name] = {"size": draw(st.integers(0, 2**40)), "digest": draw(HEX64)}
    features: list[str] = []
    if draw(st.booleans()):
        features = ["chunked-tensors"]
        count = draw(st.integers(1, 3))
        chunks = []
        for _ in range(count):
            codec_name = draw(st.sampled_from(["raw", "zstd", "lz4"]))
            stored = 4096 if codec_name == "raw" else draw(st.integers(1, 4096))
            chunks.append([draw(HEX64), 4096, stored, codec_name])
        tensors["chunked"] = {"dtype": "U8", "shape": [4096 * count], "digest": draw(HEX64), "chunks": chunks}
    return {
        "format": "ckptvault",
        "schema_version": 1,
        "checkpoint_id": draw(st.text("0123456789abcdef", min_size=32, max_size=32)),
        "created_at": draw(st.text(max_size=40)),
        "step": draw(st.integers(0, 2**63)),
        "digest_algorithm": draw(st.sampled_from(["blake3", "sha256"])),
        "required_features": features,
        "files": files,
        "tensors": tensors,
        "tree": draw(json_values),
        "metadata": {"t": "dict", "v": draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3))},
    }


def _parse_manifest_or_typed(data: bytes) -> Any:
    EXECUTIONS["manifest"] += 1
    try:
        return parse_manifest(data, path="fuzz")
    except CheckpointError:
        return None


def _fully_accepted(manifest: Any) -> bool:
    """What verify would accept of a parsed manifest's JSON: its tree and metadata decode."""
    sizes = {name: t.nbytes for name, t in manifest.tensors.items()}

    def stored(name: str) -> int:
        if name not in sizes:
            raise TreeDecodeError("unknown tensor")
        return sizes[name]

    try:
        TreeDecoder(LeafChecker(stored)).decode(manifest.tree)
        TreeDecoder(NO_LEAVES).decode(manifest.metadata, "metadata")
    except TreeDecodeError:
        return False
    return True


def _check_accepted_manifest(manifest: Any) -> None:
    for t in manifest.tensors.values():
        if t.chunks is None:
            entry = manifest.files[t.file]
            assert entry.header_size is not None and entry.header_size + 8 <= entry.size
        else:
            assert sum(c.raw_len for c in t.chunks) == t.nbytes
    if _fully_accepted(manifest):
        again = parse_manifest(manifest.to_json(), path="fuzz")
        assert again == manifest


@fuzz_settings(ci=150, full=2000)
@given(st.binary(max_size=1024))
def test_manifest_arbitrary_bytes(data: bytes) -> None:
    _parse_manifest_or_typed(data)


@fuzz_settings(ci=200, full=1500)
@given(st.data())
def test_manifest_structured_mutations(data: st.DataObject) -> None:
    doc = data.draw(mutated(data.draw(manifest_docs())))
    manifest = _parse_manifest_or_typed(json.dumps(doc).encode())
    if manifest is not None:
        _check_accepted_manifest(manifest)


@fuzz_settings(ci=150, full=1200)
@given(st.data())
def test_manifest_byte_mutations(data: st.DataObject) -> None:
    raw = json.dumps(data.draw(manifest_docs()), indent=1).encode()
    manifest = _parse_manifest_or_typed(data.draw(byte_mutated(raw)))
    if manifest is not None:
        _check_accepted_manifest(manifest)


@fuzz_settings(ci=100, full=1000)
@given(manifest_docs())
def test_manifest_round_trip(doc: dict[str, Any]) -> None:
    EXECUTIONS["manifest"] += 1
    manifest = parse_manifest(json.dumps(doc).encode())
    assert manifest.checkpoint_id == doc["checkpoint_id"] and manifest.step == doc["step"]
    assert set(manifest.files) == set(doc["files"]) and set(manifest.tensors) == set(doc["tensors"])
    assert manifest.tree == doc["tree"]
    assert parse_manifest(manifest.to_json()) == manifest


# -- the tensor-file header parser --------------------------------------------------------------------
@st.composite
def header_specs(draw: st.DrawFn) -> tuple[list[tuple[str, str, tuple[int, ...], int]], dict[str, str]]:
    entries = []
    for name in draw(
        st.lists(
            st.text(min_size=1, max_size=12).filter(lambda n: n != "__metadata__"), max_size=4, unique=True
        )
    ):
        dtype = draw(st.sampled_from(sorted(SAFETENSORS_ITEMSIZE)))
        shape = tuple(draw(st.lists(st.integers(0, 6), max_size=3)))
        entries.append((name, dtype, shape, SAFETENSORS_ITEMSIZE[dtype] * math.prod(shape)))
    metadata = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
    return entries, metadata


def _parse_header_or_typed(body: bytes, file_size: int) -> Any:
    EXECUTIONS["header"] += 1
    try:
        return parse_header(body, file_size)
    except HeaderError:
        return None


def _check_accepted_header(parsed: Any, body: bytes, file_size: int) -> None:
    """What parse_header promises: entries dense from 0 to the end of the data, each the size its
    dtype and shape need -- and the safetensors library reads the same file."""
    data_size = file_size - 8 - len(body)
    cursor = 0
    for entry in sorted(parsed.entries.values(), key=lambda e: e.offsets):
        assert entry.offsets[0] == cursor
        assert entry.offsets[1] - entry.offsets[0] == SAFETENSORS_ITEMSIZE[entry.dtype] * math.prod(
            entry.shape
        )
        cursor = entry.offsets[1]
    assert cursor == data_size
    if data_size <= 1 << 20:
        from safetensors import _safetensors_rust as rust

        try:
            tensors = rust.deserialize(struct.pack("<Q", len(body)) + body + bytes(data_size))
        except Exception as exc:  # the library's own error type
            raise AssertionError(f"parse_header accepted what safetensors refuses: {exc}") from exc
        assert {name for name, _ in tensors} == set(parsed.entries)


@fuzz_settings(ci=150, full=2000)
@given(st.binary(max_size=512), st.integers(0, 4096))
def test_header_arbitrary_bytes(body: bytes, data_size: int) -> None:
    size = 8 + len(body) + data_size
    parsed = _parse_header_or_typed(body, size)
    if parsed is not None:
        _check_accepted_header(parsed, body, size)


@fuzz_settings(ci=150, full=2000)
@given(st.binary(max_size=600))
def test_header_whole_file_bytes(raw: bytes) -> None:
    EXECUTIONS["header"] += 1
    try:
        length = header_length(raw[:8], len(raw))
        parsed = parse_header(raw[8 : 8 + length], len(raw))
    except HeaderError:
        return
    _check_accepted_header(parsed, raw[8 : 8 + length], len(raw))


@fuzz_settings(ci=200, full=1500)
@given(header_specs(), st.data())
def test_header_structured_mutations(spec: Any, data: st.DataObject) -> None:
    entries, metadata = spec
    valid = build_header(entries, metadata)
    table = json.loads(valid[8:])
    body = json.dumps(data.draw(mutated(table))).encode()
    body += b" " * (-len(body) % 8)
    size = 8 + len(body) + sum(n for *_, n in entries) + data.draw(st.sampled_from([0, 0, 0, 1, -1, 64]))
    parsed = _parse_header_or_typed(body, size)
    if parsed is not None:
        _check_accepted_header(parsed, body, size)


@fuzz_settings(ci=150, full=1500)
@given(header_specs(), st.data())
def test_header_byte_mutations(spec: Any, data: st.DataObject) -> None:
    entries, metadata = spec
    raw = build_header(entries, metadata) + bytes(sum(n for *_, n in entries))
    raw = data.draw(byte_mutated(raw))
    EXECUTIONS["header"] += 1
    try:
        length = header_length(raw[:8], len(raw))
        parsed = parse_header(raw[8 : 8 + length], len(raw))
    except HeaderError:
        return
    _check_accepted_header(parsed, raw[8 : 8 + length], len(raw))


@fuzz_settings(ci=100, full=1000)
@given(header_specs())
def test_header_round_trip(spec: Any) -> None:
    entries, metadata = spec
    EXECUTIONS["header"] += 1
    raw = build_header(entries, metadata)
    data_size = sum(n for *_, n in entries)
    length = header_length(raw[:8], len(raw) + data_size)
    parsed = parse_header(raw[8 : 8 + length], len(raw) + data_size)
    assert parsed.metadata == metadata
    cursor = 0
    for name, dtype, shape, n in entries:
        assert (parsed.entries[name].dtype, parsed.entries[name].shape) == (dtype, shape)
        assert parsed.entries[name].offsets == (cursor, cursor + n)
        cursor += n


# -- the state-tree decoder -------------------------------------------------------------------------
STORED = {"a": 64, "b": 16, "empty": 0}
FIELDS = sorted({"v", "items", "meta", "hex", "bits", "b64", "re", "im", "dtype", "id", "tensor", "shape",
                 "device", "requires_grad", "parameter", "view"})  # fmt: skip
# Strings the leaf codecs look up or hand to numpy/torch ("|,O" and "<i4,(,)" make numpy's dtype
# parser raise SyntaxError: an atheris finding, kept here as a regression).
FIELD_VALUES = st.sampled_from(
    ["a", "b", "empty", "<f4", "|u1", "<i8", "|O", "|,O", "<i4,(,)", "|a5", "float32", "int64", "cpu", "0x1f",
     "AAAA", "3ff0000000000000"]
)  # fmt: skip


def _tagged(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    fields = st.dictionaries(
        st.sampled_from(FIELDS), children | FIELD_VALUES | st.lists(st.integers(0, 8), max_size=3), max_size=4
    )
    return st.builds(lambda tag, rest: {**rest, "t": tag}, st.sampled_from([*sorted(TAGS), "pickle"]), fields)


tree_nodes = st.recursive(
    json_values,
    lambda inner: (
        st.lists(inner, max_size=4)
        | _tagged(inner)
        | st.builds(
            lambda pairs: {"t": "dict", "items": pairs},
            st.lists(st.lists(inner, min_size=2, max_size=2), max_size=3),
        )
    ),
    max_leaves=16,
)


def _stored(name: str) -> int:
    if name not in STORED:
        raise TreeDecodeError(f"unknown tensor {name!r}")
    return STORED[name]


def _fetch(name: str) -> np.ndarray:
    if name not in STORED:
        raise TreeDecodeError(f"unknown tensor {name!r}")
    return np.zeros(STORED[name], dtype=np.uint8)


def _decode_tree_or_typed(node: Any) -> None:
    """Every way the readers walk a tree: verify's checker, load's blob reader, open's walkers."""
    EXECUTIONS["tree"] += 1
    for decoder in (
        TreeDecoder(LeafChecker(_stored)),
        TreeDecoder(LeafChecker(_stored, 32)),  # a cap below some views' logical size
        TreeDecoder(BlobReader(_fetch)),
        TreeDecoder(BlobReader(_fetch, max_leaf_bytes=32)),
        TreeDecoder(NO_LEAVES),
    ):
        with contextlib.suppress(TreeDecodeError, ResourceLimitError):
            decoder.decode(node)
    with contextlib.suppress(TreeDecodeError):
        list(iter_leaves(node))
        shared_leaves(node)


@fuzz_settings(ci=300, full=1800)
@given(tree_nodes)
def test_tree_arbitrary_nodes(node: Any) -> None:
    _decode_tree_or_typed(node)


_P61 = 2**61 - 1
# Families of distinct encoded members that all share one Python hash value.
COLLIDING: dict[str, Any] = {
    "bigint": lambda k: {"t": "int", "hex": hex((k + 1) * _P61)},
    "tuple": lambda k: {"t": "tuple", "v": [-1 - ((k >> i) & 1) for i in range(12)]},
    "complex": lambda k: {"t": "complex", "re": float(k * 1000003), "im": float(-k)},
}


@fuzz_settings(ci=120, full=1000)
@given(
    st.sampled_from(sorted(COLLIDING)),
    st.sampled_from(["dict", "set", "frozenset"]),
    st.integers(1, 3 * MAX_HASH_COLLISIONS),
    st.integers(0, 8),
)
def test_tree_colliding_members(family: str, container: str, count: int, noise: int) -> None:
    """Refused exactly when more than MAX_HASH_COLLISIONS members share a hash, whatever else is
    in the container; accepted (and all kept) below it."""
    EXECUTIONS["tree"] += 1
    members = [COLLIDING[family](k) for k in range(count)] + [f"other{i}" for i in range(noise)]
    node = (
        {"t": "dict", "items": [[m, i] for i, m in enumerate(members)]}
        if container == "dict"
        else {"t": container, "v": members}
    )
    colliding = sum(1 for m in members if not isinstance(m, str))
    try:
        value = TreeDecoder(NO_LEAVES).decode(node)
    except TreeDecodeError as exc:
        assert "collide" in str(exc) and colliding > MAX_HASH_COLLISIONS, exc
    else:
        hashes = Counter(hash(k) for k in value)
        assert max(hashes.values()) <= MAX_HASH_COLLISIONS
        assert len(value) == len(members)


@fuzz_settings(ci=150, full=1500)
@given(st.data())
def test_tree_mutated_valid_trees(data: st.DataObject) -> None:
    node = TreeEncoder(NO_LEAVES).encode(data.draw(py_values))
    _decode_tree_or_typed(data.draw(mutated({"root": node})).get("root"))


@pytest.fixture(scope="module")
def agreement_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Any]]:
    """A small real checkpoint (tensors, int keys, a set, a tuple) and its manifest document."""
    import ckptvault

    path = tmp_path_factory.mktemp("agree") / "ckpt"
    ckptvault.save(path, {"a": np.arange(4.0), 3: {"x": (1, 2), "b": np.ones(2, np.int8)}, "s": {1, 2}})
    return path, json.loads((path / "manifest.json").read_text())


def _reader_outcome(action: Any) -> str:
    try:
        action()
    except CheckpointError as exc:
        return f"refused:{type(exc).__name__}"
    return "ok"


def _walk_lazily(path: Any) -> None:
    import ckptvault
    from ckptvault.engine.lazy import LazyNode

    with ckptvault.open(path) as view:
        keys = view.keys()  # the view's own method: CheckpointView is not iterable
        for key in keys:
            child = view[key]
            if isinstance(child, LazyNode):
                for sub in list(child):
                    child[sub]
        view.load()


@fuzz_settings(ci=80, full=800)
@given(st.data())
def test_lazy_and_eager_readers_agree(
    agreement_checkpoint: tuple[Any, dict[str, Any]], data: st.DataObject
) -> None:
    """Every reader agrees (issue 13, class 6): for a mutated tree, ``load`` and a full walk of the
    lazy view either both accept it or both refuse it with the same typed error."""
    import os

    import ckptvault

    EXECUTIONS["tree"] += 1
    path, doc = agreement_checkpoint
    mutated_doc = {**doc, "tree": data.draw(mutated({"root": doc["tree"]})).get("root")}
    temp = path / "manifest.json.tmp"
    temp.write_text(json.dumps(mutated_doc))
    os.replace(temp, path / "manifest.json")
    eager = _reader_outcome(lambda: ckptvault.load(path))
    lazy = _reader_outcome(lambda: _walk_lazily(path))
    assert eager == lazy, (eager, lazy)


@fuzz_settings(ci=150, full=2000)
@given(st.binary(max_size=300).map(lambda b: b.decode("utf-8", "replace")))
def test_tree_arbitrary_json_text(text: str) -> None:
    try:
        node = loads(text)
    except ValueError:
        EXECUTIONS["tree"] += 1
        return
    _decode_tree_or_typed(node)


hashables = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=6)
    | st.binary(max_size=6)
    | st.floats(allow_nan=False)
)
py_values = st.recursive(
    hashables
    | st.floats()
    | st.complex_numbers()
    | st.builds(bytearray, st.binary(max_size=6))
    | st.builds(np.float32, st.floats(width=32))
    | st.builds(np.int64, st.integers(-(2**63), 2**63 - 1)),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=6), inner, max_size=4)
        | st.dictionaries(hashables, inner, max_size=3)
        | st.builds(OrderedDict, st.dictionaries(st.text(max_size=6), inner, max_size=3))
        | st.sets(hashables, max_size=3)
        | st.frozensets(hashables, max_size=3)
    ),
    max_leaves=16,
)


def _same(a: Any, b: Any) -> bool:
    """Exact equality: same types, floats bit for bit (NaN payloads), same key order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack(">d", a) == struct.pack(">d", b)
    if isinstance(a, complex):
        return _same(a.real, b.real) and _same(a.imag, b.imag)
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@fuzz_settings(ci=150, full=1500)
@given(py_values)
def test_tree_round_trip_through_strict_json(value: Any) -> None:
    EXECUTIONS["tree"] += 1
    text = dumps(TreeEncoder(NO_LEAVES).encode(value))
    assert _same(TreeDecoder(NO_LEAVES).decode(loads(text)), value)


# -- the chunk-frame decoder ----------------------------------------------------------------------
def _decode_frame_or_typed(frame: bytes, size: int) -> np.ndarray | None:
    EXECUTIONS["codec"] += 1
    out = np.empty(size, dtype=np.uint8)
    try:
        codec.decode_into(frame, out)
    except codec.CodecError:
        return None
    return out


@st.composite
def frames(draw: st.DrawFn) -> tuple[bytes, bytes, int]:
    """(raw bytes, a valid frame of them, itemsize), with plane methods chosen at random."""
    itemsize = draw(st.sampled_from([1, 2, 4, 8]))
    count = draw(st.integers(1, 512))
    pattern = draw(st.sampled_from(["zeros", "random", "ramp"]))
    if pattern == "zeros":
        raw = bytes(count * itemsize)
    elif pattern == "random":
        raw = draw(st.binary(min_size=count * itemsize, max_size=count * itemsize))
    else:
        raw = np.arange(count, dtype=f"<u{itemsize}").tobytes()
    planes = itemsize if draw(st.booleans()) else 1
    methods = tuple(draw(st.sampled_from([0, 1, 2])) for _ in range(planes))
    frame = codec.encode(np.frombuffer(raw, dtype=np.uint8), itemsize, methods)
    return raw, frame, itemsize


@fuzz_settings(ci=150, full=2000)
@given(st.binary(max_size=256), st.integers(0, 4096))
def test_codec_arbitrary_bytes(frame: bytes, size: int) -> None:
    _decode_frame_or_typed(frame, size)


@fuzz_settings(ci=150, full=2000)
@given(st.binary(max_size=200), st.sampled_from([1, 2, 4, 8]), st.integers(1, 8), st.integers(0, 2048))
def test_codec_arbitrary_bytes_behind_a_valid_head(
    payload: bytes, itemsize: int, nplanes: int, size: int
) -> None:
    head = struct.pack("<4sBBBBQ", b"CKVC", 1, itemsize, nplanes, 0, size)
    _decode_frame_or_typed(head + payload, size)


@fuzz_settings(ci=200, full=2000)
@given(frames(), st.data())
def test_codec_structured_mutations(spec: Any, data: st.DataObject) -> None:
    raw, frame, _ = spec
    mutated_frame = bytearray(frame)
    nplanes = frame[6]
    for _ in range(data.draw(st.integers(1, 3))):
        field = data.draw(
            st.sampled_from(
                ["magic", "version", "itemsize", "nplanes", "reserved", "raw_len", "method", "stored"]
            )
        )
        if field == "raw_len":
            value = data.draw(st.sampled_from([0, 1, len(raw) - 1, len(raw) + 1, 2**32, 2**63, 2**64 - 1]))
            mutated_frame[8:16] = struct.pack("<Q", max(value, 0))
        elif field in ("method", "stored"):
            plane = data.draw(st.integers(0, nplanes - 1))
            at = 16 + 9 * plane
            if field == "method":
                mutated_frame[at] = data.draw(st.integers(0, 255))
            else:
                stored = struct.unpack_from("<Q", mutated_frame, at + 1)[0]
                value = data.draw(
                    st.sampled_from([0, stored - 1, stored + 1, 2**63, 2**64 - 1, stored + 2**63])
                )
                mutated_frame[at + 1 : at + 9] = struct.pack("<Q", value % 2**64)
        else:
            offset = {"magic": 0, "version": 4, "itemsize": 5, "nplanes": 6, "reserved": 7}[field]
            mutated_frame[offset] = data.draw(st.integers(0, 255))
    _decode_frame_or_typed(bytes(mutated_frame), len(raw))


@fuzz_settings(ci=150, full=1500)
@given(frames(), st.data())
def test_codec_byte_mutations(spec: Any, data: st.DataObject) -> None:
    raw, frame, _ = spec
    _decode_frame_or_typed(data.draw(byte_mutated(frame)), len(raw))


@fuzz_settings(ci=100, full=1000)
@given(frames())
def test_codec_round_trip(spec: Any) -> None:
    raw, frame, _ = spec
    out = _decode_frame_or_typed(frame, len(raw))
    assert out is not None and out.tobytes() == raw
