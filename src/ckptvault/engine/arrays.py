"""Arrays and tensors as tree leaves: what gets stored, and how it comes back.

Saving collects every numpy array and torch tensor of a state into *blobs* (one safetensors entry
each) and emits a leaf node that references its blob. Torch tensors are grouped by the storage
they live in, because sharing is part of a state's meaning (tied input/output embeddings must stay
tied after a restore):

* a tensor alone in its storage is stored as its own contiguous values (a small view of a huge
  buffer does not drag the buffer along);
* tensors that are the same view of one storage (``state_dict()`` of tied weights) share one blob
  and come back as views of one storage;
* different views of one storage are stored as the byte span they cover and come back through
  ``as_strided`` with their original offsets and strides, still sharing.

torch is imported only when a state contains torch objects, so numpy-only users never pay for it.
"""

from __future__ import annotations

import re
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UnsupportedStateError
from ..format.dtypes import TORCH_DTYPES, StoredForm, numpy_stored_form, parse_numpy_dtype, torch_stored_form
from ..format.tree import TreeDecodeError
from .leaves import LeafChecker as LeafChecker
from .leaves import checked_view, leaf_nbytes_check, numel, shape_of

_DEVICE_RE = re.compile(r"^[a-z_]{1,16}(:[0-9]{1,4})?$")


