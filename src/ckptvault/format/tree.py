"""Safe, exact encoding of the non-tensor part of a state into tagged JSON (no pickle, ever).

Every JSON object in an encoded tree is a *tagged node* ``{"t": <tag>, ...}``; user dicts are
always wrapped, so a user key can never be mistaken for a tag. Scalars that JSON represents exactly
(null, booleans, strings, 64-bit integers, finite floats via ``repr``) stay plain; everything else
carries a tag. Arrays and tensors are not stored here: a :class:`LeafCodec` turns them into leaf
nodes that reference tensor entries, which keeps this module free of torch and of I/O.

Decoding accepts only the tags listed in ``TAGS`` and enforces depth and size limits before it
builds anything, so a hostile manifest costs bounded time and memory.
"""

from __future__ import annotations

import base64
import math
import struct
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import numpy as np

from ..config import MAX_BIGINT_HEX_DIGITS, MAX_TREE_DEPTH, MAX_TREE_NODES
from ..errors import UnsupportedStateError
from .dtypes import parse_numpy_dtype

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# Tags this version writes and reads. Leaf tags are delegated to the LeafCodec.
CONTAINER_TAGS = frozenset({"dict", "odict", "tuple", "set", "frozenset"})
SCALAR_TAGS = frozenset({"int", "float", "bytes", "bytearray", "complex", "np.scalar", "np.dtype", "ref"})
LEAF_TAGS = frozenset({"ndarray", "torch.Tensor", "torch.dtype", "torch.device", "torch.Size"})
TAGS = CONTAINER_TAGS | SCALAR_TAGS | LEAF_TAGS

# Fields each tag may carry; anything else is refused (a reader must not ignore what it does not
# understand).
NODE_FIELDS: dict[str, frozenset[str]] = {
    "dict": frozenset({"t", "v", "items"}),
    "odict": frozenset({"t", "v", "items", "meta"}),
    "tuple": frozenset({"t", "v"}),
    "set": frozenset({"t", "v"}),
    "frozenset": frozenset({"t", "v"}),
    "int": frozenset({"t", "hex"}),
    "float": frozenset({"t", "bits"}),
    "bytes": frozenset({"t", "b64"}),
    "bytearray": frozenset({"t", "b64"}),
    "complex": frozenset({"t", "re", "im"}),
    "np.scalar": frozenset({"t", "dtype", "b64"}),
    "np.dtype": frozenset({"t", "v"}),
    "ref": frozenset({"t", "id"}),
    "ndarray": frozenset({"t", "tensor", "dtype", "shape", "id"}),
    "torch.Tensor": frozenset(
        {"t", "tensor", "dtype", "shape", "device", "requires_grad", "parameter", "view", "id"}
    ),
    "torch.dtype": frozenset({"t", "v"}),
    "torch.device": frozenset({"t", "v"}),
    "torch.Size": frozenset({"t", "v"}),
}


class TreeDecodeError(ValueError):
    """The encoded tree breaks a rule; the message names the node's path."""


class LeafEncoder(Protocol):
    """Turns values the tree codec does not know (arrays, tensors, torch objects) into leaves."""

    def encode_leaf(self, value: Any, path: str, name: str) -> dict[str, Any] | None:
        """A leaf node for ``value``, or None when this codec does not handle its type.

        ``path`` is the value's place in the state for error messages (``state['model'][0]``) and
        ``name`` a dotted tensor name suggestion (``model.0``)."""


class LeafDecoder(Protocol):
    def decode_leaf(self, node: dict[str, Any], path: str) -> Any:
        """The value of a leaf node whose tag is in ``LEAF_TAGS``."""


def _describe(value: Any) -> str:
    kind = type(value)
    if callable(value) and not isinstance(value, type):
        return f"a function ({kind.__module__}.{kind.__qualname__}) cannot be saved: code is never stored"
    return (
        f"a {kind.__module__}.{kind.__qualname__} cannot be saved safely: only dict/list/tuple/set, "
        "None/bool/int/float/complex/str/bytes, numpy arrays and scalars and torch tensors/dtypes/"
        "devices/sizes are encodable (convert it, e.g. to its state_dict())"
    )


