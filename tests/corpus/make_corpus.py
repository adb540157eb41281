#!/usr/bin/env python3
"""Generates the hostile input corpus in ``tests/corpus/cases`` and its ``index.json``.

Why a generator and checked-in files both: the files are what an attacker would hand us (a reader
is tested against bytes on disk, not against the writer's idea of them), and the script is how a
reviewer sees what each file is and regenerates it after a deliberate format change. Every case is
built from scratch with the standard library, ``blake3``, and hand-assembled zstd/LZ4/pickle/zip
bytes -- never with ``ckptvault.save`` -- so the corpus does not drift when the writer changes,
and regenerating it gives identical bytes (no clocks, no randomness, fixed checkpoint ids).

Usage::

    python tests/corpus/make_corpus.py            # rewrite tests/corpus/cases and index.json
    python tests/corpus/make_corpus.py --check    # exit 1 if the checked-in corpus is stale

Things git cannot hold portably are *materialised* at test time from ``index.json``: symlinks
(git can store them, but not every checkout keeps them, and an absolute one like ``/dev/zero``
should never be created by cloning), FIFOs, empty directories and a sparse 256 MiB manifest. Every
file over 16 KiB is checked in xz-compressed and decompressed at test time (``.xz`` dropped): that
keeps the 100,000-entry header (5.7 MB), the 1 MiB integer node and the 10,000-deep trees in a few
KB each. ``--check`` compares those by content, because another liblzma may compress the same
bytes differently.

Each case is a directory ``cases/<name>/``; ``index.json`` lists for it what it attacks, the API
to apply (``load``, ``verify``, ``open``, ``info``, ``import_legacy``, ``load_model`` or
``catalog``), the path inside the case to apply it to and the expected outcome (``error`` with the expected
``CheckpointError`` subclass, ``ok``, ``not-ok`` for a verify report, or ``skipped`` for a
checkpoint the catalog must leave out). ``tests/corpus/run_cases.py`` applies them.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import shutil
import struct
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3

HERE = Path(__file__).resolve().parent
CASES = "cases"
INDEX = "index.json"

ID_A = "c0ffee00" * 4
ID_B = "decade00" * 4
ID_C = "0123abcd" * 4
CREATED = "2026-01-01T00:00:00.000000+00:00"
DATA = "data-00000.safetensors"
MANIFEST = "manifest.json"
MARKER = "CORPUS_PWNED_MARKER"  # what a malicious pickle tries to create; it must never appear
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_BIGINT_HEX_DIGITS = 1 << 20
XZ_ABOVE = 16 * 1024  # files larger than this are checked in xz-compressed (module docstring)


# -- format primitives (docs/format.md §3, §5, §11), written out independently of ckptvault ------
def digest(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def data_file_digest(size: int, header_digest: str, tensor_digests: list[str]) -> str:
    text = f"ckptvault-data-file-v1\n{size}\n{header_digest}\n" + "\n".join(tensor_digests)
    return digest(text.encode())


def chunked_tensor_digest(nbytes: int, chunk_digests: list[str]) -> str:
    return digest((f"ckptvault-chunked-tensor-v1\n{nbytes}\n" + "\n".join(chunk_digests)).encode())


def header_bytes(header: Any = None, *, body: bytes | None = None, prefix: int | None = None) -> bytes:
    """Length prefix + JSON header padded with spaces to 64-byte alignment (as the writer does)."""
    if body is None:
        body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * ((-(8 + len(body))) % 64)
    return struct.pack("<Q", len(body) if prefix is None else prefix) + body


def zstd_rle_frame(size: int, byte: int, *, declared: int | None = None) -> bytes:
    """A zstd frame of one RLE block: ``size`` copies of ``byte`` (RFC 8878 §3.1.1).

    Single-segment, with an 8-byte frame content size so a case can make it lie (``declared``).
    """
    fhd = 0b11_1_0_0_0_00  # FCS field 8 bytes, single segment, no checksum, no dictionary
    block = (1 | (1 << 1) | (size << 3)).to_bytes(3, "little")  # last block, type RLE
    content = size if declared is None else declared
    return b"\x28\xb5\x2f\xfd" + bytes([fhd]) + struct.pack("<Q", content) + block + bytes([byte])


def lz4_run_block(size: int, byte: int) -> bytes:
    """An LZ4 block decoding to ``size`` copies of ``byte``: one literal, one long match at offset 1,
    five closing literals (the format's end-of-block rules)."""
    match = size - 6 - 4
    token = (1 << 4) | 15
    extra = match - 15
    block = bytes([token, byte]) + b"\x01\x00" + b"\xff" * (extra // 255) + bytes([extra % 255])
    return block + bytes([5 << 4]) + bytes([byte]) * 5


def frame(
    raw_len: int, itemsize: int, planes: list[tuple[int, bytes]], *, stored: list[int] | None = None
) -> bytes:
    """A ckptvault chunk frame (§11.3); ``stored`` overrides the plane table's lengths (lies)."""
    head = struct.pack("<4sBBBBQ", b"CKVC", 1, itemsize, len(planes), 0, raw_len)
    lengths = stored if stored is not None else [len(p) for _, p in planes]
    table = b"".join(struct.pack("<BQ", m, n) for (m, _), n in zip(planes, lengths, strict=True))
    return head + table + b"".join(p for _, p in planes)


def pickle_str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def pickle_call(module: str, name: str, *args: str) -> bytes:
    """Pickle opcodes calling ``module.name(*args)`` on load (GLOBAL + TUPLE + REDUCE): what a
    ``__reduce__`` returning ``(os.system, ("...",))`` pickles to, written by hand so the bytes do not
    depend on the platform's module names."""
    return f"c{module}\n{name}\n".encode() + b"(" + b"".join(pickle_str(a) for a in args) + b"tR"


def torch_zip(records: list[tuple[str, bytes]]) -> bytes:
    """A torch.save zip archive (stored, fixed timestamps: deterministic)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in records:
            info = zipfile.ZipInfo(f"archive/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def legit_tensor_pickle(numel: int = 4, storage_numel: int | None = None) -> bytes:
    """``{"w": torch.arange(numel, dtype=float32)}`` as torch.save pickles it (protocol 2)."""
    n = numel if storage_numel is None else storage_numel

    def integer(v: int) -> bytes:
        return b"K" + bytes([v]) if v < 256 else b"J" + struct.pack("<i", v)

    storage = b"(" + pickle_str("storage") + b"ctorch\nFloatStorage\n" + pickle_str("0") + pickle_str("cpu")
    storage += integer(n) + b"tQ"  # BINPERSID
    args = storage + b"K\x00" + integer(numel) + b"\x85" + b"K\x01\x85" + b"\x89"
    args += b"ccollections\nOrderedDict\n)R"
    return b"\x80\x02}(" + pickle_str("w") + b"ctorch._utils\n_rebuild_tensor_v2\n(" + args + b"tRu."


def pickle_long(value: int) -> bytes:
    """LONG1: an integer of any size (BININT holds only 32 bits)."""
    n = (value.bit_length() + 8) // 8
    return b"\x8a" + bytes([n]) + value.to_bytes(n, "little", signed=True)


def expanded_tensor_pickle(numel: int) -> bytes:
    """``{"w": torch.zeros(1).expand(numel)}`` as torch.save pickles it: one stored float, stride 0."""
    storage = b"(" + pickle_str("storage") + b"ctorch\nFloatStorage\n" + pickle_str("0") + pickle_str("cpu")
    storage += pickle_long(1) + b"tQ"
    args = storage + b"K\x00" + pickle_long(numel) + b"\x85" + b"K\x00\x85" + b"\x89"
    args += b"ccollections\nOrderedDict\n)R"
    return b"\x80\x02}(" + pickle_str("w") + b"ctorch._utils\n_rebuild_tensor_v2\n(" + args + b"tRu."


def shared_list_bomb_pickle(levels: int, fanout: int) -> bytes:
    """A list holding the previous level's list ``fanout`` times, ``levels`` deep, through pickle's
    memo (BINPUT/BINGET): a few KB that stand for ``fanout ** levels`` paths."""
    out = b"\x80\x02]q\x00"
    for i in range(1, levels + 1):
        out += b"]q" + bytes([i]) + b"(" + (b"h" + bytes([i - 1])) * fanout + b"e"
    return out + b"."


def zstd_rle_frame_long(size: int, byte: int) -> bytes:
    """A zstd frame of ``size`` copies of ``byte`` in RLE blocks of 128 KiB (the format's maximum)."""
    fhd = 0b11_1_0_0_0_00
    block = 128 * 1024
    out = b"\x28\xb5\x2f\xfd" + bytes([fhd]) + struct.pack("<Q", size)
    for start in range(0, size, block):
        n = min(block, size - start)
        last = 1 if start + n == size else 0
        out += (last | (1 << 1) | (n << 3)).to_bytes(3, "little") + bytes([byte])
    return out


def zeros_digest(size: int) -> str:
    hasher = blake3.blake3()
    step = bytes(1 << 20)
    for start in range(0, size, len(step)):
        hasher.update(step[: min(len(step), size - start)])
    return hasher.hexdigest()


def legacy_records(pkl: bytes, data: bytes | None = None) -> list[tuple[str, bytes]]:
    records = [("data.pkl", pkl), ("byteorder", b"little")]
    if data is not None:
        records.append(("data/0", data))
    return [*records, ("version", b"3\n")]


# -- building a case -----------------------------------------------------------------------------
class CaseWriter:
    """Writes one case's files and records what must be materialised at test time."""

    def __init__(self, root: Path, *, compress: bool = True) -> None:
        self.root = root
        self.compress = compress  # --check skips the slow xz step and compares contents
        self.materialize: list[dict[str, Any]] = []

    def write(self, rel: str, data: bytes | str) -> None:
        """Writes a file of the case; one over ``XZ_ABOVE`` bytes is stored xz-compressed."""
        raw = data.encode() if isinstance(data, str) else data
        if len(raw) > XZ_ABOVE:
            self.write_xz(rel, raw)
            return
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw)

    def write_xz(self, rel: str, data: bytes) -> None:
        """Stored compressed; the test decompresses it to ``rel`` (see the module docstring)."""
        path = self.root / (rel + ".xz")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(lzma.compress(data, preset=9) if self.compress else data)

    def symlink(self, rel: str, to: str) -> None:
        self.materialize.append({"kind": "symlink", "path": rel, "to": to})

    def fifo(self, rel: str) -> None:
        self.materialize.append({"kind": "fifo", "path": rel})

    def directory(self, rel: str) -> None:
        self.materialize.append({"kind": "dir", "path": rel})

    def sparse(self, rel: str, size: int, head: bytes) -> None:
        self.materialize.append({"kind": "sparse", "path": rel, "size": size, "head": head.decode()})


def _floats(n: int, start: float) -> bytes:
    return struct.pack(f"<{n}f", *(start + i for i in range(n)))


class Ckpt:
    """A small valid checkpoint (two tensors, a dict tree) and consistent rewrites of it.

    ``write`` recomputes every size and digest the manifest records from whatever header and data
    it is given, so that a case breaks exactly one rule and only the check aimed at that rule can
    catch it (the same construction as tests/faults/test_hostile.py, but frozen into files).
    """

    def __init__(self, checkpoint_id: str = ID_A, seed: int = 0, step: int = 1) -> None:
        self.checkpoint_id = checkpoint_id
        self.step = step
        b = struct.pack("<8q", *(seed * 100 + i for i in range(8)))
        a = _floats(16, float(seed))
        self.header: dict[str, Any] = {
            "__metadata__": {"format": "ckptvault", "checkpoint_id": checkpoint_id},
            "b": {"dtype": "I64", "shape": [8], "data_offsets": [0, 64]},
            "a": {"dtype": "F32", "shape": [16], "data_offsets": [64, 128]},
        }
        self.data = b + a
        self.tree: Any = {
            "t": "dict",
            "v": {
                "a": {"t": "ndarray", "tensor": "a", "dtype": "<f4", "shape": [16]},
                "b": {"t": "ndarray", "tensor": "b", "dtype": "<i8", "shape": [8]},
                "n": 3,
            },
        }
        self.metadata: Any = {"t": "dict", "v": {"step": step}}
        self.extra_files: dict[str, bytes] = {}

    def manifest_doc(
        self, raw: bytes, body: bytes, header: Any, data: bytes, *, sync: bool = True
    ) -> dict[str, Any]:
        tensors: dict[str, Any] = {}
        for name, entry in self.header.items():
            if name == "__metadata__":
                continue
            h = header.get(name, entry) if sync and isinstance(header, dict) else entry
            lo, hi = h["data_offsets"] if isinstance(h.get("data_offsets"), list) else entry["data_offsets"]
            piece = (
                data[lo:hi]
                if isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= len(data)
                else b""
            )
            tensors[name] = {
                "file": DATA,
                "dtype": h["dtype"],
                "shape": h["shape"],
                "offsets": h["data_offsets"],
                "digest": digest(piece),
            }
        header_digest = digest(body)
        try:
            parts = sorted(tensors.values(), key=lambda t: tuple(t["offsets"]))
        except TypeError:  # offsets a case made non-numeric: any order will do, the header is refused
            parts = list(tensors.values())
        files: dict[str, Any] = {
            DATA: {
                "size": len(raw),
                "digest": data_file_digest(len(raw), header_digest, [t["digest"] for t in parts]),
                "header_size": len(body),
                "header_digest": header_digest,
            }
        }
        for name, content in self.extra_files.items():
            files[name] = {"size": len(content), "digest": digest(content)}
        return {
            "format": "ckptvault",
            "schema_version": 1,
            "checkpoint_id": self.checkpoint_id,
            "created_at": CREATED,
            "step": self.step,
            "digest_algorithm": "blake3",
            "required_features": [],
            "files": files,
            "tensors": tensors,
            "tree": self.tree,
            "metadata": self.metadata,
        }

    def build(
        self,
        *,
        header: Any = None,
        body: bytes | None = None,
        data: bytes | None = None,
        prefix: int | None = None,
        sync: bool = True,
    ) -> tuple[bytes, dict[str, Any]]:
        """The data file's bytes and a manifest that agrees with them."""
        header = self.header if header is None else header
        data = self.data if data is None else data
        head = header_bytes(header, body=body, prefix=prefix)
        raw = head + data
        padded_body = head[8:]
        return raw, self.manifest_doc(raw, padded_body, header if body is None else {}, data, sync=sync)

    def write(
        self,
        w: CaseWriter,
        at: str = "ckpt",
        *,
        doc_hook: Callable[[dict[str, Any]], None] | None = None,
        text_hook: Callable[[str], str] | None = None,
        raw_hook: Callable[[bytes], bytes] | None = None,
        xz_data: bool = False,
        **build: Any,
    ) -> None:
        raw, doc = self.build(**build)
        if doc_hook is not None:
            doc_hook(doc)
        text = json.dumps(doc, indent=1) + "\n"
        if text_hook is not None:
            text = text_hook(text)
        if raw_hook is not None:
            raw = raw_hook(raw)
        if xz_data:
            w.write_xz(f"{at}/{DATA}", raw)
        else:
            w.write(f"{at}/{DATA}", raw)
        for name, content in self.extra_files.items():
            w.write(f"{at}/{name}", content)
        w.write(f"{at}/{MANIFEST}", text)


def replace_once(text: str, old: str, new: str) -> str:
    if old not in text:
        raise AssertionError(f"{old!r} not in the manifest text")
    return text.replace(old, new, 1)


def with_tree(tree_text: str) -> Callable[[str], str]:
    """A text hook putting raw JSON text (duplicate keys, huge literals...) in place of the tree."""

    def hook(text: str) -> str:
        doc = json.loads(text)
        doc["tree"] = "@@TREE@@"
        return json.dumps(doc, indent=1).replace('"@@TREE@@"', tree_text) + "\n"

    return hook


def with_metadata(meta: Any) -> Callable[[dict[str, Any]], None]:
    def hook(doc: dict[str, Any]) -> None:
        doc["metadata"] = meta

    return hook


# -- chunked checkpoints (incremental saves: RUN/step_N + RUN/.ckptvault-store) -----------------
CHUNK = 4096


def chunk_path(digest_hex: str, codec: str) -> str:
    return f".ckptvault-store/chunks/{digest_hex[:2]}/{digest_hex}.{codec}"


class Chunked:
    """A valid chunked checkpoint: one F32 tensor of 4 chunks stored raw, as a one-plane zstd frame,
    as a four-plane (byte-shuffled) zstd frame and as an LZ4 frame."""

    def __init__(self) -> None:
        one = struct.pack("<f", 1.0)
        self.raw_chunks = [
            _floats(CHUNK // 4, 0.0),
            bytes(CHUNK),
            one * (CHUNK // 4),
            b"\x3f" * CHUNK,
        ]
        planes = [zstd_rle_frame(CHUNK // 4, one[i]) for i in range(4)]
        self.stored = [
            (self.raw_chunks[0], "raw"),
            (frame(CHUNK, 1, [(1, zstd_rle_frame(CHUNK, 0))]), "zstd"),
            (frame(CHUNK, 4, [(1, p) for p in planes]), "zstd"),
            (frame(CHUNK, 1, [(2, lz4_run_block(CHUNK, 0x3F))]), "lz4"),
        ]
        self.refs = [
            [digest(raw), CHUNK, len(stored), codec]
            for raw, (stored, codec) in zip(self.raw_chunks, self.stored, strict=True)
        ]

    def doc(self) -> dict[str, Any]:
        nbytes = sum(r[1] for r in self.refs)
        return {
            "format": "ckptvault",
            "schema_version": 1,
            "checkpoint_id": ID_A,
            "created_at": CREATED,
            "step": 1,
            "digest_algorithm": "blake3",
            "required_features": ["chunked-tensors"],
            "files": {},
            "tensors": {
                "w": {
                    "dtype": "F32",
                    "shape": [nbytes // 4],
                    "digest": chunked_tensor_digest(nbytes, [r[0] for r in self.refs]),
                    "chunks": self.refs,
                }
            },
            "tree": {
                "t": "dict",
                "v": {"w": {"t": "ndarray", "tensor": "w", "dtype": "<f4", "shape": [nbytes // 4]}},
            },
            "metadata": {"t": "dict", "v": {"step": 1}},
        }

    def write(
        self,
        w: CaseWriter,
        *,
        stored: dict[int, bytes] | None = None,
        doc_hook: Callable[[dict[str, Any]], None] | None = None,
        skip: tuple[int, ...] = (),
    ) -> None:
        """Writes run/step_1 and the store; ``stored`` replaces chunk files' bytes (the manifest keeps
        the sizes it had unless ``doc_hook`` changes them)."""
        stored = stored or {}
        for i, (ref, (content, codec)) in enumerate(zip(self.refs, self.stored, strict=True)):
            if i not in skip:
                w.write(f"run/{chunk_path(ref[0], codec)}", stored.get(i, content))
        doc = self.doc()
        if doc_hook is not None:
            doc_hook(doc)
        w.write(f"run/step_1/{MANIFEST}", json.dumps(doc, indent=1) + "\n")


# -- the cases -----------------------------------------------------------------------------------
REGISTRY: list[tuple[dict[str, Any], Callable[[CaseWriter], None]]] = []

CORRUPT = "CorruptCheckpointError"
UNSAFE = "UnsafeCheckpointError"
INCOMPATIBLE = "IncompatibleCheckpointError"
NOT_FOUND = "CheckpointNotFoundError"
RESOURCE = "ResourceLimitError"


def case(
    name: str,
    attacks: str,
    *,
    api: str = "load",
    expect: str = "error",
    error: str | None = CORRUPT,
    target: str = "ckpt",
    regression: str | None = None,
    max_seconds: float | None = None,
) -> Callable[[Callable[[CaseWriter], None]], Callable[[CaseWriter], None]]:
    """Registers a case. ``regression`` names the bug the case found (fixed in that function);
    ``max_seconds`` replaces the default per-call time bound where the cost is meant to be linear in
    a big input rather than constant."""

    def register(fn: Callable[[CaseWriter], None]) -> Callable[[CaseWriter], None]:
        entry: dict[str, Any] = {
            "name": name,
            "attacks": attacks,
            "api": api,
            "target": target,
            "expect": expect,
        }
        if expect == "error":
            entry["error"] = error
        elif expect == "not-ok":
            entry["problem"] = error
        if regression:
            entry["regression"] = regression
        if max_seconds is not None:
            entry["max_seconds"] = max_seconds
        REGISTRY.append((entry, fn))
        return fn

    return register


def header_with(name: str, **changes: Any) -> dict[str, Any]:
    header = json.loads(json.dumps(Ckpt().header))
    header[name] = dict(header[name], **changes)
    return header


# Controls: the constructions are valid, so every failure below comes from the one thing changed.
@case("control_valid_checkpoint", "nothing: the base construction, which must load", expect="ok")
def _(w: CaseWriter) -> None:
    Ckpt().write(w)


@case(
    "control_valid_chunked",
    "nothing: the chunked base (raw, zstd 1- and 4-plane, lz4 chunks), which must load",
    expect="ok",
    target="run/step_1",
)
def _(w: CaseWriter) -> None:
    Chunked().write(w)


@case(
    "control_valid_legacy_pt",
    "nothing: a torch.save zip holding one tensor, which import_legacy must convert",
    api="import_legacy",
    expect="ok",
    target="model.pt",
)
def _(w: CaseWriter) -> None:
    w.write("model.pt", torch_zip(legacy_records(legit_tensor_pickle(), _floats(4, 0.0))))


@case(
    "tree_nested_256_lists_at_limit",
    "recursion at exactly MAX_TREE_DEPTH: must decode, not hit Python's recursion limit",
    expect="ok",
)
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=with_tree("[" * 256 + "]" * 256))


@case(
    "zero_size_tensors_sharing_offsets",
    "20 empty tensors all at one offset between two real tensors (safetensors allows it): must load",
    expect="ok",
)
def _(w: CaseWriter) -> None:
    ck = Ckpt()
    for i in range(20):
        ck.header[f"e{i}"] = {"dtype": "F32", "shape": [0, 7], "data_offsets": [64, 64]}
        ck.tree["v"][f"e{i}"] = {"t": "ndarray", "tensor": f"e{i}", "dtype": "<f4", "shape": [0, 7]}
    ck.write(w)


# Header length prefix and truncation.
@case("header_length_2_63", "8-byte header length of 2^63 (allocation bomb)")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, prefix=2**63)


@case("header_length_max_u64", "8-byte header length of 2^64-1")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, prefix=2**64 - 1)


@case("header_length_past_eof", "header length that fits the limit but runs past the end of the file")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, prefix=10_000)


@case("header_length_over_limit", "header length of MAX_HEADER_BYTES + 1 (just over the 100 MiB limit)")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, prefix=MAX_HEADER_BYTES + 1)


@case("header_length_zero", "header length 0: no header at all, data starts at byte 8")
def _(w: CaseWriter) -> None:
    ck = Ckpt()
    ck.write(
        w, doc_hook=lambda d: d["files"][DATA].update(header_size=0, header_digest=digest(b"")), prefix=0
    )


@case("header_truncated_file_cut", "data file cut inside its header; the manifest still has the old size")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, raw_hook=lambda raw: raw[:100])


@case(
    "header_truncated_manifest_agrees",
    "data file cut inside its header and the manifest rewritten to the cut size and digest",
)
def _(w: CaseWriter) -> None:
    ck = Ckpt()
    raw, _ = ck.build()
    cut = raw[:100]

    def hook(doc: dict[str, Any]) -> None:
        doc["files"][DATA].update(size=len(cut), digest=digest(cut))

    ck.write(w, doc_hook=hook, raw_hook=lambda _raw: cut)


@case(
    "header_truncated_json_consistent",
    "header JSON cut mid-object with the length prefix, sizes and digests all agreeing with the cut",
)
def _(w: CaseWriter) -> None:
    body = json.dumps(Ckpt().header, separators=(",", ":")).encode()
    Ckpt().write(w, body=body[: len(body) // 2], sync=False)


@case("header_truncated_prefix", "data file of 5 bytes: too short for the 8-byte length prefix")
def _(w: CaseWriter) -> None:
    ck = Ckpt()
    cut = b"\x10\x00\x00\x00\x00"

    def hook(doc: dict[str, Any]) -> None:
        doc["files"][DATA].update(size=len(cut), digest=digest(cut))

    ck.write(w, doc_hook=hook, raw_hook=lambda _raw: cut)


@case("header_empty_data_file", "zero-byte data file")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, raw_hook=lambda _raw: b"")


# Offsets.
@case("offsets_overlapping", "two tensors whose data_offsets overlap (aliasing one another's bytes)")
def _(w: CaseWriter) -> None:
    h = header_with("b", data_offsets=[0, 64])
    h["a"]["data_offsets"] = [32, 96]
    Ckpt().write(w, header=h, data=Ckpt().data[:96])


@case("offsets_out_of_range", "data_offsets at 2^40, far past the end of the file")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, header=header_with("a", data_offsets=[2**40, 2**40 + 64]))


@case("offsets_past_end_by_one", "a tensor whose end offset is one element past the data")
def _(w: CaseWriter) -> None:
    Ckpt().write(
        w,
        header=header_with("a", data_offsets=[68, 132]),
        data=Ckpt().data[:64] + bytes(4) + Ckpt().data[64:124],
    )


@case("offsets_reversed", "data_offsets [64, 0]: end before begin")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, header=header_with("a", data_offsets=[128, 64]), sync=False)


@case("offsets_negative", "negative data_offsets")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, header=header_with("a", data_offsets=[-64, 0]), sync=False)


@case("offsets_floats", "data_offsets as floats (64.0, 128.0) instead of integers")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, header=header_with("a", data_offsets=[64.0, 128.0]), sync=False)


@case("offsets_gap", "a gap of unaccounted bytes between two tensors")
def _(w: CaseWriter) -> None:
    d = Ckpt().data
    Ckpt().write(w, header=header_with("a", data_offsets=[72, 136]), data=d[:64] + bytes(8) + d[64:])


@case("manifest_offsets_out_of_range", "the manifest's offsets for a tensor reach 2^62")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, doc_hook=lambda d: d["tensors"]["a"].update(offsets=[64, 2**62]))