@dataclass
class Blob:
    """One stored tensor: its name in the file, stored dtype/shape and a byte view of its data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: memoryview  # contiguous bytes, kept alive by ``owner``
    owner: Any = field(default=None, repr=False)
    # For torch tensors: what proves the bytes unchanged at the next save (engine/chunks.py).
    version_key: tuple[Any, ...] | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


def _stored_shape(shape: tuple[int, ...], form: StoredForm) -> tuple[int, ...]:
    return (*shape, form.extra_dim) if form.extra_dim else shape


def _numpy_bytes(array: np.ndarray) -> memoryview:
    return memoryview(array.reshape(-1).view(np.uint8).data) if array.size else memoryview(b"")


class BlobCollector:
    """The saving side of the leaf codec: turns arrays/tensors into leaves plus blobs."""

    def __init__(self) -> None:
        self.blobs: list[Blob] = []
        self._names: set[str] = set()
        self._torch_groups: dict[tuple[str, int], list[tuple[dict[str, Any], Any]]] = {}

    def _unique(self, name: str) -> str:
        # Bounded in UTF-8 bytes (the reader's limit), never the header's reserved key, and valid
        # UTF-8 even when a dict key held lone surrogates.
        name = name.encode("utf-8", "replace")[:900].decode("utf-8", "ignore") or "tensor"
        if name == "__metadata__":
            name = "__metadata__~tensor"
        candidate, n = name, 1
        while candidate in self._names:
            n += 1
            candidate = f"{name}~{n}"
        self._names.add(candidate)
        return candidate

    def encode_leaf(self, value: Any, path: str, name: str) -> dict[str, Any] | None:
        if type(value) is np.ndarray or type(value) is np.memmap:
            return self._numpy_leaf(value, path, name)
        if "torch" in sys.modules:
            return self._torch_leaf(value, path, name)
        return None

    def _numpy_leaf(self, array: np.ndarray, path: str, name: str) -> dict[str, Any]:
        dtype = array.dtype
        form = numpy_stored_form(dtype, path)
        data = np.ascontiguousarray(array)
        if dtype.byteorder == ">" or (dtype.byteorder == "=" and sys.byteorder == "big"):
            data = data.astype(dtype.newbyteorder("<"))
        blob_name = self._unique(name)
        self.blobs.append(
            Blob(blob_name, form.code, _stored_shape(array.shape, form), _numpy_bytes(data), data)
        )
        return {"t": "ndarray", "tensor": blob_name, "dtype": dtype.str, "shape": list(array.shape)}

    def _torch_leaf(self, value: Any, path: str, name: str) -> dict[str, Any] | None:
        import torch

        if isinstance(value, torch.dtype):
            return {"t": "torch.dtype", "v": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"t": "torch.device", "v": str(value)}
        if type(value) is torch.Size:
            return {"t": "torch.Size", "v": list(value)}
        if not isinstance(value, torch.Tensor):
            return None
        if type(value) not in (torch.Tensor, torch.nn.Parameter):
            raise UnsupportedStateError(
                path, f"tensor subclass {type(value).__qualname__} cannot be saved safely"
            )
        if (
            value.layout != torch.strided
            or value.is_quantized
            or value.is_nested
            or value.device.type == "meta"
        ):
            raise UnsupportedStateError(
                path, f"only dense tensors with data can be saved (got {value.layout}, device {value.device})"
            )
        dtype_name = str(value.dtype).removeprefix("torch.")
        torch_stored_form(dtype_name, path)  # raises for dtypes with no byte layout
        leaf: dict[str, Any] = {
            "t": "torch.Tensor",
            "tensor": None,
            "dtype": dtype_name,
            "shape": list(value.shape),
            "device": str(value.device),
        }
        if value.requires_grad:
            leaf["requires_grad"] = True
        if type(value) is torch.nn.Parameter:
            leaf["parameter"] = True
        leaf["_name"] = name
        storage = value.untyped_storage()
        # Empty storages all report address 0: they share nothing, so each gets its own group.
        key = (str(value.device), storage.data_ptr() if storage.nbytes() else -id(value))
        self._torch_groups.setdefault(key, []).append((leaf, value))
        return leaf

    def finalize(self) -> list[Blob]:
        """Decides each torch storage group's layout once the whole state has been seen."""
        for group in self._torch_groups.values():
            for cluster in _overlap_clusters(group):
                self._store_group(cluster)
        self._torch_groups.clear()
        return self.blobs

    def _store_group(self, group: list[tuple[dict[str, Any], Any]]) -> None:
        first_leaf, first = group[0]
        geometry = {(t.dtype, t.storage_offset(), tuple(t.shape), tuple(t.stride())) for _, t in group}
        if len(group) == 1 or (len(geometry) == 1 and first.numel() > 0):
            blob = self._torch_blob(first, first_leaf.pop("_name"))
            for leaf, _ in group:
                leaf.pop("_name", None)
                leaf["tensor"] = blob.name
            return
        span = _covering_span(group)
        if span is None:  # views that cannot be described as one byte span: store each on its own
            for leaf, tensor in group:
                leaf["tensor"] = self._torch_blob(tensor, leaf.pop("_name")).name
            return
        lo, hi = span
        import torch

        storage = first.untyped_storage()
        raw = torch.empty(0, dtype=torch.uint8, device=first.device).set_(storage, lo, (hi - lo,), (1,))
        raw = raw.detach().cpu()
        blob = Blob(
            self._unique(first_leaf["_name"] + "#storage"), "U8", (hi - lo,), _numpy_bytes(raw.numpy()), raw
        )
        self.blobs.append(blob)
        for leaf, tensor in group:
            leaf.pop("_name", None)
            leaf["tensor"] = blob.name
            leaf["view"] = {
                "byte_offset": tensor.storage_offset() * tensor.element_size() - lo,
                "stride": list(tensor.stride()),
            }

    def _torch_blob(self, tensor: Any, name: str) -> Blob:
        import torch

        form = TORCH_DTYPES[str(tensor.dtype).removeprefix("torch.")]
        data = tensor.detach()
        if data.is_conj():
            data = data.resolve_conj()
        if data.is_neg():
            data = data.resolve_neg()
        data = data.cpu().contiguous()  # no copy for a contiguous CPU tensor: we write from its memory
        flat = data.reshape(-1).view(torch.uint8) if data.numel() else torch.empty(0, dtype=torch.uint8)
        blob = Blob(
            self._unique(name),
            form.code,
            _stored_shape(tuple(data.shape), form),
            _numpy_bytes(flat.numpy()),
            data,
            version_key(tensor) if not (tensor.is_conj() or tensor.is_neg()) else None,
        )
        self.blobs.append(blob)
        return blob


