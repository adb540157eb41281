"""S3 clients side by side: boto3, s3fs and obstore against one S3-compatible server (moto, loopback).

No ckptvault storage code here: this measures the clients (and the server), to tell the S3 backend
which client and which transfer settings to use. One moto server (``python -m moto.server`` on
127.0.0.1, started by this script, ``ckptvault.testing.s3server.MotoServer``) serves every client in
the same run. The object is ``--size-mib`` (default 1024) of seeded random bytes in a local file,
written and fsynced once before anything is timed.

Operations, per client (each its own row; the clock includes everything up to durability):

* **upload**, file on local disk -> object: boto3 ``upload_file`` (managed multipart transfer with a
  ``TransferConfig``), s3fs ``put_file``, obstore ``put(store, key, Path)`` (multipart from the file)
  and obstore ``open_writer`` (the file read in 16 MiB pieces into a streaming multipart writer);
* **download**, object -> file, fsynced before the clock stops: boto3 ``download_file``, s3fs
  ``get_file``, obstore ``get`` streamed into the file, obstore ``get_range_async`` x N in parallel
  (chunks ``pwrite``-n at their offsets) and obstore ``get_ranges`` (all chunks in one call);
* **64 random 1 MiB ranges** (seeded offsets, the same for every client), each client's natural batch
  read: boto3 ``get_object(Range=...)`` in a 16-thread pool, s3fs ``cat_ranges``, obstore ``get_ranges``;
* **one 256 MiB range** (from offset size/4): boto3 ``get_object(Range=...)``, s3fs ``cat_file``,
  obstore ``get_range``.

Every download and range read is checked against the source file after the clock stops.

Transfer settings: before the timed repetitions, each tunable method (chunk size and concurrency) runs
once per setting of a grid (``--chunks-mib`` x ``--concurrency``, default 16,64 x 8,16); the fastest
setting is kept for the repetitions and the tuning table is printed too (``--no-tune``: 64 MiB x 8).
Clients run with their default integrity settings (boto3 1.36+ sends a CRC32 on uploads; obstore signs
the payload's SHA-256).

s3fs needs aiobotocore, which pins botocore to a narrow range; installing it where boto3 lives would
change boto3's botocore. So s3fs runs in its own virtual environment, given as ``--s3fs-python PATH``
(a Python with ``s3fs`` installed): each s3fs operation runs in a subprocess of that Python (this
file, ``--s3fs-worker``), which times itself and reports back; the process start is not timed.
Without ``--s3fs-python`` the s3fs rows are skipped, with a note.

Between repetitions every object is deleted (moto keeps objects in its memory and temporary files).
The order of the clients rotates every repetition; medians of ``--reps`` (default 3) are reported,
with MiB/s and the speed relative to the best of each operation. The moto server's peak RSS is
printed too.

Caveat, printed with the results: moto reads the *whole* object for every GET, ranged or not, under
a per-object lock, so on this server a ranged GET costs as much as a full one and ranged GETs of one
object are serialized: range reads and parallel ranged downloads measure moto, not the client, and
favour big chunks. Uploads and single-stream downloads are the fair comparison; real S3 differs.

Usage: ``python benchmarks/s3_clients.py [--size-mib 1024] [--reps 3] [--dir DIR]
[--s3fs-python /path/to/venv/bin/python] [--no-tune] [--only A,B] [--json OUT]``
(``--only``: substrings of row names, e.g. ``obstore,upload``; any match keeps a row).
"""

from __future__ import annotations

import argparse
import asyncio
import filecmp
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
GIB = 1024 * MIB
RANGE_COUNT = 64
RANGE_BYTES = MIB
BIG_RANGE_BYTES = 256 * MIB
READ_PIECE = 16 * MIB
ACCESS_KEY = SECRET_KEY = "testing"
REGION = "us-east-1"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Job:
    """What one timed operation needs; also the s3fs worker's input (as JSON)."""

    op: str  # upload | download | ranges | range
    endpoint: str
    bucket: str
    key: str
    src: str
    dst: str
    size: int
    starts: tuple[int, ...]
    length: int
    chunk: int = 64 * MIB
    concurrency: int = 8
    fsync: bool = True  # downloads: fsync the file before the clock stops


# --------------------------------------------------------------------------- s3fs (own interpreter)