@case("manifest_header_size_2_63", "the manifest records a header size of 2^63")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, doc_hook=lambda d: d["files"][DATA].update(header_size=2**63))


# Trailing bytes and polyglots.
@case("trailing_bytes_after_data", "64 zero bytes after the last tensor, recorded in the manifest's size")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, data=Ckpt().data + bytes(64))


@case(
    "polyglot_data_file_is_also_a_zip",
    "a valid data file with a zip archive appended (readable by unzip): trailing bytes",
)
def _(w: CaseWriter) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("payload.txt", date_time=(1980, 1, 1, 0, 0, 0))
        archive.writestr(info, b"this data file is also a zip archive\n")
    Ckpt().write(w, data=Ckpt().data + buffer.getvalue())


@case(
    "polyglot_html_in_header_padding",
    "HTML in place of the header's space padding (JSON followed by markup)",
)
def _(w: CaseWriter) -> None:
    body = (
        json.dumps(Ckpt().header, separators=(",", ":")).encode() + b"<html><script>alert(1)</script></html>"
    )
    Ckpt().write(w, body=body, sync=False)


@case("polyglot_html_after_manifest", "an HTML document after the manifest's JSON")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=lambda t: t + "<!doctype html><html><body>hello</body></html>\n")


# Shapes.
@case("shape_product_overflows_int64", "shape [2^62, 2^62]: the element count overflows int64")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, header=header_with("a", shape=[2**62, 2**62]))