def _key_path(path: str, key: Any) -> str:
    return f"{path}[{key!r}]"


def _join(name: str, key: Any) -> str:
    return f"{name}.{key}" if name else str(key)


class TreeEncoder:
    """Encodes one state; remembers shared array/tensor objects so they come back shared."""

    def __init__(self, leaf_codec: LeafEncoder) -> None:
        self._leaf_codec = leaf_codec
        self._shared: dict[int, tuple[Any, dict[str, Any]]] = {}
        self._next_id = 0

    def encode(self, value: Any, path: str = "state") -> Any:
        return self._encode(value, path, "", 0, set())

    def _encode(self, value: Any, path: str, name: str, depth: int, active: set[int]) -> Any:
        if depth > MAX_TREE_DEPTH:
            raise UnsupportedStateError(path, f"nesting deeper than {MAX_TREE_DEPTH} levels")
        kind = type(value)
        if value is None or kind is bool or kind is str:
            return value
        if kind is int:
            if INT64_MIN <= value <= INT64_MAX:
                return value
            return {"t": "int", "hex": hex(value)}
        if kind is float:
            if math.isfinite(value):
                return value
            return {"t": "float", "bits": struct.pack(">d", value).hex()}
        if kind in (list, tuple, set, frozenset, dict, OrderedDict):
            marker = id(value)
            if marker in active:
                raise UnsupportedStateError(path, "the state contains a reference cycle")
            active.add(marker)
            try:
                return self._encode_container(value, path, name, depth, active)
            finally:
                active.discard(marker)
        if kind is bytes or kind is bytearray:
            return {"t": kind.__name__, "b64": base64.b64encode(value).decode("ascii")}
        if kind is complex:
            return {
                "t": "complex",
                "re": self._encode(value.real, path, name, depth + 1, active),
                "im": self._encode(value.imag, path, name, depth + 1, active),
            }
        if isinstance(value, np.generic):
            return self._encode_numpy_scalar(value, path)
        if isinstance(value, np.dtype):
            try:
                parse_numpy_dtype(value.str)
            except ValueError as exc:
                raise UnsupportedStateError(path, str(exc)) from exc
            return {"t": "np.dtype", "v": value.str}
        seen = self._shared.get(id(value))
        if seen is not None and seen[0] is value:
            leaf = seen[1]
            if "id" not in leaf:
                leaf["id"] = self._next_id
                self._next_id += 1
            return {"t": "ref", "id": leaf["id"]}
        new_leaf = self._leaf_codec.encode_leaf(value, path, name or "tensor")
        if new_leaf is None:
            raise UnsupportedStateError(path, _describe(value))
        if new_leaf.get("t") in ("ndarray", "torch.Tensor"):
            self._shared[id(value)] = (value, new_leaf)
        return new_leaf

    def _encode_container(self, value: Any, path: str, name: str, depth: int, active: set[int]) -> Any:
        kind = type(value)
        sub = depth + 1
        if kind is list or kind is tuple:
            items = [
                self._encode(v, f"{path}[{i}]", _join(name, i), sub, active) for i, v in enumerate(value)
            ]
            return items if kind is list else {"t": "tuple", "v": items}
        if kind in (set, frozenset):
            items = [
                self._encode(v, f"{path}{{{i}}}", _join(name, i), sub, active) for i, v in enumerate(value)
            ]
            return {"t": kind.__name__, "v": items}
        node: dict[str, Any] = {"t": "odict" if kind is OrderedDict else "dict"}
        if all(type(k) is str for k in value):
            node["v"] = {
                k: self._encode(v, _key_path(path, k), _join(name, k), sub, active) for k, v in value.items()
            }
        else:
            node["items"] = [
                [
                    self._encode_key(k, path, sub, active),
                    self._encode(v, _key_path(path, k), _join(name, k), sub, active),
                ]
                for k, v in value.items()
            ]
        meta = getattr(value, "_metadata", None) if kind is OrderedDict else None
        if meta is not None:  # torch's state_dict() keeps module versions here; load_state_dict reads it
            node["meta"] = self._encode(meta, f"{path}._metadata", _join(name, "_metadata"), sub, active)
        return node

    def _encode_key(self, key: Any, path: str, depth: int, active: set[int]) -> Any:
        if type(key) not in (str, int, bool, float, bytes, tuple, type(None)):
            raise UnsupportedStateError(_key_path(path, key), f"dict key of type {type(key).__name__}")
        return self._encode(key, f"{path}.<key>", "", depth, active)

    @staticmethod
    def _encode_numpy_scalar(value: np.generic, path: str) -> dict[str, Any]:
        dtype = value.dtype
        if dtype.hasobject or dtype.kind not in "biufcMmSU":
            raise UnsupportedStateError(path, f"numpy scalar of dtype {dtype!r} cannot be saved")
        raw = np.asarray(value).tobytes() if dtype.itemsize else b""  # S0/U0 scalars: 0 bytes, not 1
        return {"t": "np.scalar", "dtype": dtype.str, "b64": base64.b64encode(raw).decode("ascii")}