def s3fs_run(job: Job) -> float:
    """One s3fs operation, timed here; runs in the s3fs interpreter (stdlib + s3fs only)."""
    import s3fs

    fs = s3fs.S3FileSystem(
        key=ACCESS_KEY,
        secret=SECRET_KEY,
        endpoint_url=job.endpoint,
        client_kwargs={"region_name": REGION},
        max_concurrency=job.concurrency,
    )
    path = f"{job.bucket}/{job.key}"
    start = time.perf_counter()
    if job.op == "upload":
        fs.put_file(job.src, path, chunksize=job.chunk, max_concurrency=job.concurrency)
    elif job.op == "download":
        fs.get_file(path, job.dst, chunksize=job.chunk, max_concurrency=job.concurrency)
        if job.fsync:
            fsync_file(job.dst)
    elif job.op == "ranges":
        ends = [s + job.length for s in job.starts]
        blobs = fs.cat_ranges([path] * len(job.starts), list(job.starts), ends)
        elapsed = time.perf_counter() - start
        with open(job.src, "rb") as fh:
            for s, blob in zip(job.starts, blobs, strict=True):
                if blob != os.pread(fh.fileno(), job.length, s):
                    raise AssertionError(f"s3fs cat_ranges: range at {s} differs")
        return elapsed
    elif job.op == "range":
        s = job.starts[0]
        blob = fs.cat_file(path, start=s, end=s + job.length)
        elapsed = time.perf_counter() - start
        with open(job.src, "rb") as fh:
            if blob != os.pread(fh.fileno(), job.length, s):
                raise AssertionError("s3fs cat_file: range differs")
        return elapsed
    else:
        raise ValueError(job.op)
    return time.perf_counter() - start


def s3fs_via(python: str) -> Callable[[Job], float]:
    def run(job: Job) -> float:
        payload = json.dumps(job.__dict__)
        out = subprocess.run(
            [python, str(Path(__file__).resolve()), "--s3fs-worker", payload],
            check=True,
            capture_output=True,
            text=True,
        )
        return float(json.loads(out.stdout.strip().splitlines()[-1])["elapsed"])

    return run


# --------------------------------------------------------------------------- boto3


def boto3_client(endpoint: str, pool: int = 32) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=Config(max_pool_connections=pool, s3={"addressing_style": "path"}, read_timeout=300),
    )


def boto3_transfer_config(job: Job) -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=job.chunk,
        multipart_chunksize=job.chunk,
        max_concurrency=job.concurrency,
        use_threads=True,
    )


def boto3_run(job: Job) -> float:
    client = boto3_client(job.endpoint, pool=max(32, job.concurrency + 4))
    start = time.perf_counter()
    if job.op == "upload":
        client.upload_file(job.src, job.bucket, job.key, Config=boto3_transfer_config(job))
    elif job.op == "download":
        client.download_file(job.bucket, job.key, job.dst, Config=boto3_transfer_config(job))
        if job.fsync:
            fsync_file(job.dst)
    elif job.op == "ranges":

        def one(s: int) -> bytes:
            rng = f"bytes={s}-{s + job.length - 1}"
            return bytes(client.get_object(Bucket=job.bucket, Key=job.key, Range=rng)["Body"].read())

        with ThreadPoolExecutor(16) as pool:
            blobs = list(pool.map(one, job.starts))
        elapsed = time.perf_counter() - start
        check_ranges("boto3 get_object ranges", job, blobs)
        return elapsed
    elif job.op == "range":
        s = job.starts[0]
        rng = f"bytes={s}-{s + job.length - 1}"
        blob = client.get_object(Bucket=job.bucket, Key=job.key, Range=rng)["Body"].read()
        elapsed = time.perf_counter() - start
        check_ranges("boto3 get_object range", job, [blob])
        return elapsed
    else:
        raise ValueError(job.op)
    return time.perf_counter() - start


# --------------------------------------------------------------------------- obstore


def obstore_store(endpoint: str, bucket: str) -> Any:
    from obstore.store import S3Store

    return S3Store(
        bucket,
        endpoint=endpoint,
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        region=REGION,
        client_options={"allow_http": True, "timeout": "300s"},
    )


def obstore_put(job: Job) -> float:
    import obstore

    store = obstore_store(job.endpoint, job.bucket)
    start = time.perf_counter()
    obstore.put(store, job.key, Path(job.src), chunk_size=job.chunk, max_concurrency=job.concurrency)
    return time.perf_counter() - start


def obstore_writer(job: Job) -> float:
    import obstore

    store = obstore_store(job.endpoint, job.bucket)
    start = time.perf_counter()
    with (
        open(job.src, "rb", buffering=0) as fh,
        obstore.open_writer(store, job.key, buffer_size=job.chunk, max_concurrency=job.concurrency) as w,
    ):
        while piece := fh.read(READ_PIECE):
            w.write(piece)
    return time.perf_counter() - start