@case(
    "shape_product_wraps_to_count",
    "shape [7, 0x6DB6DB6DB6DB6DB7, 16]: a wrapping 64-bit product equals the real element count",
)
def _(w: CaseWriter) -> None:
    Ckpt().write(w, header=header_with("a", shape=[7, 0x6DB6DB6DB6DB6DB7, 16]))


@case("shape_product_wraps_with_zero", "huge dimensions next to a 0 (an empty tensor of absurd shape)")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, header=header_with("a", shape=[2**32, 2**32, 2**32, 2**32, 0, 2**62]))


@case("shape_65_dims", "65 dimensions (MAX_NDIM is 64)")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, header=header_with("a", shape=[1] * 64 + [16]), sync=False)


@case("shape_negative_dim", "a negative dimension")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, header=header_with("a", shape=[-16]), sync=False)


@case("shape_bool_dim", "a dimension written as true (a bool is not an integer)")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, header=header_with("a", shape=[True]), sync=False)


@case(
    "zero_size_tensor_inside_another",
    "an empty tensor placed at an offset inside another tensor's bytes",
)
def _(w: CaseWriter) -> None:
    ck = Ckpt()
    ck.header["e"] = {"dtype": "F32", "shape": [0], "data_offsets": [32, 32]}
    ck.tree["v"]["e"] = {"t": "ndarray", "tensor": "e", "dtype": "<f4", "shape": [0]}
    ck.write(w)


@case(
    "header_100000_entries",
    "a 5.7 MB header of 100,000 empty tensors the manifest does not list (parse cost bound)",
    # Parsing is linear, about 1.7 s for these 5.7 MB on the 2-core CI machine (strict JSON with a
    # duplicate-key hook, then every entry checked): bounded by size, not by a constant.
    max_seconds=6.0,
)
def _(w: CaseWriter) -> None:
    header = json.loads(json.dumps(Ckpt().header))
    for i in range(100_000):
        header[f"t{i:05d}"] = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
    Ckpt().write(w, header=header, sync=False, xz_data=True)


# Header JSON.
@case("header_duplicate_key", "a tensor named twice in the header (readers would disagree on which wins)")
def _(w: CaseWriter) -> None:
    text = json.dumps(Ckpt().header, separators=(",", ":"))
    entry = json.dumps(Ckpt().header["a"], separators=(",", ":"))
    Ckpt().write(w, body=(text[:-1] + f',"a":{entry}}}').encode())


@case("header_duplicate_metadata_key", "__metadata__ with checkpoint_id twice (a foreign id second)")
def _(w: CaseWriter) -> None:
    text = json.dumps(Ckpt().header, separators=(",", ":"))
    Ckpt().write(
        w,
        body=text.replace(
            f'"checkpoint_id":"{ID_A}"', f'"checkpoint_id":"{ID_A}","checkpoint_id":"{ID_B}"'
        ).encode(),
    )


@case("header_nested_100000_lists", "a header of 100,000 nested lists (parser recursion)")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, body=b"[" * 100_000 + b"]" * 100_000, sync=False)


@case("header_nested_10000_dicts", "a header of 10,000 nested objects (parser recursion)")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, body=b'{"a":' * 10_000 + b"1" + b"}" * 10_000, sync=False)


@case("header_not_an_object", "a header that is a JSON list")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, body=b"[1, 2, 3]", sync=False)


@case("header_invalid_utf8", "a header with an invalid UTF-8 byte")
def _(w: CaseWriter) -> None:
    body = (
        json.dumps(Ckpt().header, separators=(",", ":")).encode().replace(b"ckptvault", b"ckpt\xc3vault", 1)
    )
    Ckpt().write(w, body=body, sync=False)


@case("header_utf16", "a header encoded as UTF-16 (json.loads on bytes would guess and accept it)")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, body=json.dumps(Ckpt().header).encode("utf-16"), sync=False)


@case("header_nan_token", "NaN in a header's data_offsets")
def _(w: CaseWriter) -> None:
    text = json.dumps(Ckpt().header, separators=(",", ":")).replace("[64,128]", "[64,NaN]")
    Ckpt().write(w, body=text.encode(), sync=False)


@case("header_gigantic_int_literal", "a 5001-digit integer (10**5000) as a data offset")
def _(w: CaseWriter) -> None:
    text = json.dumps(Ckpt().header, separators=(",", ":")).replace("[64,128]", "[64,1" + "0" * 5000 + "]")
    Ckpt().write(w, body=text.encode(), sync=False)


@case("header_metadata_not_strings", "__metadata__ values that are not strings")
def _(w: CaseWriter) -> None:
    h = json.loads(json.dumps(Ckpt().header))
    h["__metadata__"]["checkpoint_id"] = {"nested": [ID_A]}
    Ckpt().write(w, header=h)


@case("header_without_checkpoint_id", "a header without the checkpoint id (a file of unknown origin)")
def _(w: CaseWriter) -> None:
    h = json.loads(json.dumps(Ckpt().header))
    h["__metadata__"] = {"format": "ckptvault"}
    Ckpt().write(w, header=h)