def _byte_range(t: Any) -> tuple[int, int]:
    """The bytes of its storage a tensor can reach: [first, last + 1), empty for no elements."""
    size = t.element_size()
    start = t.storage_offset() * size
    if t.numel() == 0:
        return start, start
    return start, start + (sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) + 1) * size


def _overlap_clusters(group: list[tuple[dict[str, Any], Any]]) -> list[list[tuple[dict[str, Any], Any]]]:
    """Splits tensors of one storage into clusters whose byte ranges overlap.

    Only overlapping tensors alias each other; the rest merely share an allocation (every tensor
    of ``safetensors.load_file`` or torch.load with ``mmap=True`` lives in one file-sized storage) and
    are stored as independent tensors. Each cluster keeps the state's order for naming.
    """
    if len(group) == 1:
        return [group]
    order = {id(leaf): i for i, (leaf, _) in enumerate(group)}
    singles: list[list[tuple[dict[str, Any], Any]]] = []  # empty tensors alias nothing
    clusters: list[list[tuple[dict[str, Any], Any]]] = []
    end = -1
    for item in sorted(group, key=lambda lt: _byte_range(lt[1])):
        lo, hi = _byte_range(item[1])
        if hi == lo:
            singles.append([item])
        elif clusters and lo < end:
            clusters[-1].append(item)
            end = max(end, hi)
        else:
            clusters.append([item])
            end = hi
    clusters += singles
    return [sorted(c, key=lambda lt: order[id(lt[0])]) for c in clusters]


def _covering_span(group: list[tuple[dict[str, Any], Any]]) -> tuple[int, int] | None:
    """The byte range of the storage all views touch, or None when their offsets misalign."""
    ranges = [_byte_range(t) for _, t in group]
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    if any((start - lo) % t.element_size() for (start, _), (_, t) in zip(ranges, group, strict=True)):
        return None
    return lo, hi


