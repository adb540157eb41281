"""A lazy, read-only view of a checkpoint: reads the manifest on open, tensors only when asked.

Opening checks the whole encoded tree with the same strict rules as ``load`` (unknown fields,
duplicate or hash-flooding keys, depth and node limits, shapes and views against the stored sizes)
without reading a tensor, so the lazy and the eager reader accept exactly the same trees.
Indexing then walks the tree; a container comes back as another lazy node and a leaf is decoded on
the spot. A tensor is read into fresh memory and returned only after its file's header was
decoded and cross-checked against the manifest (once per file, as ``load`` does, so both readers
refuse the same files: ``CheckpointReader.data_start``), its byte range was bounded by the file's
size and its digest checked: exactly the verified bytes, unaffected by later changes to the file.
``mmap=True`` instead returns zero-copy views of private copy-on-write maps (see
:func:`ckptvault.open` for what that gives up). Every tensor read is charged to the view's byte
budget (:mod:`.budget`) before it is allocated.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from ..errors import CorruptCheckpointError
from ..format.tree import TreeDecodeError, TreeDecoder, shared_leaves
from ..storage.base import Storage
from ..types import CheckpointInfo, TensorEntry
from .arrays import BlobReader
from .budget import ByteBudget
from .checkpoint_info import info_from_manifest
from .leaves import LeafChecker, stored_nbytes_of
from .reader import CheckpointReader


class CheckpointView:
    """``with ckptvault.open(path) as ck: ck["model"]["fc.weight"]`` — see :func:`ckptvault.open`."""

    def __init__(
        self,
        storage: Storage,
        path: str,
        *,
        map_location: Any = "cpu",
        verify: bool = True,
        mmap: bool = False,
        max_bytes: int | None = None,
    ) -> None:
        self._reader = CheckpointReader(storage, path)
        self._verify = verify
        self._mmap = mmap
        self._max_bytes = max_bytes
        self._budget: ByteBudget | None = None
        self._blobs = BlobReader(self._fetch, map_location)
        try:
            self._reader.decode_tree(LeafChecker(stored_nbytes_of(self._reader.manifest)))
        except TreeDecodeError as exc:
            self._reader.close()
            raise CorruptCheckpointError(
                f"state tree: {exc}", path=path, file="manifest.json", kind="bad-manifest"
            ) from exc
        except BaseException:
            self._reader.close()
            raise
        self._shared = _SharedLeaves(self._reader.manifest.tree)
        self.path = path

    def stored_bytes(self) -> int:
        """Bytes the checkpoint really holds on storage (see :mod:`.budget`)."""
        return self._reader.stored_bytes()

    def budget(self) -> ByteBudget:
        """This view's byte budget, computed at the first tensor read (file and chunk sizes)."""
        if self._budget is None:
            self._budget = self._reader.budget(self._max_bytes)
            self._blobs.max_leaf_bytes = self._budget.limit
        return self._budget

    # -- context manager ------------------------------------------------------------------
    def __enter__(self) -> CheckpointView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._reader.close()

    # -- facts without tensor I/O -----------------------------------------------------------
    @property
    def info(self) -> CheckpointInfo:
        return info_from_manifest(self.path, self._reader.manifest, self.metadata)

    @property
    def metadata(self) -> dict[str, Any]:
        return self._reader.decode_metadata()

    @property
    def manifest(self) -> Any:
        return self._reader.manifest

    def tensor_names(self) -> list[str]:
        """Names of the stored tensors (the keys inside the safetensors files)."""
        return list(self._reader.manifest.tensors)

    # -- lazy tree access -------------------------------------------------------------------
    @property
    def root(self) -> LazyNode | Any:
        return self._wrap(self._reader.manifest.tree, "state")

    def __getitem__(self, key: Any) -> Any:
        root = self.root
        if not isinstance(root, LazyNode):
            raise TypeError("the saved state is not a container")
        return root[key]

    def keys(self) -> list[Any]:
        root = self.root
        return root.keys() if isinstance(root, LazyNode) else []

    def load(self) -> Any:
        """The whole state, decoded (tensors read one by one through the view's maps)."""
        return decode_node(self, self._reader.manifest.tree, "state")

    def _wrap(self, node: Any, path: str) -> Any:
        if isinstance(node, dict) and node.get("t") in ("dict", "odict"):
            return LazyNode(self, node, path)
        if isinstance(node, list):
            return LazyNode(self, node, path)
        return decode_node(self, node, path)

    def _fetch(self, name: str) -> np.ndarray:
        # Fresh memory by default (stays valid and unchanged after close()); the caller's BlobReader
        # caches it, so each stored tensor is charged once.
        entry = self._reader.manifest.entry(name)
        if entry is not None and (
            not isinstance(entry, TensorEntry) or entry.chunks is not None or not self._mmap
        ):
            self.budget().charge(entry.nbytes, f"reading tensor {name[:80]!r}")
        return self._reader.fetch(name, verify=self._verify, mapped=self._mmap, all_cores=True)