@case("header_foreign_checkpoint_id", "a consistent data file whose header names another checkpoint")
def _(w: CaseWriter) -> None:
    h = json.loads(json.dumps(Ckpt().header))
    h["__metadata__"]["checkpoint_id"] = ID_B
    Ckpt().write(w, header=h)


@case("header_unknown_dtype", "dtype F128, which no reader knows")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, header=header_with("a", dtype="F128"), sync=False)


@case("header_dtype_not_a_string", "dtype given as a list")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, header=header_with("a", dtype=["F32"]), sync=False)


@case("header_empty_tensor_name", "a tensor named by the empty string")
def _(w: CaseWriter) -> None:
    h = json.loads(json.dumps(Ckpt().header))
    h[""] = h.pop("a")
    Ckpt().write(w, header=h, sync=False)


@case("header_tensor_name_too_long", "a tensor name of 1025 bytes (MAX_NAME_BYTES is 1024)")
def _(w: CaseWriter) -> None:
    h = json.loads(json.dumps(Ckpt().header))
    h["x" * 1025] = h.pop("a")
    Ckpt().write(w, header=h, sync=False)


@case("header_lists_extra_tensor", "the header lists a tensor the manifest does not")
def _(w: CaseWriter) -> None:
    h = json.loads(json.dumps(Ckpt().header))
    h["c"] = {"dtype": "U8", "shape": [0], "data_offsets": [128, 128]}
    Ckpt().write(w, header=h)


# Manifest JSON.
@case("manifest_duplicate_top_key", '"step" twice in the manifest')
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=lambda t: replace_once(t, '"step": 1,', '"step": 1,\n "step": 2,'))


@case("manifest_duplicate_tensor_key", "a tensor entry listed twice under one name")
def _(w: CaseWriter) -> None:
    def hook(text: str) -> str:
        a = json.dumps(json.loads(text)["tensors"]["a"])
        return replace_once(text, '"tensors": {', f'"tensors": {{"a": {a}, ')

    Ckpt().write(w, text_hook=hook)


@case("manifest_duplicate_key_in_tree", "a dict node of the tree with one key twice")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=with_tree('{"t": "dict", "v": {"x": 1, "x": 2}}'))


@case("manifest_gigantic_int_literal_step", "step written as a 5001-digit integer literal (10**5000)")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=lambda t: replace_once(t, '"step": 1,', '"step": 1' + "0" * 5000 + ","))


@case("manifest_gigantic_int_literal_in_tree", "a 5001-digit integer literal inside the tree")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=with_tree('{"t": "dict", "v": {"x": 1' + "0" * 5000 + "}}"))


@case(
    "manifest_gigantic_int_node",
    "an int node of MAX_BIGINT_HEX_DIGITS + 1 hex digits (a 4-Mbit integer)",
)
def _(w: CaseWriter) -> None:
    ck = Ckpt()
    raw, doc = ck.build()
    doc["tree"] = {"t": "int", "hex": "0x" + "f" * (MAX_BIGINT_HEX_DIGITS + 1)}
    w.write(f"ckpt/{DATA}", raw)
    w.write_xz(f"ckpt/{MANIFEST}", (json.dumps(doc, indent=1) + "\n").encode())


@case(
    "manifest_float_overflows_to_inf",
    "a finite-looking literal 1e400 in the tree: JSON parsers turn it into Infinity (or keep it exact)",
    regression="format/strictjson.py loads: 1e400 parsed to inf, accepted, and broke Manifest.to_json",
)
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=with_tree('{"t": "dict", "v": {"x": 1e400, "y": -1e400}}'))


@case("manifest_nan_token", "NaN for the step")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=lambda t: replace_once(t, '"step": 1,', '"step": NaN,'))


@case("manifest_infinity_in_tree", "-Infinity inside the tree")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=with_tree('{"t": "dict", "v": {"x": -Infinity}}'))


@case("manifest_empty", "an empty manifest.json")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=lambda _t: "")


@case("manifest_not_an_object", "a manifest that is a JSON list")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=lambda _t: "[]\n")


@case("manifest_invalid_utf8", "a manifest with an invalid UTF-8 byte")
def _(w: CaseWriter) -> None:
    ck = Ckpt()
    raw, doc = ck.build()
    w.write(f"ckpt/{DATA}", raw)
    w.write(
        f"ckpt/{MANIFEST}",
        (json.dumps(doc, indent=1) + "\n").encode().replace(b'"ckptvault"', b'"ckpt\xc3vault"', 1),
    )


@case("manifest_utf16", "a manifest encoded as UTF-16 with a byte order mark")
def _(w: CaseWriter) -> None:
    ck = Ckpt()
    raw, doc = ck.build()
    w.write(f"ckpt/{DATA}", raw)
    w.write(f"ckpt/{MANIFEST}", (json.dumps(doc, indent=1) + "\n").encode("utf-16"))


@case(
    "manifest_larger_than_limit",
    "a sparse manifest.json of MAX_MANIFEST_BYTES + 1 bytes (must be refused before it is read)",
)
def _(w: CaseWriter) -> None:
    ck = Ckpt()
    raw, _ = ck.build()
    w.write(f"ckpt/{DATA}", raw)
    w.sparse(f"ckpt/{MANIFEST}", MAX_MANIFEST_BYTES + 1, b'{"format": "ckptvault", "pad": "')


@case("manifest_missing", "a directory with a data file and no manifest", error=NOT_FOUND)
def _(w: CaseWriter) -> None:
    w.write(f"ckpt/{DATA}", Ckpt().build()[0])


@case("manifest_schema_version_999", "a schema version from the future", error=INCOMPATIBLE)
def _(w: CaseWriter) -> None:
    Ckpt().write(w, doc_hook=lambda d: d.update(schema_version=999))


@case("manifest_unknown_required_feature", "a required feature nobody implements", error=INCOMPATIBLE)
def _(w: CaseWriter) -> None:
    Ckpt().write(w, doc_hook=lambda d: d.update(required_features=["time-travel"]))


@case("manifest_unknown_field", "an extra top-level field (a reader must not ignore what it does not know)")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, doc_hook=lambda d: d.update(pickle="gASV"))


@case("manifest_unknown_digest_algorithm", "digest_algorithm md5")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, doc_hook=lambda d: d.update(digest_algorithm="md5"))


@case("manifest_file_size_negative", "a file size of -1")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, doc_hook=lambda d: d["files"][DATA].update(size=-1))


@case("manifest_file_size_bool", "a file size of true")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, doc_hook=lambda d: d["files"][DATA].update(size=True))


@case("manifest_files_not_an_object", "files given as a list of names")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, doc_hook=lambda d: d.update(files=[DATA]))


@case("manifest_tensor_dtype_not_a_string", "a tensor dtype given as a list")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, doc_hook=lambda d: d["tensors"]["a"].update(dtype=["F32"]))


@case("manifest_tensor_file_not_a_string", "a tensor's file given as an object")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, doc_hook=lambda d: d["tensors"]["a"].update(file={"name": DATA}))


@case("manifest_tensor_shape_100000_dims", "a tensor shape of 100,000 dimensions")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, doc_hook=lambda d: d["tensors"]["a"].update(shape=[1] * 100_000))


@case("manifest_tensor_name_lone_surrogate", "a tensor name that is a lone UTF-16 surrogate (not encodable)")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=lambda t: replace_once(t, '"tensors": {\n  "b"', '"tensors": {\n  "\\ud800"'))


@case(
    "manifest_copied_from_same_shape_checkpoint",
    "the manifest of another checkpoint with identical shapes copied over this one's",
)
def _(w: CaseWriter) -> None:
    ck = Ckpt(ID_A, seed=0)
    ck.write(w)
    _, other = Ckpt(ID_B, seed=1).build()
    w.write(f"ckpt/{MANIFEST}", json.dumps(other, indent=1) + "\n")


@case(
    "manifest_copied_from_chunked_checkpoint",
    "the manifest of a chunked checkpoint copied into a plain checkpoint (no store beside it)",
)
def _(w: CaseWriter) -> None:
    Ckpt().write(w)
    w.write(f"ckpt/{MANIFEST}", json.dumps(Chunked().doc(), indent=1) + "\n")


@case(
    "data_file_copied_from_other_checkpoint",
    "the data file of another checkpoint with identical shapes copied over this one's",
)
def _(w: CaseWriter) -> None:
    Ckpt(ID_A, seed=0).write(w)
    w.write(f"ckpt/{DATA}", Ckpt(ID_B, seed=1).build()[0])


@case(
    "manifest_data_file_digest_lies",
    "every part consistent but the data file's combined digest is wrong: load does not read it, "
    "verify must report it",
    api="verify",
    expect="not-ok",
    error="digest-mismatch",
)
def _(w: CaseWriter) -> None:
    Ckpt().write(w, doc_hook=lambda d: d["files"][DATA].update(digest="0" * 64))


# The state tree.
@case("tree_nested_10000_lists", "a tree of 10,000 nested lists (JSON parser recursion)")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=with_tree("[" * 10_000 + "]" * 10_000))


@case("tree_nested_10000_dicts", "a tree of 10,000 nested dict nodes (JSON parser recursion)")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=with_tree('{"t": "dict", "v": {"x": ' * 10_000 + "1" + "}}" * 10_000))


@case("tree_nested_300_lists", "a tree of 300 nested lists: valid JSON, deeper than MAX_TREE_DEPTH")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=with_tree("[" * 300 + "]" * 300))


@case("tree_nested_300_dicts", "a tree of 300 nested dict nodes: deeper than MAX_TREE_DEPTH")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=with_tree('{"t": "dict", "v": {"x": ' * 300 + "1" + "}}" * 300))


@case("tree_nested_tuple_keys_450", "a dict key that is a tuple nested 450 deep (only decoded keys recurse)")
def _(w: CaseWriter) -> None:
    key = '{"t": "tuple", "v": [' * 450 + "1" + "]}" * 450
    Ckpt().write(w, text_hook=with_tree('{"t": "dict", "items": [[' + key + ", 1]]}"))


@case(
    "tree_deep_node_with_deep_tag",
    "a node 250 lists deep whose tag is a list 600 deep: formatting the tag for the error recursed",
    regression="format/tree.py TreeDecoder._decode: str(tag) raised RecursionError out of load and verify",
)
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=with_tree("[" * 250 + '{"t": ' + "[" * 600 + "]" * 600 + "}" + "]" * 250))


@case(
    "tree_dict_key_deeply_nested_list",
    "a dict key that is a list 700 deep inside a tuple key: naming the leaves recursed in repr",
    api="open",
    regression="format/tree.py _key_text: str(key) raised RecursionError out of ckptvault.open()",
)
def _(w: CaseWriter) -> None:
    key = '{"t": "tuple", "v": [' * 100 + "[" * 700 + "]" * 700 + "]}" * 100
    Ckpt().write(w, text_hook=with_tree('{"t": "dict", "items": [[' + key + ", 1]]}"))