class BlobReader:
    """The loading side: turns leaf nodes back into arrays/tensors from raw blob bytes.

    ``fetch(name)`` returns a blob's stored bytes as a fresh uint8 numpy array (digest checked by the
    caller's policy). Blobs are fetched once and shared by every leaf that references them.
    """

    def __init__(
        self, fetch: Callable[[str], np.ndarray], map_location: Any = "cpu", max_leaf_bytes: int | None = None
    ) -> None:
        self._fetch = fetch
        self._map_location = map_location
        self.max_leaf_bytes = max_leaf_bytes  # logical bytes one returned tensor may claim
        self._numpy: dict[str, np.ndarray] = {}
        self._torch: dict[tuple[str, str], Any] = {}

    def _bytes(self, name: Any) -> np.ndarray:
        if not isinstance(name, str):
            raise TreeDecodeError("leaf must name its tensor")
        data = self._numpy.get(name)
        if data is None:
            data = self._numpy[name] = self._fetch(name)
        return data

    def decode_leaf(self, node: dict[str, Any], path: str) -> Any:
        tag = node["t"]
        if tag == "ndarray":
            return self._numpy_leaf(node, path)
        import torch  # a checkpoint holding torch objects needs torch to load them

        if tag == "torch.dtype":
            return torch_dtype(node.get("v"), path)
        if tag == "torch.device":
            text = node.get("v")
            if not isinstance(text, str) or not _DEVICE_RE.match(text):
                raise TreeDecodeError(f"{path}: bad device {str(text)[:30]!r}")
            return torch.device(text)
        if tag == "torch.Size":
            dims = node.get("v")
            if not isinstance(dims, list) or not all(type(d) is int for d in dims):
                raise TreeDecodeError(f"{path}: torch.Size needs integers")
            return torch.Size(dims)
        return self._torch_leaf(node, path)

    def _numpy_leaf(self, node: dict[str, Any], path: str) -> Any:
        dtype = parse_numpy_dtype(node.get("dtype"))  # type: ignore[arg-type]
        shape = shape_of(node, path)
        expected = numel(shape) * dtype.itemsize  # Python ints: a hostile shape cannot wrap around
        raw = self._bytes(node.get("tensor"))
        stored = dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype
        if raw.nbytes != expected:
            raise TreeDecodeError(f"{path}: {raw.nbytes} stored bytes, dtype and shape need {expected}")
        array = raw.view(stored).reshape(shape) if raw.nbytes else np.empty(shape, dtype=stored)
        return array.astype(dtype) if stored != dtype else array

    def _torch_leaf(self, node: dict[str, Any], path: str) -> Any:
        import torch

        if node.get("dtype") not in TORCH_DTYPES:
            raise TreeDecodeError(f"{path}: tensor dtype {str(node.get('dtype'))[:30]!r} has no stored form")
        dtype = torch_dtype(node.get("dtype"), path)
        shape = shape_of(node, path)
        itemsize = dtype.itemsize  # torch >= 2.1; no tensor made per leaf
        device = self._device_for(node, path)
        base = self._base(node.get("tensor"), device)
        view = node.get("view")
        if view is None:
            expected = itemsize * numel(shape)
            if base.numel() != expected:
                raise TreeDecodeError(f"{path}: {base.numel()} stored bytes, dtype and shape need {expected}")
            tensor = (
                base.view(dtype).reshape(shape)
                if expected
                else torch.empty(shape, dtype=dtype, device=device)
            )
        else:
            # A view allocates nothing here, but whoever uses it may (a stride-0 view of 4 bytes can
            # claim a TiB): every view handed out is one the cap would let its user materialise.
            checked_view(view, itemsize, shape, base.numel(), path)
            leaf_nbytes_check(itemsize * numel(shape), self.max_leaf_bytes, path)
            tensor = _strided_view(base, dtype, itemsize, shape, view, path)
        if node.get("parameter") is True:
            return torch.nn.Parameter(tensor, requires_grad=bool(node.get("requires_grad", False)))
        if node.get("requires_grad") is True:
            tensor.requires_grad_(True)
        return tensor

    def _device_for(self, node: dict[str, Any], path: str) -> Any:
        import torch

        location = self._map_location
        if location is None:
            text = node.get("device")
            if not isinstance(text, str) or not _DEVICE_RE.match(text):
                raise TreeDecodeError(f"{path}: bad device")
            return torch.device(text)
        if isinstance(location, dict):
            text = node.get("device")
            return torch.device(location.get(text, text) if isinstance(text, str) else "cpu")
        return torch.device(location)

    def _base(self, name: Any, device: Any) -> Any:
        import torch

        key = (str(name), str(device))
        base = self._torch.get(key)
        if base is None:
            base = torch.from_numpy(self._bytes(name))
            if device.type != "cpu":
                base = base.to(device)
            self._torch[key] = base
        return base


def _strided_view(base: Any, dtype: Any, itemsize: int, shape: tuple[int, ...], view: Any, path: str) -> Any:
    """A view into a shared byte span, bounds-checked before ``as_strided`` touches memory."""
    offset, stride = checked_view(view, itemsize, shape, base.numel(), path)
    usable = base.numel() - base.numel() % itemsize
    typed = base[:usable].view(dtype)
    return typed.as_strided(shape, stride, offset // itemsize)


_TORCH_DTYPES_BY_NAME: dict[str, Any] = {}


def torch_dtype(name: Any, path: str) -> Any:
    """A torch dtype from its name via an explicit table — never ``getattr`` on untrusted text."""
    import torch

    if not _TORCH_DTYPES_BY_NAME:
        for value in vars(torch).values():
            if isinstance(value, torch.dtype):
                _TORCH_DTYPES_BY_NAME[str(value).removeprefix("torch.")] = value
    dtype = _TORCH_DTYPES_BY_NAME.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise TreeDecodeError(f"{path}: unknown torch dtype {str(name)[:30]!r}")
    return dtype


def version_key(tensor: Any) -> tuple[Any, ...]:
    """What must be equal for a torch tensor to be unchanged since it was last saved."""
    return (
        weakref.ref(tensor.untyped_storage()),  # equal only while it is the same, living storage
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        str(tensor.dtype),
        tensor._version,
    )
