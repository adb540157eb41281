"""``load_model``'s pipeline: decode as strictly as ``load``, trust before importing, check every
shape on the meta device before allocating, then build for real and load the weights.

Order, each step before anything the next one costs:

1. The checkpoint is opened and (with ``verify``) its listing and sidecars checked, and its whole
   state tree is decoded by the same strict decoder as :func:`ckptvault.load` (duplicate keys,
   unknown fields, depth and size limits), with every array and tensor left as a placeholder: no
   tensor byte is read yet.
2. The recorded factory is resolved under the caller's :class:`TrustPolicy` (nothing untrusted is
   imported; see :mod:`ckptvault.training.trust`).
3. The model is built on the ``meta`` device (no memory behind any tensor) and every
   parameter/buffer name and shape is compared with the shapes the checkpoint declares: a
   checkpoint whose kwargs describe a 10^12-weight layer is a :class:`ModelMismatchError` here,
   not an allocation. (A constructor that cannot run on meta -- it calls ``.item()``, say -- skips
   this step; the comparison then happens after the real build. A constructor that allocates on an
   explicit device allocates there: the kwargs are still the checkpoint's.)
4. The model is built again for real, so that buffers computed in ``__init__`` (non-persistent ones
   included) are right, and the weights it needs -- only those -- are read, digest-checked into
   fresh memory (never a map of a file that could change underneath) and loaded strictly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..engine.arrays import BlobReader
from ..engine.reader import CheckpointReader
from ..storage.base import Storage
from .architecture import (
    ArchitectureError,
    ModelSpec,
    check_fit,
    check_shapes,
    construct,
    resolve,
    state_shapes,
)
from .trust import TrustPolicy

_TENSOR_TAGS = ("ndarray", "torch.Tensor")
_MAX_NDIM = 64


@dataclass(eq=False)
class _Pending:
    """An array or tensor leaf not read yet: its encoded node and tree path."""

    node: dict[str, Any]
    path: str

    def declared_shape(self) -> tuple[int, ...] | None:
        shape = self.node.get("shape")
        if not isinstance(shape, list) or len(shape) > _MAX_NDIM:
            return None
        return tuple(shape) if all(type(d) is int and d >= 0 for d in shape) else None


class _DeferTensors:
    """A leaf decoder for the strict structural pass: every leaf but arrays and tensors decoded as
    ``load`` decodes it, arrays and tensors left as :class:`_Pending` (no bytes read)."""

    def __init__(self, blobs: BlobReader) -> None:
        self._blobs = blobs

    def decode_leaf(self, node: dict[str, Any], path: str) -> Any:
        if node.get("t") in _TENSOR_TAGS:
            return _Pending(node, path)
        return self._blobs.decode_leaf(node, path)


def _weights_at(tree: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    node = tree
    try:
        for key in keys:
            node = node[key]
    except (KeyError, TypeError, IndexError) as exc:
        raise ArchitectureError(f"the checkpoint has no weights at {list(keys)}") from exc
    if not isinstance(node, dict) or not all(isinstance(k, str) for k in node):
        raise ArchitectureError(f"the weights at {list(keys)} are not a state dict")
    return node


def _declared_shapes(weights: dict[str, Any]) -> dict[str, tuple[int, ...] | None]:
    return {
        k: v.declared_shape() if isinstance(v, _Pending) else tuple(getattr(v, "shape", ()))
        for k, v in weights.items()
    }


class _Materializer:
    """Reads the placeholders of one subtree (each tensor once, shared ones staying shared)."""

    def __init__(self, reader: CheckpointReader, map_location: Any, verify: bool) -> None:
        self._reader = reader
        self._blobs = BlobReader(lambda name: reader.fetch(name, verify=verify, mapped=False), map_location)
        self._done: dict[int, Any] = {}

    def fill(self, value: Any) -> Any:
        if isinstance(value, _Pending):
            if id(value) not in self._done:
                self._done[id(value)] = self._reader.decode_tree(self._blobs, value.node, value.path)
            return self._done[id(value)]
        if isinstance(value, dict):
            for key in list(value):
                value[key] = self.fill(value[key])  # in place: keeps the type and ``_metadata``
            return value
        if isinstance(value, list):
            return [self.fill(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self.fill(v) for v in value)
        return value


def rebuild_model(
    storage: Storage, path: str, *, map_location: Any, verify: bool, policy: TrustPolicy
) -> Any:
    """The checkpoint's model with its weights, in eval mode; see the module docstring."""
    with CheckpointReader(storage, path) as reader:
        if verify:
            reader.check_listing()
            reader.check_sidecars()
        spec = ModelSpec.from_metadata(reader.decode_metadata().get("architecture"))
        tree = reader.decode_tree(_DeferTensors(BlobReader(_no_bytes, map_location)))
        weights = _weights_at(tree, spec.weights)
        factory = resolve(spec.factory, policy, checkpoint=path)
        declared = _declared_shapes(weights)
        try:
            on_meta = construct(factory, spec, device="meta")
        except ArchitectureError as exc:
            if isinstance(exc.__cause__, Exception):
                on_meta = None  # an ordinary failure on meta only: checked after the real build
            else:
                raise  # SystemExit and friends: not retried
        if on_meta is not None:
            check_shapes(state_shapes(on_meta.state_dict()), declared)
            del on_meta
        model = construct(factory, spec)
        check_shapes(state_shapes(model.state_dict()), declared)
        loaded = _Materializer(reader, map_location, verify).fill(weights)
    check_fit(model, loaded)
    model.load_state_dict(loaded, strict=True)
    return model.eval()


def _no_bytes(name: str) -> Any:
    raise AssertionError(f"tensor {name!r} read during the structural pass")
