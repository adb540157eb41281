"""Compression benchmark: ckptvault's byte-plane chunk codec against plain zstd, blosc2 and zipnn.

Inputs, all measured in one run:

* **(a) random bf16**: normal weights (std 0.02) as one bf16 tensor of ``--size-mib`` (256 MiB);
* **(b) random fp32**: the same as fp32, ``--size-mib``;
* **(c) trained model**: a small residual-MLP language model (2 embeddings, 4 blocks of
  LayerNorm + Linear(384, 1536) + GELU + Linear(1536, 384), a head; about 6.3 M parameters) trained
  for ``--train-steps`` (300) AdamW steps (lr 1e-3, weight decay 0.1, GPT-style std 0.02 init) on a
  synthetic task generated here, no downloads: from tokens a and b predict (a + b mod 8) mod 1024.
  Its 2-D weight matrices (over 99% of the parameter bytes; biases and LayerNorm vectors are left out,
  the library would not chunk-compress them anyway) are taken as fp32 and as bf16, one buffer per
  tensor. The AdamW moments of the same matrices (fp32) are measured too, as an extra input: they are
  most of a real checkpoint's bytes.

Contenders, each over the same buffers, compress and decompress timed separately:

* **ckptvault auto / lz4**: ``ckptvault.format.codec`` as the library uses it: methods chosen once per
  tensor on its first 256 KiB, then every 4 MiB chunk encoded independently on a 2-thread pool and
  decoded into a preallocated output (a chunk whose frame is not smaller, or a tensor whose methods are
  all "stored", is kept raw, as the library does);
* **zstd-1 chunks**: plain zstandard level 1 on the same 4 MiB chunks and the same pool (one
  compressor/decompressor per thread: zstandard's objects are not thread-safe);
* **blosc2 shuffle+zstd-1**: ``blosc2.compress2`` on each whole buffer, typesize = element size,
  2 threads;
* **zipnn**: ``zipnn.ZipNN`` in byte mode with the right ``bytearray_dtype`` and ``threads=2``
  (its default method, byte grouping + Huffman). zipnn rewrites its input buffer in place, so it is
  handed a fresh copy of the input before every timed compress (the copy is not timed).

Every decompression is checked bit-exact against the input. Ratio = raw / stored bytes; throughput is
raw bytes / second in GB/s (10^9), medians of ``--reps`` repetitions, contenders rotated per repetition.
Targets (from the project's issue), for ckptvault auto: ratio >= 1.4 on bf16, compress >= 0.5 GB/s,
decompress >= 1 GB/s (throughputs judged on the two large random inputs).

Usage: ``python benchmarks/compression.py [--size-mib 256] [--reps 3] [--train-steps 300] [--json OUT]``
(about 70 s on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from _common import MIB, machine_info, md_table, median, rotated, timed, verdict
from ckptvault.format import codec

CHUNK = 4 * MIB
THREADS = 2
GB = 1e9


@dataclass
class Input:
    name: str
    dtype: str  # "bfloat16" or "float32": what zipnn is told
    itemsize: int
    buffers: list[np.ndarray]  # one contiguous uint8 array per tensor
    notes: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(b.size for b in self.buffers)


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().copy()


def _chunks(buf: np.ndarray) -> list[np.ndarray]:
    return [buf[off : off + CHUNK] for off in range(0, buf.size, CHUNK)]


# --------------------------------------------------------------------------- contenders


class Contender:
    name = "?"

    def prepare(self, inp: Input) -> Any:
        """Untimed: what ``compress`` gets (the input buffers unless the contender mutates them)."""
        return inp.buffers

    def compress(self, inp: Input, src: Any) -> tuple[int, Any]:
        """Returns (stored bytes, payload)."""
        raise NotImplementedError

    def decompress(self, inp: Input, payload: Any) -> list[Any]:
        """Returns one bytes-like output per input buffer."""
        raise NotImplementedError


class CkptvaultCodec(Contender):
    def __init__(self, compression: str, pool: ThreadPoolExecutor) -> None:
        self.compression, self.pool = compression, pool
        self.name = f"ckptvault {compression}"
        self.last_methods: list[tuple[int, ...]] = []

    def compress(self, inp: Input, src: Any) -> tuple[int, Any]:
        jobs: list[tuple[np.ndarray, tuple[int, ...]]] = []
        self.last_methods = []
        for buf in src:
            methods = codec.choose_methods(buf[: codec.SAMPLE_BYTES], inp.itemsize, self.compression)
            self.last_methods.append(methods)
            jobs += [(chunk, methods) for chunk in _chunks(buf)]
        itemsize = inp.itemsize

        def one(job: tuple[np.ndarray, tuple[int, ...]]) -> bytes | np.ndarray:
            chunk, methods = job
            if codec.codec_name(methods) == "raw":
                return chunk  # the library stores such a tensor's chunks as they are
            frame = codec.encode(chunk, itemsize, methods)
            return frame if len(frame) < chunk.size else chunk

        stored = list(self.pool.map(one, jobs))
        return sum(len(s) if isinstance(s, bytes) else s.size for s in stored), stored

    def decompress(self, inp: Input, payload: Any) -> list[Any]:
        outs = [np.empty(b.size, dtype=np.uint8) for b in inp.buffers]
        dests = [dest for out in outs for dest in _chunks(out)]

        def one(job: tuple[np.ndarray, bytes | np.ndarray]) -> None:
            dest, stored = job
            if isinstance(stored, bytes):
                codec.decode_into(stored, dest)
            else:
                dest[:] = stored

        list(self.pool.map(one, zip(dests, payload, strict=True)))
        return outs


class ZstdChunks(Contender):
    name = "zstd-1 chunks"

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        import zstandard

        self.zstandard, self.pool, self.local = zstandard, pool, threading.local()

    def _zc(self) -> Any:
        if not hasattr(self.local, "zc"):
            self.local.zc = self.zstandard.ZstdCompressor(level=1)
            self.local.zd = self.zstandard.ZstdDecompressor()
        return self.local

    def compress(self, inp: Input, src: Any) -> tuple[int, Any]:
        chunks = [chunk for buf in src for chunk in _chunks(buf)]
        frames = list(self.pool.map(lambda c: self._zc().zc.compress(c), chunks))
        return sum(len(f) for f in frames), frames

    def decompress(self, inp: Input, payload: Any) -> list[Any]:
        outs = [np.empty(b.size, dtype=np.uint8) for b in inp.buffers]
        dests = [dest for out in outs for dest in _chunks(out)]

        def one(job: tuple[np.ndarray, bytes]) -> None:
            dest, frame = job
            raw = self._zc().zd.decompress(frame, max_output_size=dest.size)
            dest[:] = np.frombuffer(raw, dtype=np.uint8)

        list(self.pool.map(one, zip(dests, payload, strict=True)))
        return outs


class Blosc2(Contender):
    name = "blosc2 shuffle+zstd-1"

    def __init__(self) -> None:
        import blosc2

        self.blosc2 = blosc2

    def compress(self, inp: Input, src: Any) -> tuple[int, Any]:
        b2 = self.blosc2
        frames = [
            b2.compress2(
                buf,
                typesize=inp.itemsize,
                clevel=1,
                codec=b2.Codec.ZSTD,
                filters=[b2.Filter.SHUFFLE],
                nthreads=THREADS,
            )
            for buf in src
        ]
        return sum(len(f) for f in frames), frames

    def decompress(self, inp: Input, payload: Any) -> list[Any]:
        outs = [np.empty(b.size, dtype=np.uint8) for b in inp.buffers]
        for frame, out in zip(payload, outs, strict=True):
            self.blosc2.decompress2(frame, dst=out, nthreads=THREADS)
        return outs


class ZipNN(Contender):
    name = "zipnn"

    def __init__(self) -> None:
        from zipnn import ZipNN as _ZipNN

        self.cls = _ZipNN

    def prepare(self, inp: Input) -> Any:
        return [bytearray(buf.tobytes()) for buf in inp.buffers]  # zipnn scribbles over its input

    def compress(self, inp: Input, src: Any) -> tuple[int, Any]:
        zipper = self.cls(input_format="byte", bytearray_dtype=inp.dtype, threads=THREADS)
        frames = [bytes(zipper.compress(buf)) for buf in src]
        return sum(len(f) for f in frames), frames

    def decompress(self, inp: Input, payload: Any) -> list[Any]:
        unzipper = self.cls(input_format="byte", bytearray_dtype=inp.dtype, threads=THREADS)
        return [unzipper.decompress(frame) for frame in payload]


# --------------------------------------------------------------------------- inputs


def random_inputs(size_mib: int, seed: int) -> list[Input]:
    gen = torch.Generator().manual_seed(seed)
    bf16 = (torch.randn(size_mib * MIB // 2, generator=gen) * 0.02).to(torch.bfloat16)
    fp32 = torch.randn(size_mib * MIB // 4, generator=gen) * 0.02
    return [
        Input("(a) random bf16", "bfloat16", 2, [_as_bytes(bf16)]),
        Input("(b) random fp32", "float32", 4, [_as_bytes(fp32)]),
    ]


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class _TinyModel(nn.Module):
    """Predicts a token from two token embeddings through residual MLP blocks."""

    def __init__(self, vocab: int, width: int, depth: int) -> None:
        super().__init__()
        self.emb_a = nn.Embedding(vocab, width)
        self.emb_b = nn.Embedding(vocab, width)
        self.blocks = nn.Sequential(*[_Block(width) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        for module in self.modules():  # GPT-style init
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.emb_a(a) + self.emb_b(b))))


def trained_inputs(steps: int, seed: int) -> list[Input]:
    torch.manual_seed(seed)
    vocab, width, depth, batch = 1024, 384, 4, 64
    model = _TinyModel(vocab, width, depth)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    started = time.perf_counter()
    losses = []
    for _ in range(steps):
        a, b = torch.randint(0, vocab, (batch,)), torch.randint(0, vocab, (batch,))
        loss = nn.functional.cross_entropy(model(a, b), (a + b % 8) % vocab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    elapsed = time.perf_counter() - started
    params = dict(model.named_parameters())
    matrices = {n: p for n, p in params.items() if p.dim() == 2}
    total = sum(p.numel() for p in params.values())
    kept = sum(p.numel() for p in matrices.values())
    note = (
        f"{total / 1e6:.2f} M params, {len(matrices)} matrices kept ({kept / total:.1%} of the bytes); "
        f"{steps} AdamW steps in {elapsed:.0f} s, "
        f"loss {median(losses[:10]):.2f} -> {median(losses[-10:]):.2f}"
    )
    fp32 = [_as_bytes(p) for p in matrices.values()]
    bf16 = [_as_bytes(p.to(torch.bfloat16)) for p in matrices.values()]
    moments = [_as_bytes(opt.state[p][key]) for p in matrices.values() for key in ("exp_avg", "exp_avg_sq")]
    return [
        Input("(c) trained fp32", "float32", 4, fp32, [note]),
        Input("(c) trained bf16", "bfloat16", 2, bf16),
        Input("(c) AdamW moments fp32 (extra)", "float32", 4, moments),
    ]


# --------------------------------------------------------------------------- run


def _check_round_trip(inp: Input, outs: list[Any], who: str) -> None:
    assert len(outs) == len(inp.buffers), who
    for i, (buf, out) in enumerate(zip(inp.buffers, outs, strict=True)):
        got = np.frombuffer(out, dtype=np.uint8)
        assert got.size == buf.size and np.array_equal(got, buf), f"{who}: buffer {i} of {inp.name} differs"


def measure(inp: Input, contenders: list[Contender], reps: int) -> dict[str, dict[str, Any]]:
    res: dict[str, dict[str, Any]] = {
        c.name: {"stored": None, "compress_s": [], "decompress_s": []} for c in contenders
    }
    for rep in range(reps):
        for contender in rotated(contenders, rep):
            src = contender.prepare(inp)
            c_s, (stored, payload) = timed(lambda c=contender, s=src: c.compress(inp, s))
            d_s, outs = timed(lambda c=contender, p=payload: c.decompress(inp, p))
            _check_round_trip(inp, outs, contender.name)
            entry = res[contender.name]
            assert entry["stored"] in (None, stored), f"{contender.name}: stored size varies between reps"
            entry["stored"] = stored
            entry["compress_s"].append(c_s)
            entry["decompress_s"].append(d_s)
            del src, payload, outs
    for entry in res.values():
        entry["ratio"] = inp.nbytes / entry["stored"]
        entry["compress_gbps"] = inp.nbytes / median(entry["compress_s"]) / GB
        entry["decompress_gbps"] = inp.nbytes / median(entry["decompress_s"]) / GB
    return res


def _methods_note(methods: list[tuple[int, ...]]) -> str:
    names = {codec.METHOD_STORED: "-", codec.METHOD_ZSTD: "z", codec.METHOD_LZ4: "l"}
    kinds: dict[str, int] = {}
    for m in methods:
        key = "".join(names[x] for x in m)
        kinds[key] = kinds.get(key, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    inputs = random_inputs(args.size_mib, args.seed) + trained_inputs(args.train_steps, args.seed)

    pool = ThreadPoolExecutor(max_workers=THREADS)
    list(pool.map(lambda _: None, range(THREADS)))  # threads started outside the timed regions
    auto, lz4 = CkptvaultCodec("auto", pool), CkptvaultCodec("lz4", pool)
    contenders: list[Contender] = [auto, lz4, ZstdChunks(pool), Blosc2(), ZipNN()]
    plane_notes: dict[str, dict[str, str]] = {}
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for inp in inputs:
        results[inp.name] = measure(inp, contenders, args.reps)
        plane_notes[inp.name] = {c.name: _methods_note(c.last_methods) for c in (auto, lz4)}
    pool.shutdown()

    info = machine_info(Path("."))
    print(
        f"# compression: {args.reps} reps, {args.size_mib} MiB random inputs, 4 MiB chunks, "
        f"{THREADS} threads; {info.get('cores_usable')} cores, torch {torch.__version__}; "
        f"GB/s = 10^9 raw bytes/s, medians"
    )
    rows = []
    for inp in inputs:
        for name, r in results[inp.name].items():
            rows.append(
                [
                    inp.name,
                    f"{inp.nbytes / MIB:.1f}",
                    name,
                    f"{r['ratio']:.3f}",
                    f"{r['compress_gbps']:.2f}",
                    f"{r['decompress_gbps']:.2f}",
                ]
            )
    headers = ["input", "MiB", "compressor", "ratio", "compress GB/s", "decompress GB/s"]
    print(md_table(headers, rows))
    print()
    for inp in inputs:
        for note in inp.notes:
            print(f"note {inp.name}: {note}")
        planes = "; ".join(f"{k}: {v}" for k, v in plane_notes[inp.name].items())
        print(f"planes {inp.name} (per tensor, plane 0 = least significant byte): {planes}")
    print()

    auto_res = {name: res["ckptvault auto"] for name, res in results.items()}
    big = ["(a) random bf16", "(b) random fp32"]
    checks: list[tuple[str, str, bool]] = []
    for name in ("(a) random bf16", "(c) trained bf16"):
        ratio = auto_res[name]["ratio"]
        checks.append((f"ratio >= 1.4 on {name}", f"{ratio:.3f}", ratio >= 1.4))
    for key, floor, label in (("compress_gbps", 0.5, "compress"), ("decompress_gbps", 1.0, "decompress")):
        for name in big:
            value = auto_res[name][key]
            checks.append((f"{label} >= {floor} GB/s on {name}", f"{value:.2f} GB/s", value >= floor))
    target_rows = [[t, m, verdict(ok)] for t, m, ok in checks]
    print(md_table(["target (ckptvault auto)", "measured", "verdict"], target_rows))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "machine": info,
            "args": {k: str(v) for k, v in vars(args).items()},
            "inputs": {inp.name: {"bytes": inp.nbytes, "tensors": len(inp.buffers)} for inp in inputs},
            "results": results,
            "planes": plane_notes,
            "targets": [{"target": t, "measured": m, "pass": ok} for t, m, ok in checks],
        }
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
