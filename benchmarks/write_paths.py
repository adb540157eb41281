"""Write-path benchmark: the fastest way to make ~1 GiB of in-memory bytes durable in files.

No ckptvault here: this measures the disk and the kernel, to tell the writer which path to take.
The bytes (``--size-mib``, default 1024) sit in one page-aligned anonymous map (``mmap.mmap(-1, n)``,
seeded random contents, touched before the first run), so every method writes the very same memory
and O_DIRECT can use it without a bounce copy. Each method writes into a fresh directory under
``--dir`` and stops the clock only once the bytes are durable: every file fsynced, then the directory
fsynced (for all methods alike, since a new file is not durable before its directory entry is).
Outputs are deleted and ``os.sync()`` is called between runs, outside the timed region.

Methods:

* **buffered 64 MiB** (the baseline): one file, ``os.write`` in 64 MiB pieces, then ``fsync``;
* **buffered + early writeback**: the same, but every 256 MiB the kernel is told to start writing
  back the piece just written (``sync_file_range(WRITE)``) and to wait for the one before it, so the
  disk works while the next piece is copied; ``fdatasync`` every 256 MiB where sync_file_range is
  not available;
* **O_DIRECT 4/16/64 MiB**: one file opened with ``O_DIRECT`` (no page cache), written in pieces
  of that size straight from the aligned map, then ``fsync``; "unsupported" on EINVAL;
* **N files x N threads**: the bytes split in N consecutive parts, one file and one thread each
  (write in 64 MiB pieces, fsync, close);
* **pwrite x N threads, 1 file**: one file (``ftruncate`` to its size first), N threads each
  ``os.pwrite`` its own range in 64 MiB pieces, then one ``fsync``;
* **chunks K MiB x 4 threads**: like a content-addressed chunk store, size/K files of K MiB each,
  written by a pool of 4 threads (create, write, fsync, close per file).

Methods alternate within each repetition (the order rotates every repetition), after one untimed
buffered warm-up write; medians reported.
Usage: ``python benchmarks/write_paths.py [--size-mib 1024] [--reps 5] [--dir DIR] [--only A,B] [--json OUT]``
(``--only``: substrings of method names; the buffered baseline always runs).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import GIB, MIB, fmt_samples, machine_info, md_table, median, rotated, timed

BASELINE = "buffered 64 MiB"
EARLY_EVERY = 256 * MIB
WRITE_PIECE = 64 * MIB

# sync_file_range flags (linux/fs.h)
SFR_WAIT_BEFORE, SFR_WRITE, SFR_WAIT_AFTER = 1, 2, 4


class Unsupported(Exception):
    """The filesystem refused the method (O_DIRECT: EINVAL)."""


# --------------------------------------------------------------------------- primitives


def write_all(fd: int, data: memoryview, offset: int | None = None) -> None:
    """Write all of ``data`` (looping over short writes), with ``pwrite`` when ``offset`` is given."""
    done = 0
    while done < len(data):
        rest = data[done:]
        n = os.write(fd, rest) if offset is None else os.pwrite(fd, rest, offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        done += n


def write_pieces(fd: int, data: memoryview, piece: int, offset: int | None = None) -> None:
    for start in range(0, len(data), piece):
        write_all(fd, data[start : start + piece], None if offset is None else offset + start)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create(path: Path, extra_flags: int = 0) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | extra_flags, 0o644)


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` through ctypes, or None where it is missing."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def call(fd: int, offset: int, nbytes: int, flags: int) -> int:
        if fn(fd, offset, nbytes, flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return 0

    return call


SYNC_FILE_RANGE = _sync_file_range()


# --------------------------------------------------------------------------- methods


def buffered(data: memoryview, out: Path, piece: int = WRITE_PIECE) -> None:
    fd = create(out / "data.bin")
    try:
        write_pieces(fd, data, piece)
        os.fsync(fd)
    finally:
        os.close(fd)


def buffered_early(data: memoryview, out: Path) -> None:
    """Buffered writes, with writeback started every EARLY_EVERY bytes instead of at the final fsync."""
    fd = create(out / "data.bin")
    try:
        prev: tuple[int, int] | None = None
        for start in range(0, len(data), EARLY_EVERY):
            part = data[start : start + EARLY_EVERY]
            write_pieces(fd, part, WRITE_PIECE)
            if SYNC_FILE_RANGE is None:
                os.fdatasync(fd)
                continue
            SYNC_FILE_RANGE(fd, start, len(part), SFR_WRITE)  # start writeback of this piece
            if prev is not None:  # and wait for the previous one, so dirty pages stay bounded
                SYNC_FILE_RANGE(fd, prev[0], prev[1], SFR_WAIT_BEFORE | SFR_WRITE | SFR_WAIT_AFTER)
            prev = (start, len(part))
        os.fsync(fd)  # metadata and anything left
    finally:
        os.close(fd)


def direct(data: memoryview, out: Path, piece: int) -> None:
    if not hasattr(os, "O_DIRECT"):
        raise Unsupported("os.O_DIRECT missing on this platform")
    try:
        fd = create(out / "data.bin", os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise Unsupported(f"open(O_DIRECT): {exc}") from exc
        raise
    try:
        try:
            write_pieces(fd, data, piece)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise Unsupported(f"write(O_DIRECT): {exc}") from exc
            raise
        os.fsync(fd)
    finally:
        os.close(fd)


def split(total: int, parts: int, align: int = 4096) -> list[tuple[int, int]]:
    """``parts`` consecutive (start, end) ranges covering [0, total), boundaries aligned."""
    step = -(-total // parts)
    step = -(-step // align) * align
    return [(s, min(s + step, total)) for s in range(0, total, step)]


def parallel_files(data: memoryview, out: Path, threads: int) -> None:
    def one(i: int, start: int, end: int) -> None:
        fd = create(out / f"part_{i}.bin")
        try:
            write_pieces(fd, data[start:end], WRITE_PIECE)
            os.fsync(fd)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(one, i, s, e) for i, (s, e) in enumerate(split(len(data), threads))]
        for f in futures:
            f.result()


def parallel_pwrite(data: memoryview, out: Path, threads: int) -> None:
    fd = create(out / "data.bin")
    try:
        os.ftruncate(fd, len(data))
        with ThreadPoolExecutor(max_workers=threads) as pool:
            futures = [
                pool.submit(write_pieces, fd, data[s:e], WRITE_PIECE, s) for s, e in split(len(data), threads)
            ]
            for f in futures:
                f.result()
        os.fsync(fd)
    finally:
        os.close(fd)


def chunk_files(data: memoryview, out: Path, chunk: int, threads: int = 4) -> None:
    def one(i: int) -> None:
        fd = create(out / f"{i:06x}")
        try:
            write_all(fd, data[i * chunk : (i + 1) * chunk])
            os.fsync(fd)
        finally:
            os.close(fd)

    count = -(-len(data) // chunk)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(one, range(count)):
            pass


def methods() -> dict[str, Callable[[memoryview, Path], None]]:
    early = "buffered + sync_file_range/256 MiB" if SYNC_FILE_RANGE else "buffered + fdatasync/256 MiB"
    return {
        BASELINE: buffered,
        early: buffered_early,
        "O_DIRECT 4 MiB": lambda d, o: direct(d, o, 4 * MIB),
        "O_DIRECT 16 MiB": lambda d, o: direct(d, o, 16 * MIB),
        "O_DIRECT 64 MiB": lambda d, o: direct(d, o, 64 * MIB),
        "2 files x 2 threads": lambda d, o: parallel_files(d, o, 2),
        "4 files x 4 threads": lambda d, o: parallel_files(d, o, 4),
        "pwrite x 2 threads, 1 file": lambda d, o: parallel_pwrite(d, o, 2),
        "pwrite x 4 threads, 1 file": lambda d, o: parallel_pwrite(d, o, 4),
        "chunks 1 MiB x 4 threads": lambda d, o: chunk_files(d, o, 1 * MIB),
        "chunks 4 MiB x 4 threads": lambda d, o: chunk_files(d, o, 4 * MIB),
        "chunks 16 MiB x 4 threads": lambda d, o: chunk_files(d, o, 16 * MIB),
    }


# --------------------------------------------------------------------------- driver


def make_data(nbytes: int, seed: int) -> tuple[mmap.mmap, memoryview]:
    """A page-aligned anonymous map of ``nbytes`` seeded random bytes (every page touched)."""
    area = mmap.mmap(-1, nbytes)
    view = np.frombuffer(area, dtype=np.uint8)
    rng = np.random.default_rng(seed)
    step = 64 * MIB
    for start in range(0, nbytes, step):
        end = min(start + step, nbytes)
        view[start:end] = rng.integers(0, 256, size=end - start, dtype=np.uint8)
    del view
    return area, memoryview(area)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, default=Path("benchmarks/out/write_paths"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--only", default=None, help="comma-separated substrings: run only matching methods")
    args = p.parse_args(argv)
    if args.size_mib < 16 or args.size_mib % 16:
        p.error("--size-mib must be a positive multiple of 16 (whole 16 MiB chunks, aligned O_DIRECT)")

    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    nbytes = args.size_mib * MIB
    free = shutil.disk_usage(args.dir).free
    if free < 4 * nbytes:
        log(f"warning: only {free / GIB:.1f} GiB free under {args.dir}")
    info = machine_info(args.dir)
    area, data = make_data(nbytes, args.seed)
    table = methods()
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        table = {k: v for k, v in table.items() if k == BASELINE or any(w in k for w in wanted)}
    samples: dict[str, list[float]] = {name: [] for name in table}
    unsupported: dict[str, str] = {}
    started = time.perf_counter()
    try:
        warm = args.dir / "warmup"  # untimed: the first big write of a process is often much slower
        warm.mkdir()
        buffered(data, warm)
        shutil.rmtree(warm)
        os.sync()
        for rep in range(args.reps):
            for name in rotated(list(table), rep):
                if name in unsupported:
                    continue
                out = args.dir / f"rep{rep}_{list(table).index(name)}"
                out.mkdir()
                fsync_dir(args.dir)
                os.sync()

                def run(fn: Callable[[memoryview, Path], None] = table[name], out: Path = out) -> None:
                    fn(data, out)
                    fsync_dir(out)

                try:
                    elapsed, _ = timed(run)
                    samples[name].append(elapsed)
                except Unsupported as exc:
                    unsupported[name] = str(exc)
                finally:
                    shutil.rmtree(out, ignore_errors=True)
                    os.sync()
            log(f"rep {rep + 1}/{args.reps} done, {time.perf_counter() - started:.0f} s elapsed")
    finally:
        data.release()
        area.close()
        shutil.rmtree(args.dir, ignore_errors=True)

    med = {k: median(v) for k, v in samples.items() if k not in unsupported}
    base = med[BASELINE]
    print(
        f"# write paths: {nbytes / GIB:.2f} GiB from memory to durable files, {args.reps} reps "
        f"(order rotates), medians; {info['cores_usable']} cores, {info['ram_gib']} GiB RAM, "
        f"{info['work_dir_fs']} ({info['work_dir_free_gib']} GiB free)"
    )
    rows = []
    for name in table:
        if name in unsupported:
            rows.append([name, "unsupported", "-", "-", unsupported[name]])
            continue
        m = med[name]
        rows.append(
            [name, f"{m:.3f}", f"{nbytes / GIB / m:.2f}", f"{base / m:.2f}x", fmt_samples(samples[name], 3)]
        )
    print(md_table(["method", "median s", "GiB/s", "speed vs buffered", "samples s"], rows))
    best = min(med, key=med.__getitem__)
    print(
        f"\nwinner: {best} at {med[best]:.3f} s ({nbytes / GIB / med[best]:.2f} GiB/s), "
        f"{base / med[best]:.2f}x the speed of the buffered baseline ({base:.3f} s)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload: dict[str, Any] = {
            "bytes": nbytes,
            "reps": args.reps,
            "machine": info,
            "results": {
                name: (
                    {"unsupported": unsupported[name]}
                    if name in unsupported
                    else {
                        "samples_s": samples[name],
                        "median_s": med[name],
                        "gib_per_s": nbytes / GIB / med[name],
                        "speed_vs_buffered": base / med[name],
                    }
                )
                for name in table
            },
            "winner": best,
        }
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