@case("tree_unknown_tag", "a node tagged 'pickle' carrying a pickled os.system call")
def _(w: CaseWriter) -> None:
    Ckpt().write(
        w,
        text_hook=with_tree(
            '{"t": "pickle", "data": "gASVAAAAAAAAAACMBXBvc2l4lIwGc3lzdGVtlJOUjAJpZJSFlFKULg=="}'
        ),
    )


@case("tree_tag_not_a_string", "a node whose tag is a list")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=with_tree('{"t": ["dict"], "v": {}}'))


@case("tree_references_missing_tensor", "an ndarray leaf naming a tensor the manifest does not list")
def _(w: CaseWriter) -> None:
    Ckpt().write(
        w,
        text_hook=with_tree(
            '{"t": "dict", "v": {"a": {"t": "ndarray", "tensor": "nope", "dtype": "<f4", "shape": [16]}}}'
        ),
    )


@case("tree_ref_to_unknown_id", "a ref node to a shared object that does not exist")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=with_tree('{"t": "dict", "v": {"a": {"t": "ref", "id": 12345}}}'))


@case("tree_leaf_shape_wraps_int64", "a leaf shape whose 64-bit wrapped product equals the stored size")
def _(w: CaseWriter) -> None:
    shape = f"[7, {0x6DB6DB6DB6DB6DB7}, 16]"
    Ckpt().write(
        w,
        text_hook=with_tree(
            '{"t": "dict", "v": {"a": {"t": "ndarray", "tensor": "a", "dtype": "<f4", "shape": '
            + shape
            + "}}}"
        ),
    )


@case("tree_leaf_object_dtype", "an ndarray leaf of numpy dtype object (|O): pickled objects")
def _(w: CaseWriter) -> None:
    Ckpt().write(
        w,
        text_hook=with_tree(
            '{"t": "dict", "v": {"a": {"t": "ndarray", "tensor": "a", "dtype": "|O", "shape": [8]}}}'
        ),
    )


@case(
    "tree_leaf_dtype_comma_string",
    "an ndarray leaf of numpy dtype '|,O' (numpy parses comma strings with ast.literal_eval)",
    regression="format/dtypes.py parse_numpy_dtype: SyntaxError escaped load and verify (found by atheris)",
)
def _(w: CaseWriter) -> None:
    leaf = '{"t": "ndarray", "tensor": "a", "dtype": "|,O", "shape": [16]}'
    Ckpt().write(w, text_hook=with_tree('{"t": "dict", "v": {"a": ' + leaf + "}}"))


@case(
    "tree_np_dtype_node_comma_string",
    "an np.dtype node whose string makes numpy's parser raise SyntaxError",
    regression="format/dtypes.py parse_numpy_dtype: SyntaxError escaped load and verify",
)
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=with_tree('{"t": "dict", "v": {"d": {"t": "np.dtype", "v": "<i4,(,)"}}}'))


@case("tree_np_scalar_object_dtype", "a numpy scalar of dtype object")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=with_tree('{"t": "np.scalar", "dtype": "|O", "b64": "AAAAAAAAAAA="}'))


@case("tree_torch_view_out_of_bounds", "a torch.Tensor view whose strides reach past its stored bytes")
def _(w: CaseWriter) -> None:
    leaf = {
        "t": "torch.Tensor",
        "tensor": "a",
        "dtype": "float32",
        "shape": [4, 4],
        "device": "cpu",
        "view": {"byte_offset": 0, "stride": [1000, 1]},
    }
    Ckpt().write(w, text_hook=with_tree(json.dumps({"t": "dict", "v": {"a": leaf}})))


@case("tree_set_of_unhashable", "a set node holding lists (unhashable)")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=with_tree('{"t": "set", "v": [[1], [2]]}'))


@case(
    "tree_dict_items_not_pairs",
    "a dict node whose items are not [key, value] pairs, reached through the lazy open view",
    api="open",
    regression="engine/lazy.py LazyNode._items: TypeError escaped open()'s keys()/indexing",
)
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=with_tree('{"t": "dict", "items": [1, [2]]}'))


@case(
    "tree_dict_key_bad_tag",
    "a dict key node with an unknown tag, reached through the lazy open view",
    api="open",
    regression="engine/lazy.py LazyNode._items: TreeDecodeError (a ValueError) escaped open()",
)
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=with_tree('{"t": "dict", "items": [[{"t": "nope"}, 1]]}'))


@case(
    "tree_tuple_key_v_not_a_list",
    "a tuple dict key whose 'v' is a number: opening the checkpoint names the leaves' paths first",
    api="open",
    regression="format/tree.py _key_text: TypeError escaped ckptvault.open() (shared_leaves)",
)
def _(w: CaseWriter) -> None:
    Ckpt().write(w, text_hook=with_tree('{"t": "dict", "items": [[{"t": "tuple", "v": 5}, 1]]}'))


@case("metadata_not_a_dict", "metadata that decodes to a list", api="info")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, doc_hook=with_metadata([1, 2]))


@case(
    "metadata_with_ndarray_leaf",
    "metadata holding an ndarray leaf (metadata never references tensors)",
    api="info",
)
def _(w: CaseWriter) -> None:
    leaf = {"t": "ndarray", "tensor": "a", "dtype": "<f4", "shape": [16]}
    Ckpt().write(w, doc_hook=with_metadata({"t": "dict", "v": {"x": leaf}}))


# Names and paths.
def _rename_data(doc: dict[str, Any], new: str) -> None:
    doc["files"][new] = doc["files"].pop(DATA)
    for t in doc["tensors"].values():
        t["file"] = new


@case(
    "path_traversal_dotdot",
    "a file named ../outside/data-00000.safetensors (a real file is there)",
    error=UNSAFE,
)
def _(w: CaseWriter) -> None:
    ck = Ckpt()
    raw, doc = ck.build()
    _rename_data(doc, f"../outside/{DATA}")
    w.write(f"outside/{DATA}", raw)
    w.write(f"ckpt/{MANIFEST}", json.dumps(doc, indent=1) + "\n")


@case("path_bare_dotdot", "a file named ..", error=UNSAFE)
def _(w: CaseWriter) -> None:
    Ckpt().write(w, doc_hook=lambda d: _rename_data(d, ".."))


@case("path_absolute_etc_passwd", "a file named /etc/passwd", error=UNSAFE)
def _(w: CaseWriter) -> None:
    Ckpt().write(w, doc_hook=lambda d: _rename_data(d, "/etc/passwd"))


@case("path_absolute_dev_zero", "a file named /dev/zero (an endless read if ever opened)", error=UNSAFE)
def _(w: CaseWriter) -> None:
    Ckpt().write(w, doc_hook=lambda d: _rename_data(d, "/dev/zero"))


@case("path_subdirectory", "a file named sub/data-00000.safetensors", error=UNSAFE)
def _(w: CaseWriter) -> None:
    ck = Ckpt()
    raw, doc = ck.build()
    _rename_data(doc, f"sub/{DATA}")
    w.write(f"ckpt/sub/{DATA}", raw)
    w.write(f"ckpt/{MANIFEST}", json.dumps(doc, indent=1) + "\n")


@case("path_hidden_name", "a hidden file name (.data-00000.safetensors)", error=UNSAFE)
def _(w: CaseWriter) -> None:
    ck = Ckpt()
    raw, doc = ck.build()
    _rename_data(doc, f".{DATA}")
    w.write(f"ckpt/.{DATA}", raw)
    w.write(f"ckpt/{MANIFEST}", json.dumps(doc, indent=1) + "\n")


@case("path_backslash", "a Windows-style traversal ..\\outside\\data", error=UNSAFE)
def _(w: CaseWriter) -> None:
    Ckpt().write(w, doc_hook=lambda d: _rename_data(d, "..\\outside\\data"))


@case("path_nul_byte", "a file name with a NUL byte (truncated by C APIs)", error=UNSAFE)
def _(w: CaseWriter) -> None:
    Ckpt().write(w, doc_hook=lambda d: _rename_data(d, "data\u0000.safetensors"))


@case("path_manifest_lists_itself", "the manifest listed as one of its own files")
def _(w: CaseWriter) -> None:
    Ckpt().write(w, doc_hook=lambda d: d["files"].update({MANIFEST: {"size": 1, "digest": "0" * 64}}))


@case(
    "symlink_data_file_out_of_checkpoint",
    "the data file is a symlink to a copy outside the checkpoint",
    error=UNSAFE,
)
def _(w: CaseWriter) -> None:
    ck = Ckpt()
    raw, doc = ck.build()
    w.write(f"outside/{DATA}", raw)
    w.write(f"ckpt/{MANIFEST}", json.dumps(doc, indent=1) + "\n")
    w.symlink(f"ckpt/{DATA}", f"../outside/{DATA}")


@case("symlink_data_file_to_dev_zero", "the data file is a symlink to /dev/zero", error=UNSAFE)
def _(w: CaseWriter) -> None:
    ck = Ckpt()
    _, doc = ck.build()
    w.write(f"ckpt/{MANIFEST}", json.dumps(doc, indent=1) + "\n")
    w.symlink(f"ckpt/{DATA}", "/dev/zero")


@case("symlink_manifest_out_of_checkpoint", "manifest.json is a symlink to a manifest outside", error=UNSAFE)
def _(w: CaseWriter) -> None:
    ck = Ckpt()
    raw, doc = ck.build()
    w.write(f"ckpt/{DATA}", raw)
    w.write(f"outside/{MANIFEST}", json.dumps(doc, indent=1) + "\n")
    w.symlink(f"ckpt/{MANIFEST}", f"../outside/{MANIFEST}")


@case(
    "fifo_in_place_of_data_file", "a FIFO named like the data file (a blocking open would hang)", error=UNSAFE
)
def _(w: CaseWriter) -> None:
    ck = Ckpt()
    _, doc = ck.build()
    w.write(f"ckpt/{MANIFEST}", json.dumps(doc, indent=1) + "\n")
    w.fifo(f"ckpt/{DATA}")


@case("fifo_in_place_of_manifest", "a FIFO named manifest.json", error=UNSAFE)
def _(w: CaseWriter) -> None:
    w.write(f"ckpt/{DATA}", Ckpt().build()[0])
    w.fifo(f"ckpt/{MANIFEST}")


@case("directory_in_place_of_data_file", "a directory named like the data file", error=UNSAFE)
def _(w: CaseWriter) -> None:
    ck = Ckpt()
    _, doc = ck.build()
    w.write(f"ckpt/{MANIFEST}", json.dumps(doc, indent=1) + "\n")
    w.directory(f"ckpt/{DATA}")


# Chunked tensors and the chunk store.
def _chunk_case(
    name: str, attacks: str, *, error: str = CORRUPT, regression: str | None = None
) -> Callable[[Callable[[CaseWriter], None]], Callable[[CaseWriter], None]]:
    return case(name, attacks, error=error, target="run/step_1", regression=regression)


@_chunk_case(
    "chunk_frame_raw_len_lies", "a zstd frame whose header claims 2^40 raw bytes (the manifest says 4096)"
)
def _(w: CaseWriter) -> None:
    bad = frame(2**40, 1, [(1, zstd_rle_frame(CHUNK, 0))])
    Chunked().write(w, stored={1: bad})