def decode_node(view: CheckpointView, node: Any, path: str) -> Any:
    """Decodes one encoded node of ``view``'s tree, reading the tensors it references."""
    view.budget()
    try:
        return TreeDecoder(view._blobs, view._shared).decode(node, path)
    except TreeDecodeError as exc:
        raise CorruptCheckpointError(
            f"state tree: {exc}", path=view.path, file="manifest.json", kind="bad-manifest"
        ) from exc


class _SharedLeaves(Mapping[int, dict[str, Any]]):
    """The tree's shared leaves by id, found on first use: a walk of the whole tree (~0.2 s at 50,000
    tensors here) that reading a subtree whose references resolve inside it never needs. Their ids
    were already checked by the full decode at open."""

    def __init__(self, tree: Any) -> None:
        self._tree = tree
        self._found: dict[int, dict[str, Any]] | None = None

    def _all(self) -> dict[int, dict[str, Any]]:
        if self._found is None:
            self._found = shared_leaves(self._tree)
        return self._found

    def __getitem__(self, ident: int) -> dict[str, Any]:
        return self._all()[ident]

    def __iter__(self) -> Iterator[int]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


class LazyNode:
    """A dict or list inside a checkpoint, not yet decoded."""

    def __init__(self, view: CheckpointView, node: Any, path: str) -> None:
        self._view = view
        self._node = node
        self.path = path

    def _items(self) -> list[tuple[Any, Any]]:
        node = self._node
        if isinstance(node, list):
            return list(enumerate(node))
        if "v" in node and isinstance(node["v"], dict):
            return list(node["v"].items())
        # The same rules as a full decode, and the same typed error: hostile items never escape as
        # TypeError (not a pair) or TreeDecodeError (a bad key node).
        try:
            items = node.get("items")
            if not isinstance(items, list) or not all(isinstance(p, list) and len(p) == 2 for p in items):
                raise TreeDecodeError(f"{self.path}: dict items must be [key, value] pairs")
            decoder = TreeDecoder(self._view._blobs, self._view._shared)
            return [(decoder.decode(k, f"{self.path}.<key>"), v) for k, v in items]
        except TreeDecodeError as exc:
            raise CorruptCheckpointError(
                f"state tree: {exc}", path=self._view.path, file="manifest.json", kind="bad-manifest"
            ) from exc

    def keys(self) -> list[Any]:
        return [k for k, _ in self._items()]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._items())

    def __contains__(self, key: object) -> bool:
        return any(k == key for k, _ in self._items())

    def __getitem__(self, key: Any) -> Any:
        node = self._node
        if type(key) is str and type(node) is dict and type(node.get("v")) is dict:
            # A plain dict node (string keys, checked at open): one lookup, not a scan of every item
            # (a model of 50,000 tensors would otherwise scan them all for each access).
            if key not in node["v"]:
                raise KeyError(key)
            return self._view._wrap(node["v"][key], f"{self.path}[{key!r}]")
        for k, child in self._items():
            if k == key and type(k) is type(key):
                return self._view._wrap(child, f"{self.path}[{key!r}]")
        raise KeyError(key)

    def load(self) -> Any:
        """This subtree, fully decoded."""
        return decode_node(self._view, self._node, self.path)

    def __repr__(self) -> str:
        return f"<LazyNode {self.path} ({len(self)} entries)>"