class TreeDecoder:
    """Decodes one encoded tree, validating every node before it allocates for it."""

    def __init__(
        self, leaf_codec: LeafDecoder, shared_nodes: Mapping[int, dict[str, Any]] | None = None
    ) -> None:
        # ``shared_nodes`` (from :func:`shared_leaves`) lets a partial decode of a lazy view resolve a
        # reference whose defining leaf lies outside the decoded subtree.
        self._leaf_codec = leaf_codec
        self._shared: dict[int, Any] = {}
        # Not ``shared_nodes or {}``: a lazy mapping would be computed just to be tested for truth.
        self._shared_nodes: Mapping[int, dict[str, Any]] = {} if shared_nodes is None else shared_nodes
        self._nodes = 0

    def decode(self, node: Any, path: str = "state") -> Any:
        return self._decode(node, path, 0)

    def _count(self, path: str) -> None:
        self._nodes += 1
        if self._nodes > MAX_TREE_NODES:
            raise TreeDecodeError(f"{path}: more than {MAX_TREE_NODES} nodes")

    def _decode(self, node: Any, path: str, depth: int) -> Any:
        self._count(path)
        if depth > MAX_TREE_DEPTH:
            raise TreeDecodeError(f"{path}: nested deeper than {MAX_TREE_DEPTH}")
        if node is None or isinstance(node, (bool, str)):
            return node
        if isinstance(node, float):
            # Writers keep only finite floats plain; JSON parsers turn a literal like 1e400 into inf
            # (or keep it exact): readers would disagree, so it is refused like a NaN token.
            if not math.isfinite(node):
                raise TreeDecodeError(f"{path}: plain number out of the float range (must be a float node)")
            return node
        if isinstance(node, int):
            if not INT64_MIN <= node <= INT64_MAX:
                raise TreeDecodeError(f"{path}: plain integer outside int64 (must be an int node)")
            return node
        if isinstance(node, list):
            return [self._decode(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(node)]
        if not isinstance(node, dict):
            raise TreeDecodeError(f"{path}: unexpected JSON value")
        tag = node.get("t")
        if not isinstance(tag, str) or tag not in TAGS:
            # Never str() a non-string tag: a list nested hundreds deep would recurse in repr past
            # Python's limit when this node is itself deep in the tree (RecursionError, not ours).
            shown = tag[:40] if isinstance(tag, str) else f"<{type(tag).__name__}>"
            raise TreeDecodeError(f"{path}: unknown node tag {shown!r}")
        allowed = NODE_FIELDS[tag]
        if not node.keys() <= allowed:
            raise TreeDecodeError(f"{path}: unknown fields {sorted(node.keys() - allowed)[:3]} in {tag} node")
        try:
            value = self._decode_tagged(tag, node, path, depth)
        except TreeDecodeError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError, RuntimeError, struct.error) as exc:
            raise TreeDecodeError(
                f"{path}: malformed {tag} node ({type(exc).__name__}: {exc})"[:300]
            ) from exc
        if "id" in node and tag in ("ndarray", "torch.Tensor"):
            ident = node["id"]
            if not _is_shared_id(ident) or ident in self._shared:
                raise TreeDecodeError(f"{path}: bad or repeated shared-object id")
            self._shared[ident] = value
        return value

    def _decode_tagged(self, tag: str, node: dict[str, Any], path: str, depth: int) -> Any:
        if tag in CONTAINER_TAGS:
            return self._decode_container(tag, node, path, depth)
        if tag == "int":
            text = _field(node, "hex", str)
            if len(text) > MAX_BIGINT_HEX_DIGITS:
                raise TreeDecodeError(f"{path}: integer longer than {MAX_BIGINT_HEX_DIGITS} hex digits")
            return int(text, 16)
        if tag == "float":
            bits = _field(node, "bits", str)
            if len(bits) != 16:
                raise TreeDecodeError(f"{path}: float bits must be 16 hex digits")
            return struct.unpack(">d", bytes.fromhex(bits))[0]
        if tag in ("bytes", "bytearray"):
            raw = base64.b64decode(_field(node, "b64", str), validate=True)
            return raw if tag == "bytes" else bytearray(raw)
        if tag == "complex":
            re_, im_ = (self._decode(node[k], path, depth + 1) for k in ("re", "im"))
            if type(re_) is not float or type(im_) is not float:
                raise TreeDecodeError(f"{path}: complex parts must be floats")
            return complex(re_, im_)
        if tag == "np.scalar":
            dtype = parse_numpy_dtype(_field(node, "dtype", str))
            raw = base64.b64decode(_field(node, "b64", str), validate=True)
            if dtype.itemsize == 0 and not raw and dtype.kind in "SU":
                return np.bytes_(b"") if dtype.kind == "S" else np.str_("")
            if len(raw) != dtype.itemsize:
                raise TreeDecodeError(
                    f"{path}: numpy scalar has {len(raw)} bytes, dtype needs {dtype.itemsize}"
                )
            return np.frombuffer(raw, dtype=dtype)[0]
        if tag == "np.dtype":
            return parse_numpy_dtype(_field(node, "v", str))
        if tag == "ref":
            ident: int = node.get("id")  # type: ignore[assignment]  # checked on the next line
            if not _is_shared_id(ident):
                raise TreeDecodeError(f"{path}: bad shared-object id")
            if ident not in self._shared and ident in self._shared_nodes:
                return self._decode(self._shared_nodes[ident], path, depth)
            if ident not in self._shared:
                raise TreeDecodeError(f"{path}: reference to an unknown shared object")
            return self._shared[ident]
        return self._leaf_codec.decode_leaf(node, path)

    def _decode_container(self, tag: str, node: dict[str, Any], path: str, depth: int) -> Any:
        if tag in ("tuple", "set", "frozenset"):
            items = [
                self._decode(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(_field(node, "v", list))
            ]
            if tag == "tuple":
                return tuple(items)
            guard = HashGuard(path)
            for item in items:
                guard.add(item)
            return set(items) if tag == "set" else frozenset(items)
        out: dict[Any, Any] = OrderedDict() if tag == "odict" else {}
        if ("v" in node) == ("items" in node):
            raise TreeDecodeError(f"{path}: a dict node has exactly one of 'v' and 'items'")
        if "v" in node:
            for key, value in _field(node, "v", dict).items():
                out[key] = self._decode(value, _key_path(path, key), depth + 1)
        else:
            guard = HashGuard(path)
            for pair in _field(node, "items", list):
                if not isinstance(pair, list) or len(pair) != 2:
                    raise TreeDecodeError(f"{path}: dict items must be [key, value] pairs")
                key = self._decode(pair[0], f"{path}.<key>", depth + 1)
                guard.add(key)
                if key in out:
                    raise TreeDecodeError(f"{path}: duplicate dict key {key!r}"[:200])
                out[key] = self._decode(pair[1], _key_path(path, key), depth + 1)
        if "meta" in node:
            if tag != "odict":
                raise TreeDecodeError(f"{path}: only odict nodes carry meta")
            out._metadata = self._decode(node["meta"], f"{path}._metadata", depth + 1)  # type: ignore[attr-defined]
        return out


# Members of one dict or set that may share a hash value. Python hashes an int as its value modulo
# 2**61 - 1, so a hostile tree can give 100k distinct keys one hash (multiples of that prime, tuples
# of -1 and -2, complex numbers a + b*1000003j...) and make building the dict quadratic. Honest
# states never come near this; counting per hash keeps decoding linear in the manifest's size.
MAX_HASH_COLLISIONS = 32


class HashGuard:
    """Refuses a container whose members collide in Python's hash beyond ``MAX_HASH_COLLISIONS``.

    The counter's own keys are hash values (ints below 2**63 in magnitude), which at most a handful
    of share a hash in turn: counting costs O(1) per member whatever the input.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._counts: dict[int, int] = {}

    def add(self, member: Any) -> None:
        value = hash(member)  # TypeError for an unhashable member: the caller's malformed-node error
        seen = self._counts.get(value, 0) + 1
        if seen > MAX_HASH_COLLISIONS:
            raise TreeDecodeError(
                f"{self._path}: more than {MAX_HASH_COLLISIONS} members collide in one hash value "
                "(a hash-flooding tree)"
            )
        self._counts[value] = seen


def _is_shared_id(ident: Any) -> bool:
    # Writers number shared objects 0, 1, 2...; a bounded id also keeps the id tables free of
    # hash-colliding integers (see MAX_HASH_COLLISIONS).
    return type(ident) is int and 0 <= ident <= INT64_MAX


def _field(node: dict[str, Any], name: str, kind: type) -> Any:
    value = node.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise TreeDecodeError(f"field {name!r} must be a {kind.__name__}")
    return value


def iter_leaves(node: Any, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every array/tensor leaf of an encoded tree with a dotted path (``model.fc.weight``,
    ``optimizer.state.0.exp_avg``), without decoding anything; depth-limited like decoding."""
    if depth > MAX_TREE_DEPTH:
        raise TreeDecodeError(f"tree nested deeper than {MAX_TREE_DEPTH}")
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from iter_leaves(item, _join(prefix, i), depth + 1)
        return
    if not isinstance(node, dict):
        return
    tag = node.get("t")
    if tag in ("ndarray", "torch.Tensor"):
        yield prefix or "<root>", node
    elif tag in ("dict", "odict"):
        items = node.get("items")
        if isinstance(node.get("v"), dict):
            pairs: list[tuple[Any, Any]] = list(node["v"].items())
        elif isinstance(items, list):
            pairs = [(_key_text(p[0], depth + 1), p[1]) for p in items if isinstance(p, list) and len(p) == 2]
        else:
            pairs = []
        if "meta" in node:
            pairs.append(("_metadata", node["meta"]))
        for key, value in pairs:
            yield from iter_leaves(value, _join(prefix, key), depth + 1)
    elif tag in ("tuple", "set", "frozenset"):
        yield from iter_leaves(node.get("v", []), prefix, depth + 1)


def _key_text(key: Any, depth: int) -> str:
    # Bounded like decoding: a tuple key nested hundreds deep must not reach Python's recursion limit.
    if depth > MAX_TREE_DEPTH:
        raise TreeDecodeError(f"dict key nested deeper than {MAX_TREE_DEPTH}")
    if isinstance(key, dict) and key.get("t") == "tuple" and isinstance(key.get("v"), list):
        return "(" + ",".join(_key_text(k, depth + 1) for k in key["v"]) + ")"
    nested = isinstance(key, dict) and any(isinstance(v, (dict, list)) for v in key.values())
    if isinstance(key, list) or nested:
        return f"<{type(key).__name__}>"  # not a key the writer makes; its repr could recurse without bound
    return str(key)


def shared_leaves(tree: Any) -> dict[int, dict[str, Any]]:
    """Leaves that other places reference by id, for decoding a subtree on its own."""
    shared: dict[int, dict[str, Any]] = {}
    for _, leaf in iter_leaves(tree):
        if "id" in leaf:
            if not _is_shared_id(leaf["id"]):
                raise TreeDecodeError("bad shared-object id")
            shared[leaf["id"]] = leaf
    return shared