@_chunk_case("chunk_frame_plane_length_lies", "a frame whose plane table says 5 bytes for an 11-byte plane")
def _(w: CaseWriter) -> None:
    ch = Chunked()
    ch.write(w, stored={1: frame(CHUNK, 1, [(1, zstd_rle_frame(CHUNK, 0))], stored=[5])})


@_chunk_case("chunk_frame_plane_length_2_64", "a frame whose plane length is 2^64-1")
def _(w: CaseWriter) -> None:
    Chunked().write(w, stored={1: frame(CHUNK, 1, [(1, zstd_rle_frame(CHUNK, 0))], stored=[2**64 - 1])})


@_chunk_case("chunk_frame_planes_sum_wraps", "four plane lengths that sum to the frame size modulo 2^64")
def _(w: CaseWriter) -> None:
    ch = Chunked()
    content, _ = ch.stored[2]
    planes = [(1, zstd_rle_frame(CHUNK // 4, b)) for b in struct.pack("<f", 1.0)]
    real = [len(p) for _, p in planes]
    lies = [real[0] + 2**63, real[1] + 2**63, real[2], real[3]]
    bad = frame(CHUNK, 4, planes, stored=lies)
    assert len(bad) == len(content)
    ch.write(w, stored={2: bad})


@_chunk_case("chunk_frame_bad_magic", "a compressed chunk that is not a frame (a gzip stream)")
def _(w: CaseWriter) -> None:
    ch = Chunked()
    size = len(ch.stored[1][0])
    Chunked().write(w, stored={1: (b"\x1f\x8b\x08\x00" + bytes(size))[:size]})


@_chunk_case("chunk_frame_three_planes", "a frame of 3 planes for 4-byte elements")
def _(w: CaseWriter) -> None:
    ch = Chunked()
    content = bytearray(ch.stored[2][0])
    content[6] = 3
    ch.write(w, stored={2: bytes(content)})


@_chunk_case("chunk_frame_unknown_method", "a plane compressed with method 7")
def _(w: CaseWriter) -> None:
    Chunked().write(w, stored={1: frame(CHUNK, 1, [(7, zstd_rle_frame(CHUNK, 0))])})


@_chunk_case("chunk_zstd_declares_1tib", "a zstd plane whose frame header declares 1 TiB of content (bomb)")
def _(w: CaseWriter) -> None:
    Chunked().write(w, stored={1: frame(CHUNK, 1, [(1, zstd_rle_frame(CHUNK, 0, declared=2**40))])})


@_chunk_case("chunk_zstd_decodes_longer", "a zstd plane that decodes to more bytes than the plane holds")
def _(w: CaseWriter) -> None:
    ch = Chunked()
    bad = frame(CHUNK, 1, [(1, zstd_rle_frame(CHUNK * 2, 0))])
    ch.stored[1] = (bad, "zstd")
    ch.refs[1][2] = len(bad)
    ch.write(w)


@_chunk_case("chunk_lz4_decodes_longer", "an lz4 plane that decodes to twice the promised bytes")
def _(w: CaseWriter) -> None:
    ch = Chunked()
    bad = frame(CHUNK, 1, [(2, lz4_run_block(CHUNK * 2, 0x3F))])
    ch.stored[3] = (bad, "lz4")
    ch.refs[3][2] = len(bad)
    ch.write(w)


@_chunk_case("chunk_lz4_garbage", "an lz4 plane of garbage (an offset pointing before the output)")
def _(w: CaseWriter) -> None:
    garbage = b"\x0f\x00\xff" + b"\xff" * 23  # a match at offset 0xff00 before any output; 26 bytes
    Chunked().write(w, stored={3: frame(CHUNK, 1, [(2, garbage)])})


@_chunk_case("chunk_file_shorter", "a chunk file shorter than the stored length the manifest promises")
def _(w: CaseWriter) -> None:
    Chunked().write(w, stored={0: Chunked().stored[0][0][:100]})


@_chunk_case("chunk_file_longer", "a chunk file with bytes appended")
def _(w: CaseWriter) -> None:
    Chunked().write(w, stored={1: Chunked().stored[1][0] + b"\x00" * 7})


@_chunk_case("chunk_missing", "a chunk the manifest references is not in the store")
def _(w: CaseWriter) -> None:
    Chunked().write(w, skip=(2,))


@_chunk_case("chunk_digest_mismatch", "a raw chunk of the right size whose bytes changed")
def _(w: CaseWriter) -> None:
    Chunked().write(w, stored={0: bytes(CHUNK)})


@_chunk_case(
    "chunk_symlink_out_of_store", "a chunk file that is a symlink to a copy outside the store", error=UNSAFE
)
def _(w: CaseWriter) -> None:
    ch = Chunked()
    ch.write(w, skip=(0,))
    w.write("outside/chunk.raw", ch.stored[0][0])
    rel = chunk_path(ch.refs[0][0], "raw")
    w.symlink(f"run/{rel}", "../" * (rel.count("/")) + "../outside/chunk.raw")


@_chunk_case(
    "chunk_manifest_claims_1tib_raw",
    "1024 references to raw chunks of 2^30 bytes (a 1 TiB tensor) with no such chunk files",
    error=RESOURCE,
    regression="engine/chunks.py read_chunked: MemoryError (the promised size) escaped load and verify",
)
def _(w: CaseWriter) -> None:
    ch = Chunked()
    d = ch.refs[0][0]

    def hook(doc: dict[str, Any]) -> None:
        t = doc["tensors"]["w"]
        t["chunks"] = [[d, 2**30, 2**30, "raw"]] * 1024
        t["dtype"], t["shape"] = "U8", [2**40]
        t["digest"] = chunked_tensor_digest(2**40, [d] * 1024)
        doc["tree"]["v"]["w"].update(dtype="|u1", shape=[2**40])

    ch.write(w, doc_hook=hook)


@_chunk_case(
    "chunk_manifest_claims_1tib_zstd",
    "1024 references to one 11-byte zstd chunk said to hold 2^30 bytes (a 1 TiB tensor)",
    error=RESOURCE,
    regression="engine/chunks.py read_chunked: MemoryError escaped load and verify",
)
def _(w: CaseWriter) -> None:
    ch = Chunked()
    d, _, stored, _ = ch.refs[1]

    def hook(doc: dict[str, Any]) -> None:
        t = doc["tensors"]["w"]
        t["chunks"] = [[d, 2**30, stored, "zstd"]] * 1024
        t["dtype"], t["shape"] = "U8", [2**40]
        t["digest"] = chunked_tensor_digest(2**40, [d] * 1024)
        doc["tree"]["v"]["w"].update(dtype="|u1", shape=[2**40])

    ch.write(w, doc_hook=hook)


@_chunk_case("chunk_reference_path_traversal", "a chunk digest of ../../../../etc/passwd")
def _(w: CaseWriter) -> None:
    Chunked().write(
        w, doc_hook=lambda d: d["tensors"]["w"]["chunks"][0].__setitem__(0, "../../../../etc/passwd")
    )


@_chunk_case("chunk_stored_len_exceeds_raw", "a zstd chunk whose stored length exceeds its raw length")
def _(w: CaseWriter) -> None:
    Chunked().write(w, doc_hook=lambda d: d["tensors"]["w"]["chunks"][1].__setitem__(2, CHUNK + 1))


@_chunk_case("chunk_unknown_codec", "a chunk codec 'gzip'")
def _(w: CaseWriter) -> None:
    Chunked().write(w, doc_hook=lambda d: d["tensors"]["w"]["chunks"][1].__setitem__(3, "gzip"))


@_chunk_case("chunk_raw_len_zero", "a chunk of raw length 0")
def _(w: CaseWriter) -> None:
    Chunked().write(w, doc_hook=lambda d: d["tensors"]["w"]["chunks"][0].__setitem__(1, 0))


@_chunk_case("chunk_without_feature", "chunked tensors without the chunked-tensors required feature")
def _(w: CaseWriter) -> None:
    Chunked().write(w, doc_hook=lambda d: d.update(required_features=[]))


@_chunk_case("chunk_shape_mismatch", "chunks that hold more bytes than dtype and shape say")
def _(w: CaseWriter) -> None:
    Chunked().write(w, doc_hook=lambda d: d["tensors"]["w"].update(shape=[1024]))


# Legacy torch files (import_legacy): nothing in them may ever run.
def _legacy(
    name: str, attacks: str, error: str = "UnsafeLegacyFileError"
) -> Callable[[Callable[[CaseWriter], None]], Callable[[CaseWriter], None]]:
    return case(name, attacks, api="import_legacy", error=error, target="model.pt")


@_legacy("legacy_pt_reduce_os_system", f"a torch.save zip whose pickle calls os.system('touch {MARKER}')")
def _(w: CaseWriter) -> None:
    w.write(
        "model.pt",
        torch_zip(legacy_records(b"\x80\x02" + pickle_call("os", "system", f"touch {MARKER}") + b".")),
    )


@_legacy(
    "legacy_pt_reduce_builtins_exec", "a torch.save zip whose pickle calls builtins.exec to write the marker"
)
def _(w: CaseWriter) -> None:
    code = f"open({MARKER!r}, 'w').write('pwned')"
    w.write("model.pt", torch_zip(legacy_records(b"\x80\x02" + pickle_call("builtins", "exec", code) + b".")))


@_legacy("legacy_pt_reduce_subprocess", "a torch.save zip whose pickle calls subprocess.getoutput")
def _(w: CaseWriter) -> None:
    w.write(
        "model.pt",
        torch_zip(
            legacy_records(b"\x80\x02" + pickle_call("subprocess", "getoutput", f"touch {MARKER}") + b".")
        ),
    )


@_legacy(
    "legacy_pt_malicious_inside_state_dict",
    "a real tensor and, next to it, an os.system call inside the same state dict",
)
def _(w: CaseWriter) -> None:
    pkl = (
        legit_tensor_pickle()[:-2] + pickle_str("x") + pickle_call("os", "system", f"touch {MARKER}") + b"u."
    )
    w.write("model.pt", torch_zip(legacy_records(pkl, _floats(4, 0.0))))


@_legacy("legacy_pickle_bare_os_system", "a bare pickle (no zip: torch's legacy format) calling os.system")
def _(w: CaseWriter) -> None:
    w.write("model.pt", b"\x80\x02" + pickle_call("os", "system", f"touch {MARKER}") + b".")


@_legacy(
    "legacy_pt_storage_numel_lies",
    "a tensor whose storage claims 2^30 floats backed by 16 bytes",
    error="CheckpointError",
)
def _(w: CaseWriter) -> None:
    w.write("model.pt", torch_zip(legacy_records(legit_tensor_pickle(storage_numel=2**30), _floats(4, 0.0))))


@_legacy("legacy_pt_truncated_zip", "a torch.save zip cut in half", error="CheckpointError")
def _(w: CaseWriter) -> None:
    whole = torch_zip(legacy_records(legit_tensor_pickle(), _floats(4, 0.0)))
    w.write("model.pt", whole[: len(whole) // 2])


@case(
    "legacy_safetensors_huge_header",
    "a .safetensors file given to import_legacy whose header length is 2^63",
    api="import_legacy",
    error="CheckpointError",
    target="model.safetensors",
)
def _(w: CaseWriter) -> None:
    w.write("model.safetensors", struct.pack("<Q", 2**63) + b"{}")


# Amplification and reader agreement (issue 13, classes 3, 5 and 6).
P61 = 2**61 - 1  # Python hashes an int modulo this prime: its multiples share one hash value


@_chunk_case(
    "chunk_one_zstd_chunk_referenced_as_100_gib",
    "one 2 KiB zstd chunk of 64 MiB of zeros, really stored, referenced 1600 times (a 100 GiB tensor "
    "from 2 KiB): refused before allocating, verify reads the chunk once",
    error=RESOURCE,
)
def _(w: CaseWriter) -> None:
    size, refs = 2**26, 1600
    big = frame(size, 1, [(1, zstd_rle_frame_long(size, 0))])
    d = zeros_digest(size)
    w.write(f"run/{chunk_path(d, 'zstd')}", big)

    def hook(doc: dict[str, Any]) -> None:
        t = doc["tensors"]["w"]
        t["chunks"] = [[d, size, len(big), "zstd"]] * refs
        t["dtype"], t["shape"] = "U8", [refs * size]
        t["digest"] = chunked_tensor_digest(refs * size, [d] * refs)
        doc["tree"]["v"]["w"].update(dtype="|u1", shape=[refs * size])

    Chunked().write(w, doc_hook=hook)


def _torch_view_tree(shape: list[int], stride: list[int]) -> dict[str, Any]:
    view = {"byte_offset": 0, "stride": stride}
    leaf = {
        "t": "torch.Tensor",
        "tensor": "a",
        "dtype": "float32",
        "shape": shape,
        "device": "cpu",
        "view": view,
    }
    return {"t": "dict", "v": {"a": leaf, "b": {"t": "ndarray", "tensor": "b", "dtype": "<i8", "shape": [8]}}}


@case(
    "tree_view_stride0_claims_1tib",
    "a float32 view of 64 stored bytes with stride 0 and 2^38 elements (1 TiB logical)",
    error=RESOURCE,
)
def _(w: CaseWriter) -> None:
    ck = Ckpt()
    ck.tree = _torch_view_tree([2**38], [0])
    ck.write(w)


@case(
    "tree_view_stride0_claims_1tib_open",
    "the 1 TiB stride-0 view through the lazy reader: refused when the tensor is fetched",
    api="open",
    error=RESOURCE,
)
def _(w: CaseWriter) -> None:
    ck = Ckpt()
    ck.tree = _torch_view_tree([2**19, 2**19], [0, 0])
    ck.write(w)


@case(
    "tree_dict_keys_hash_flood",
    "a dict of 40,000 integer keys that are all multiples of 2^61-1 (one hash value: quadratic)",
    max_seconds=6.0,
)
def _(w: CaseWriter) -> None:
    items = [[{"t": "int", "hex": hex(k * P61)}, k] for k in range(1, 40_001)]
    ck = Ckpt()
    ck.tree = {"t": "dict", "items": items}
    ck.write(w)


@case(
    "tree_set_members_hash_flood",
    "a set of 2^15 tuples of -1 and -2 (which hash alike): one hash value for every member",
    api="open",
    max_seconds=6.0,
)
def _(w: CaseWriter) -> None:
    members = [{"t": "tuple", "v": [-1 - ((k >> i) & 1) for i in range(15)]} for k in range(2**15)]
    ck = Ckpt()
    ck.tree = {"t": "dict", "v": {"s": {"t": "set", "v": members}, "a": Ckpt().tree["v"]["a"]}}
    ck.write(w)


@case("tree_shared_id_beyond_int64", "a shared-object id that is a 40-digit multiple of 2^61-1", api="open")
def _(w: CaseWriter) -> None:
    ck = Ckpt()
    ident = P61 * 2**80
    ck.tree["v"]["a"]["id"] = ident
    ck.tree["v"]["c"] = {"t": "ref", "id": ident}
    ck.write(w)


@case(
    "tree_duplicate_int_keys_open",
    "a dict node listing the key 1 twice: the lazy reader must refuse it as load does",
    api="open",
)
def _(w: CaseWriter) -> None:
    ck = Ckpt()
    ck.tree = {"t": "dict", "items": [[1, ck.tree["v"]["a"]], [1, ck.tree["v"]["b"]]]}
    ck.write(w)


@case(
    "metadata_metrics_disagree_with_sidecar",
    "a manifest whose metrics say loss 0.01 while its digested sidecar says 1.25",
    api="verify",
    expect="not-ok",
    error="metadata-mismatch",
)
def _(w: CaseWriter) -> None:
    ck = Ckpt()
    sidecar = {"checkpoint_id": ID_A, "step": 1, "metrics": {"loss": 1.25}}
    ck.extra_files["checkpoint_00000001.meta.json"] = json.dumps(sidecar).encode()
    ck.metadata = {"t": "dict", "v": {"step": 1, "metrics": {"t": "dict", "v": {"loss": 0.01}}}}
    ck.write(w)


@_legacy(
    "legacy_pt_shared_list_bomb",
    "a 40 KB pickle of a list holding one list 1000 times, 20 levels deep (1000^20 paths to encode)",
    error=RESOURCE,
)
def _(w: CaseWriter) -> None:
    w.write("model.pt", torch_zip(legacy_records(shared_list_bomb_pickle(20, 1000))))


@_legacy(
    "legacy_pt_expanded_tensor",
    "a tensor of one stored float expanded (stride 0) to 2^36 elements: 256 GiB when saved",
    error=RESOURCE,
)
def _(w: CaseWriter) -> None:
    w.write("model.pt", torch_zip(legacy_records(expanded_tensor_pickle(2**36), _floats(1, 0.0))))


# Model factories (load_model): a checkpoint names code to rebuild its model; naming is not trusting.
PLANTED = f"""import torch

with open("{MARKER}", "w") as marker:
    marker.write("pwned")


class Net(torch.nn.Module):
    pass
"""
ARCHITECTURE = "ArchitectureError"


def _architecture(factory: str) -> Ckpt:
    """A valid checkpoint whose model weights (``model``) would fit ``factory``, were it trusted."""
    ck = Ckpt()
    ck.tree = {"t": "dict", "v": {"model": {"t": "dict", "v": dict(ck.tree["v"], n=None)}}}
    del ck.tree["v"]["model"]["v"]["n"]
    ck.metadata = {
        "t": "dict",
        "v": {
            "step": 1,
            "architecture": {
                "t": "dict",
                "v": {"factory": factory, "kwargs": {"t": "dict", "v": {}}, "weights": ["model"]},
            },
        },
    }
    return ck


@case(
    "architecture_factory_planted_in_cwd",
    "load_model of a checkpoint naming module 'planted_factory', a file the attacker left in the "
    "working directory (an interactive session has '' on sys.path)",
    api="load_model",
    error=ARCHITECTURE,
)
def _(w: CaseWriter) -> None:
    w.write(".cwd/planted_factory.py", PLANTED)
    _architecture("planted_factory:Net").write(w)


@case(
    "architecture_factory_planted_beside_checkpoint",
    "load_model of a checkpoint naming a module file that lies next to the checkpoint directory",
    api="load_model",
    error=ARCHITECTURE,
)
def _(w: CaseWriter) -> None:
    w.write("planted_factory.py", PLANTED)
    _architecture("planted_factory:Net").write(w)


@case(
    "architecture_factory_planted_inside_checkpoint",
    "load_model of a checkpoint naming a module file stored inside the checkpoint directory itself",
    api="load_model",
    error=ARCHITECTURE,
)
def _(w: CaseWriter) -> None:
    ck = _architecture("planted_factory:Net")
    ck.extra_files["planted_factory.py"] = PLANTED.encode()  # listed and digested: it passes verify
    ck.write(w)


@case(
    "architecture_factory_os_system",
    "load_model of a checkpoint naming os:system (imported already, but not a model factory)",
    api="load_model",
    error=ARCHITECTURE,
)
def _(w: CaseWriter) -> None:
    _architecture("os:system").write(w)


# The catalog: a hostile checkpoint must be left out of the index, never break the sync.
def _catalog(
    name: str, attacks: str, regression: str | None = None
) -> Callable[[Callable[[CaseWriter], None]], Callable[[CaseWriter], None]]:
    return case(
        name, attacks, api="catalog", expect="skipped", error=None, target="root", regression=regression
    )


def _catalog_pair(w: CaseWriter, hostile: Ckpt, **write: Any) -> None:
    """root/run/step_1 valid (must be indexed) beside root/run/step_2 hostile (must not be)."""
    Ckpt(ID_C, seed=3, step=1).write(w, "root/run/step_1")
    hostile.write(w, "root/run/step_2", **write)


@_catalog(
    "catalog_step_beyond_int64",
    "step 2^64: valid JSON and a valid manifest, but more than SQLite's INTEGER holds",
    regression="catalog/store.py Catalog._index_checkpoint: OverflowError escaped Catalog()/sync()",
)
def _(w: CaseWriter) -> None:
    _catalog_pair(w, Ckpt(step=2), doc_hook=lambda d: d.update(step=2**64))


@_catalog(
    "catalog_file_size_beyond_int64",
    "a file size of 2^70 in the manifest (the catalog records sizes without reading files)",
    regression="catalog/store.py Catalog._index_checkpoint: OverflowError escaped sync()",
)
def _(w: CaseWriter) -> None:
    _catalog_pair(w, Ckpt(step=2), doc_hook=lambda d: d["files"][DATA].update(size=2**70))


@_catalog(
    "catalog_metric_huge_int",
    "a metric that is a 1100-bit integer (float() overflows)",
    regression="catalog/store.py Catalog._index_checkpoint: OverflowError escaped sync()",
)
def _(w: CaseWriter) -> None:
    metrics = {"t": "dict", "v": {"loss": {"t": "int", "hex": hex(2**1100)}}}
    _catalog_pair(
        w, Ckpt(step=2), doc_hook=with_metadata({"t": "dict", "v": {"step": 2, "metrics": metrics}})
    )


@_catalog(
    "catalog_epoch_beyond_int64",
    "an epoch of 2^70 in the metadata",
    regression="catalog/store.py Catalog._index_checkpoint: OverflowError escaped sync()",
)
def _(w: CaseWriter) -> None:
    epoch = {"t": "int", "hex": hex(2**70)}
    _catalog_pair(w, Ckpt(step=2), doc_hook=with_metadata({"t": "dict", "v": {"step": 2, "epoch": epoch}}))


@_catalog(
    "catalog_config_mixed_key_types",
    "a config dict with an int key and a str key (json.dumps(sort_keys=True) cannot order them)",
    regression="catalog/store.py Catalog._index_checkpoint: TypeError escaped sync()",
)
def _(w: CaseWriter) -> None:
    config = {"t": "dict", "items": [[1, 2], ["lr", 0.1]]}
    _catalog_pair(w, Ckpt(step=2), doc_hook=with_metadata({"t": "dict", "v": {"step": 2, "config": config}}))


@_catalog(
    "catalog_tags_tuple_key",
    "a tag whose value is a dict with a tuple key (not JSON-encodable)",
    regression="catalog/store.py Catalog._index_checkpoint: TypeError escaped sync()",
)
def _(w: CaseWriter) -> None:
    inner = {"t": "dict", "items": [[{"t": "tuple", "v": [1, 2]}, 3]]}
    tags = {"t": "dict", "v": {"x": inner}}
    _catalog_pair(w, Ckpt(step=2), doc_hook=with_metadata({"t": "dict", "v": {"step": 2, "tags": tags}}))


@_catalog("catalog_manifest_symlink", "manifest.json of a checkpoint is a symlink to one outside the root")
def _(w: CaseWriter) -> None:
    Ckpt(ID_C, seed=3, step=1).write(w, "root/run/step_1")
    ck = Ckpt(step=2)
    raw, doc = ck.build()
    w.write(f"root/run/step_2/{DATA}", raw)
    w.write(f"outside/{MANIFEST}", json.dumps(doc, indent=1) + "\n")
    w.symlink(f"root/run/step_2/{MANIFEST}", f"../../../outside/{MANIFEST}")


@_catalog("catalog_manifest_garbage", "a manifest of 10,000 nested lists")
def _(w: CaseWriter) -> None:
    Ckpt(ID_C, seed=3, step=1).write(w, "root/run/step_1")
    w.write(f"root/run/step_2/{MANIFEST}", "[" * 10_000 + "]" * 10_000)


# -- sharded tensors (feature sharded-tensors, docs/format.md §15) -------------------------------
def sharded_ckpt() -> Ckpt:
    """A valid checkpoint whose one tensor ``w`` (F32 [4, 8]) is stored as four [2, 4] pieces on a
    2x2 grid (what Shard(0), Shard(1) on a 2x2 mesh writes), named ``w#<row>_<col>``."""
    ck = Ckpt()
    ck.header = {"__metadata__": ck.header["__metadata__"]}
    for i, (row, col) in enumerate(((0, 0), (0, 4), (2, 0), (2, 4))):
        ck.header[f"w#{row}_{col}"] = {"dtype": "F32", "shape": [2, 4], "data_offsets": [32 * i, 32 * i + 32]}
    ck.data = _floats(32, 0.0)
    ck.tree = {"t": "dict", "v": {"w": {"t": "ndarray", "tensor": "w", "dtype": "<f4", "shape": [4, 8]}}}
    return ck


def with_sharded(change: Callable[[dict[str, Any]], None] | None = None) -> Callable[[dict[str, Any]], None]:
    """A doc hook adding the feature and ``sharded`` for :func:`sharded_ckpt`, then ``change``."""

    def hook(doc: dict[str, Any]) -> None:
        doc["required_features"] = ["sharded-tensors"]
        shards = [[[r, c], f"w#{r}_{c}"] for r, c in ((0, 0), (0, 4), (2, 0), (2, 4))]
        doc["sharded"] = {"w": {"dtype": "F32", "shape": [4, 8], "shards": shards}}
        if change is not None:
            change(doc)

    return hook


def _shards(doc: dict[str, Any]) -> list[Any]:
    return doc["sharded"]["w"]["shards"]


@case(
    "control_valid_sharded", "nothing: a 2x2 grid of pieces tiling one tensor, which must load", expect="ok"
)
def _(w: CaseWriter) -> None:
    sharded_ckpt().write(w, doc_hook=with_sharded())


def _sharded_case(name: str, attacks: str, change: Callable[[dict[str, Any]], None], **kw: Any) -> None:
    @case(name, attacks, **kw)
    def _(w: CaseWriter) -> None:
        sharded_ckpt().write(w, doc_hook=with_sharded(change))


def _set_offsets(i: int, offsets: list[Any]) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        _shards(doc)[i][0] = offsets

    return change


_sharded_case(
    "sharded_pieces_overlap",
    "piece [2:4, 4:8] moved to [1:3, 4:8]: overlaps, leaves a row unwritten",
    _set_offsets(3, [1, 4]),
)
_sharded_case(
    "sharded_piece_out_of_bounds",
    "a piece placed at [3, 4]: one row outside the tensor",
    _set_offsets(3, [3, 4]),
)
_sharded_case(
    "sharded_offsets_bool", "offsets [false, 4] (a bool is not an int here)", _set_offsets(1, [False, 4])
)
_sharded_case("sharded_offsets_negative", "offsets [-2, 4]", _set_offsets(3, [-2, 4]))
_sharded_case("sharded_gap", "one piece left out: 8 elements no piece writes", lambda d: _shards(d).pop())
_sharded_case(
    "sharded_piece_used_twice",
    "one piece listed at two places (its bytes would fill both)",
    lambda d: _shards(d)[3].__setitem__(1, "w#2_0"),
)
_sharded_case(
    "sharded_missing_piece",
    "a shard naming a tensor the manifest does not store",
    lambda d: _shards(d)[3].__setitem__(1, "w#9_9"),
)
_sharded_case(
    "sharded_name_is_a_stored_tensor",
    "the sharded tensor named like one of its own pieces",
    lambda d: d["sharded"].__setitem__("w#0_0", d["sharded"].pop("w")),
)
_sharded_case(
    "sharded_without_feature",
    "sharded present, sharded-tensors not in required_features",
    lambda d: d.__setitem__("required_features", []),
)
_sharded_case(
    "sharded_shape_product_beyond_2_62",
    "a sharded shape of 2^31 x 2^32 elements around the four small pieces",
    lambda d: d["sharded"]["w"].__setitem__("shape", [1 << 31, 1 << 32]),
)
_sharded_case(
    "sharded_empty_shards",
    "a non-empty sharded tensor with no pieces",
    lambda d: d["sharded"]["w"].__setitem__("shards", []),
)


@case("sharded_piece_other_dtype", "one piece stored as I32 (bytes and digests consistent)")
def _(w: CaseWriter) -> None:
    ck = sharded_ckpt()
    ck.header["w#2_4"] = dict(ck.header["w#2_4"], dtype="I32")
    ck.write(w, doc_hook=with_sharded())


@case("sharded_piece_byte_flipped", "one byte of a piece flipped after the manifest was written")
def _(w: CaseWriter) -> None:
    sharded_ckpt().write(
        w, doc_hook=with_sharded(), raw_hook=lambda raw: raw[:-40] + bytes([raw[-40] ^ 1]) + raw[-39:]
    )


@case("sharded_data_file_truncated", "the data file holding the pieces cut 40 bytes short")
def _(w: CaseWriter) -> None:
    sharded_ckpt().write(w, doc_hook=with_sharded(), raw_hook=lambda raw: raw[:-40])


@case(
    "sharded_grid_too_irregular",
    "4,096 pieces cut in a staircase: a valid tiling whose grid is 2048 x 2049 cells (over MAX_GRID_CELLS)",
)
def _(w: CaseWriter) -> None:
    rows = 2048
    ck = Ckpt()
    ck.header = {"__metadata__": ck.header["__metadata__"]}
    shards: list[Any] = []
    offset = 0
    for i in range(rows):
        for col, width in ((0, i + 1), (i + 1, rows - i)):
            ck.header[f"w#{i}_{col}"] = {
                "dtype": "U8",
                "shape": [1, width],
                "data_offsets": [offset, offset + width],
            }
            shards.append([[i, col], f"w#{i}_{col}"])
            offset += width
    ck.data = bytes(offset)
    ck.tree = {
        "t": "dict",
        "v": {"w": {"t": "ndarray", "tensor": "w", "dtype": "|u1", "shape": [rows, rows + 1]}},
    }

    def hook(doc: dict[str, Any]) -> None:
        doc["required_features"] = ["sharded-tensors"]
        doc["sharded"] = {"w": {"dtype": "U8", "shape": [rows, rows + 1], "shards": shards}}

    ck.write(w, doc_hook=hook)


# -- generation and --check -------------------------------------------------------------------------
def generate(out: Path, *, compress: bool = True) -> list[dict[str, Any]]:
    """Writes every case under ``out/cases`` and ``out/index.json``; returns the index entries."""
    cases_dir = out / CASES
    if cases_dir.exists():
        shutil.rmtree(cases_dir)
    cases_dir.mkdir(parents=True)
    names = [entry["name"] for entry, _ in REGISTRY]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise SystemExit(f"duplicate case names: {sorted(duplicates)}")
    index = []
    for entry, build in REGISTRY:
        writer = CaseWriter(cases_dir / entry["name"], compress=compress)
        writer.root.mkdir()
        build(writer)
        if writer.materialize:
            entry = {**entry, "materialize": writer.materialize}
        index.append(entry)
    doc = {
        "about": "Hostile inputs for ckptvault readers; generated by make_corpus.py (see its docstring).",
        "marker": MARKER,
        "cases": index,
    }
    (out / INDEX).write_text(json.dumps(doc, indent=1, ensure_ascii=True) + "\n")
    return index


def _content(path: Path, *, packed: bool = True) -> bytes:
    data = path.read_bytes()
    return lzma.decompress(data) if packed and path.suffix == ".xz" else data


def _files(root: Path) -> dict[str, Path]:
    return {
        p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()
    }


def check(corpus: Path) -> list[str]:
    """Differences between the checked-in corpus and a fresh generation (empty when up to date)."""
    with tempfile.TemporaryDirectory(prefix="ckptvault-corpus-") as tmp:
        fresh = Path(tmp)
        generate(fresh, compress=False)
        problems = []
        index = corpus / INDEX
        if not index.exists() or index.read_bytes() != (fresh / INDEX).read_bytes():
            problems.append(f"{INDEX} differs")
        have, want = _files(corpus / CASES), _files(fresh / CASES)
        for rel in sorted(set(want) - set(have)):
            problems.append(f"missing {CASES}/{rel}")
        for rel in sorted(set(have) - set(want)):
            problems.append(f"stale {CASES}/{rel}")
        for rel in sorted(set(have) & set(want)):
            if have[rel].is_symlink() or _content(have[rel]) != _content(want[rel], packed=False):
                problems.append(f"differs {CASES}/{rel}")
        return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the checked-in corpus is stale")
    parser.add_argument(
        "--out", type=Path, default=HERE, help="where to write (default: next to this script)"
    )
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.out)
        for line in problems[:50]:
            print(line)
        if problems:
            print(f"corpus out of date ({len(problems)} differences): run python tests/corpus/make_corpus.py")
            return 1
        print(f"corpus up to date ({len(REGISTRY)} cases)")
        return 0
    index = generate(args.out)
    files = _files(args.out / CASES)
    size = sum(p.stat().st_size for p in files.values()) + (args.out / INDEX).stat().st_size
    print(f"wrote {len(index)} cases, {len(files)} files, {size} bytes under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