def obstore_get_stream(job: Job) -> float:
    import obstore

    store = obstore_store(job.endpoint, job.bucket)
    start = time.perf_counter()
    with open(job.dst, "wb", buffering=0) as fh:
        for chunk in obstore.get(store, job.key).stream(min_chunk_size=8 * MIB):
            view = memoryview(chunk)
            while view:
                view = view[fh.write(view) :]
        os.fsync(fh.fileno())
    return time.perf_counter() - start


def _chunks(size: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, size)) for s in range(0, size, chunk)]


def obstore_get_parallel(job: Job) -> float:
    import obstore

    store = obstore_store(job.endpoint, job.bucket)

    async def fetch_all(fd: int) -> None:
        gate = asyncio.Semaphore(job.concurrency)

        async def one(s: int, e: int) -> None:
            async with gate:
                data = await obstore.get_range_async(store, job.key, start=s, end=e)
            view, at = memoryview(data), s
            while view:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n

        await asyncio.gather(*(one(s, e) for s, e in _chunks(job.size, job.chunk)))

    start = time.perf_counter()
    fd = os.open(job.dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, job.size)
        asyncio.run(fetch_all(fd))
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def obstore_get_ranges_file(job: Job) -> float:
    import obstore

    store = obstore_store(job.endpoint, job.bucket)
    spans = _chunks(job.size, job.chunk)
    start = time.perf_counter()
    blobs = obstore.get_ranges(store, job.key, starts=[s for s, _ in spans], ends=[e for _, e in spans])
    fd = os.open(job.dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for (s, _), blob in zip(spans, blobs, strict=True):
            view, at = memoryview(blob), s
            while view:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def obstore_ranges(job: Job) -> float:
    import obstore

    store = obstore_store(job.endpoint, job.bucket)
    start = time.perf_counter()
    if job.op == "ranges":
        blobs = obstore.get_ranges(
            store, job.key, starts=list(job.starts), ends=[s + job.length for s in job.starts]
        )
    else:
        s = job.starts[0]
        blobs = [obstore.get_range(store, job.key, start=s, end=s + job.length)]
    elapsed = time.perf_counter() - start
    check_ranges(f"obstore {job.op}", job, [bytes(b) for b in blobs])
    return elapsed


def check_ranges(what: str, job: Job, blobs: list[bytes]) -> None:
    with open(job.src, "rb") as fh:
        for s, blob in zip(job.starts, blobs, strict=True):
            if bytes(blob) != os.pread(fh.fileno(), job.length, s):
                raise AssertionError(f"{what}: range at {s} differs")


# --------------------------------------------------------------------------- the table of methods


@dataclass
class Method:
    name: str  # the row label
    client: str  # boto3 | s3fs | obstore: the object key prefix, and the order rotation unit
    op: str  # upload | download | ranges | range
    run: Callable[[Job], float]
    tunable: bool = False
    chunk: int = 64 * MIB
    concurrency: int = 8
    samples: list[float] = field(default_factory=list)
    tuning: dict[tuple[int, int], float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.tunable:
            return self.name
        return f"{self.name} ({self.chunk // MIB} MiB x {self.concurrency})"


OP_TITLES = {
    "upload": "upload (file -> object)",
    "download": "download (object -> fsynced file)",
    "ranges": f"{RANGE_COUNT} random {RANGE_BYTES // MIB} MiB ranges",
    "range": f"one {BIG_RANGE_BYTES // MIB} MiB range",
}


def methods(s3fs: Callable[[Job], float] | None) -> list[Method]:
    table = [
        Method("boto3 upload_file", "boto3", "upload", boto3_run, tunable=True),
        Method("obstore put(Path)", "obstore", "upload", obstore_put, tunable=True),
        Method("obstore open_writer", "obstore", "upload", obstore_writer, tunable=True),
        Method("boto3 download_file", "boto3", "download", boto3_run, tunable=True),
        Method("obstore get, streamed", "obstore", "download", obstore_get_stream),
        Method("obstore get_range_async x N", "obstore", "download", obstore_get_parallel, tunable=True),
        Method("obstore get_ranges, one call", "obstore", "download", obstore_get_ranges_file),
        Method("boto3 get_object x 16 threads", "boto3", "ranges", boto3_run),
        Method("obstore get_ranges", "obstore", "ranges", obstore_ranges),
        Method("boto3 get_object(Range)", "boto3", "range", boto3_run),
        Method("obstore get_range", "obstore", "range", obstore_ranges),
    ]
    if s3fs is not None:
        table += [
            Method("s3fs put_file", "s3fs", "upload", s3fs, tunable=True),
            Method("s3fs get_file", "s3fs", "download", s3fs, tunable=True),
            Method("s3fs cat_ranges", "s3fs", "ranges", s3fs),
            Method("s3fs cat_file(start, end)", "s3fs", "range", s3fs),
        ]
    order = list(OP_TITLES)
    return sorted(table, key=lambda m: order.index(m.op))


# --------------------------------------------------------------------------- driver


class PeakRss:
    """Polls a process's RSS (the moto server's) in a thread; ``peak`` in bytes."""

    def __init__(self, pid: int) -> None:
        import psutil

        self._proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.peak = max(self.peak, self._proc.memory_info().rss)
            except Exception:  # the process is gone
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def make_source(path: Path, nbytes: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb", buffering=0) as fh:
        left = nbytes
        while left:
            n = min(left, 16 * MIB)
            fh.write(rng.randbytes(n))
            left -= n
        os.fsync(fh.fileno())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, default=Path("benchmarks/out/s3_clients"))
    p.add_argument("--s3fs-python", default=None, help="a Python with s3fs installed (its own venv)")
    p.add_argument("--no-tune", action="store_true", help="skip the settings grid: 64 MiB x 8 for all")
    p.add_argument("--chunks-mib", default="16,64", help="chunk sizes of the tuning grid")
    p.add_argument("--concurrency", default="8,16", help="concurrencies of the tuning grid")
    p.add_argument("--only", default=None, help="comma-separated substrings: run only matching rows")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--s3fs-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.s3fs_worker is not None:  # in the s3fs interpreter: stdlib + s3fs only from here
        raw = json.loads(args.s3fs_worker)
        raw["starts"] = tuple(raw["starts"])
        print(json.dumps({"elapsed": s3fs_run(Job(**raw))}))
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from _common import fmt_samples, machine_info, md_table, median, rotated
    from ckptvault.testing.s3server import MotoServer

    if args.size_mib < 2 * BIG_RANGE_BYTES // MIB:
        p.error(
            f"--size-mib must be at least {2 * BIG_RANGE_BYTES // MIB} (the 256 MiB range starts at size/4)"
        )
    nbytes = args.size_mib * MIB
    grid = [(int(c) * MIB, int(k)) for c in args.chunks_mib.split(",") for k in args.concurrency.split(",")]

    s3fs: Callable[[Job], float] | None = None
    s3fs_note = ""
    if args.s3fs_python:
        probe = subprocess.run(
            [args.s3fs_python, "-c", "import s3fs; print(s3fs.__version__)"], capture_output=True
        )
        if probe.returncode == 0:
            s3fs = s3fs_via(args.s3fs_python)
            s3fs_note = f"s3fs {probe.stdout.decode().strip()} (in {args.s3fs_python})"
        else:
            s3fs_note = f"s3fs skipped: {args.s3fs_python} cannot import s3fs"
    else:
        s3fs_note = "s3fs skipped: no --s3fs-python (s3fs pins botocore; give it its own venv)"
    log(s3fs_note)

    table = methods(s3fs)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        table = [m for m in table if any(w in m.name or w == m.op for w in wanted)]

    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    info = machine_info(args.dir)
    src, dst = args.dir / "source.bin", args.dir / "download.bin"
    log(f"writing the {args.size_mib} MiB source file")
    make_source(src, nbytes, args.seed)
    rng = random.Random(args.seed + 1)
    starts = tuple(rng.randrange(0, nbytes - RANGE_BYTES + 1) for _ in range(RANGE_COUNT))
    big_start = (nbytes // 4,)

    import boto3
    import obstore

    started = time.perf_counter()
    clients = sorted({m.client for m in table})
    try:
        with MotoServer(log_path=args.dir / "moto.log") as server:
            rss = PeakRss(server.pid or 0)
            bucket = server.create_bucket("bench-bucket")
            admin = boto3_client(server.endpoint)
            common = {"endpoint": server.endpoint, "bucket": bucket, "src": str(src), "dst": str(dst)}

            def base_for(m: Method) -> dict[str, Any]:
                if m.op == "ranges":
                    return {**common, "size": nbytes, "starts": starts, "length": RANGE_BYTES}
                if m.op == "range":
                    return {**common, "size": nbytes, "starts": big_start, "length": BIG_RANGE_BYTES}
                return {**common, "size": nbytes, "starts": (), "length": 0}

            def block(client: str, phase: str) -> None:
                rows = [m for m in table if m.client == client]
                if phase == "tune":
                    # Tuning: the client's tunable rows, each over the grid; an upload first, so the
                    # downloads have their object.
                    needs_object = any(m.op != "upload" for m in rows)
                    tun = [m for m in rows if m.tunable]
                    if needs_object and not any(m.op == "upload" for m in tun):
                        tun = [next(m for m in rows if m.op == "upload"), *tun]
                    rows = tun
                for m in rows:
                    m_settings = grid if (phase == "tune" and m.tunable) else [(m.chunk, m.concurrency)]
                    base = base_for(m)
                    key = f"{client}/object"
                    for chunk, conc in m_settings:
                        job = Job(op=m.op, key=key, chunk=chunk, concurrency=conc, **base)
                        elapsed = m.run(job)
                        if m.op == "upload":
                            size = admin.head_object(Bucket=bucket, Key=key)["ContentLength"]
                            if size != nbytes:
                                raise AssertionError(f"{m.name}: stored {size} bytes, not {nbytes}")
                        if m.op == "download":
                            if not filecmp.cmp(src, dst, shallow=False):
                                raise AssertionError(f"{m.name}: the downloaded file differs")
                            dst.unlink()
                        if phase == "tune" and m.tunable:
                            m.tuning[(chunk, conc)] = elapsed
                        elif phase == "run":
                            m.samples.append(elapsed)
                admin.delete_object(Bucket=bucket, Key=f"{client}/object")

            if not args.no_tune:
                for client in clients:
                    log(f"tuning {client} over {len(grid)} settings")
                    block(client, "tune")
                    for m in table:
                        if m.client == client and m.tuning:
                            m.chunk, m.concurrency = min(m.tuning, key=m.tuning.__getitem__)
                log(f"tuning done, {time.perf_counter() - started:.0f} s elapsed")
            for rep in range(args.reps):
                for client in rotated(clients, rep):
                    block(client, "run")
                log(f"rep {rep + 1}/{args.reps} done, {time.perf_counter() - started:.0f} s elapsed")
            moto_peak = rss.stop()
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)

    print(
        f"# S3 clients against moto {package_version('moto')} on 127.0.0.1 (one server, same run): "
        f"{args.size_mib} MiB object, {args.reps} reps (client order rotates), medians; "
        f"{info['cores_usable']} cores, {info['ram_gib']} GiB RAM, local files on {info['work_dir_fs']}"
    )
    print(
        f"# boto3 {boto3.__version__}, obstore {obstore.__version__}, {s3fs_note}; "
        f"moto server peak RSS {moto_peak / GIB:.2f} GiB"
    )
    results: dict[str, Any] = {}
    for op, title in OP_TITLES.items():
        rows_m = [m for m in table if m.op == op and m.samples]
        if not rows_m:
            continue
        moved = {"upload": nbytes, "download": nbytes, "ranges": RANGE_COUNT * RANGE_BYTES}.get(
            op, BIG_RANGE_BYTES
        )
        med = {m.label: median(m.samples) for m in rows_m}
        best = min(med.values())
        print(f"\n## {title}")
        rows = []
        for m in rows_m:
            t = med[m.label]
            rows.append(
                [m.label, f"{t:.3f}", f"{moved / MIB / t:.0f}", f"{best / t:.2f}x", fmt_samples(m.samples, 3)]
            )
            results[m.label] = {"op": op, "samples_s": m.samples, "median_s": t, "mib_per_s": moved / MIB / t}
        print(md_table(["method", "median s", "MiB/s", "speed vs best", "samples s"], rows))
    tuned = [m for m in table if m.tuning]
    if tuned:
        print("\n## tuning (one run per setting; the fastest kept above)")
        rows = []
        for m in tuned:
            for (chunk, conc), t in sorted(m.tuning.items()):
                kept = "kept" if (chunk, conc) == (m.chunk, m.concurrency) else ""
                rows.append(
                    [m.name, f"{chunk // MIB} MiB x {conc}", f"{t:.3f}", f"{nbytes / MIB / t:.0f}", kept]
                )
        print(md_table(["method", "chunk x concurrency", "s", "MiB/s", ""], rows))
    print(
        "\nnote: moto reads the whole object for every GET (ranged or not) under a per-object lock, so"
        " range reads and parallel ranged downloads measure moto here, and big chunks win; real S3 differs."
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "bytes": nbytes,
            "reps": args.reps,
            "machine": info,
            "moto_peak_rss": moto_peak,
            "results": results,
            "tuning": {m.name: {f"{c // MIB}MiBx{k}": t for (c, k), t in m.tuning.items()} for m in tuned},
        }
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


def package_version(name: str) -> str:
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
