"""Checkpoints on an object store: ckptvault against the raw S3 clients, two tiers, incremental mirror.

One moto server (``python -m moto.server`` on 127.0.0.1, ``ckptvault.testing.s3server.MotoServer``)
serves everything in the same run. The state is ``--size-mib`` (default 1024) of ~200 seeded random
fp32 tensors (``_common.make_spec``/``build_state``, as in save_load.py). Medians of ``--reps``
(default 3) are reported; contenders alternate inside each repetition (the order rotates).

1. **Upload / download of one checkpoint vs the anchors.** ``ckptvault.save("s3://...", state)``
   (digests, multipart uploads, the commit: durable when it returns) against ``boto3 upload_file``
   and ``s3fs put_file`` of the same tensor bytes written back to back to a local file (written and
   fsynced once, untimed); ``ckptvault.load("s3://...", verify=True)`` (every byte hashed, tensors in
   memory) against ``boto3 download_file`` and ``s3fs get_file`` of that object into a local file
   (not fsynced: the checkpoint load lands in memory, so the anchors are spared the disk; every
   download is compared with the source after the clock stops). ckptvault runs with its defaults;
   the anchors are tuned: before the repetitions each runs once per setting of ``--chunks-mib`` x
   ``--concurrency`` (default 16,64 x 8,16) and keeps the fastest (``--no-tune``: 64 MiB x 8).
   Ratio = anchor's time / ckptvault's time (>= 1.0: ckptvault at least as fast).
2. **Two tiers.** ``CheckpointManager(local_dir, mirror="s3://...")`` against the same manager
   without a mirror, ``--saves`` (5) explicit ``manager.save(state)`` each, interleaved (order
   rotates): the training loop's blocking time per save; after each two-tier save
   ``manager.mirror.flush()`` measures local commit -> mirror idle (upload, verification, the
   remote commit, the mirror's index and tier record). Then ``--saves`` two-tier saves back to back
   (the previous upload still running: what a loop that checkpoints faster than it uploads sees).
   Both managers: ``validate="checksum"`` (no background re-read competing with the upload),
   ``keep_last=2``, ``mirror_keep_last=2``. Then **restore from the mirror**: a new manager on an
   empty local directory with the same mirror, ``restore(TrainState(...))`` (pull verified to local
   disk, then load), against ``boto3 download_file`` of the same bytes into a file, fsynced (the
   restore leaves a durable local copy too); the manager's construction is reported apart.
3. **Incremental over the mirror.** A manager with ``incremental=True`` and a mirror: save, flush;
   ~``--changed`` (10%) of the bytes changed as whole tensors (seeded choice, ``add_`` in place);
   save, flush. Bytes uploaded by the second upload (the mirror's ``CopyReport.bytes_copied``,
   from its log record, and the growth of the bucket under the mirror's prefix, by listing) against
   the first (full) upload. Target: <= 12%. (Tensors under 64 KiB, or a quarter of ``chunk_bytes``
   if less, stay inside the data file, which every upload sends whole.)

s3fs needs aiobotocore, which pins botocore; it runs in its own virtual environment given as
``--s3fs-python PATH`` (as in s3_clients.py): each s3fs operation runs in a subprocess of that
Python (``s3_clients.py --s3fs-worker``: this script shares its runners), which times itself;
without it the s3fs rows are skipped, with a note. Caveat, printed too: moto is the server, on
loopback, on the same cores as the client (its CPU time counts against everyone); real S3 differs.

Usage: ``python benchmarks/s3_checkpoint.py [--size-mib 1024] [--reps 3] [--saves 5] [--changed 0.1]
[--chunk-mib N] [--dir DIR] [--s3fs-python /path/to/venv/bin/python] [--no-tune] [--parts 1,2,3]
[--json OUT]``.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from s3_clients import Job, boto3_client, boto3_run, package_version, s3fs_via

MIB = 1024 * 1024
GIB = 1024 * MIB
TARGET_INCREMENTAL = 0.12


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- s3fs (own interpreter)


def anchor_job(**fields: Any) -> Job:
    """A Job of benchmarks/s3_clients.py (whose runners and s3fs worker this script uses)."""
    return Job(**{"src": "", "dst": "", "size": 0, "starts": (), "length": 0, "fsync": False, **fields})


# --------------------------------------------------------------------------- helpers


class TensorBag:
    """The model of the benchmark's TrainState: a ``state_dict`` of the benchmark tensors."""

    def __init__(self, tensors: dict[str, Any]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, Any]:
        return dict(self.tensors)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tensors = dict(state)


class UploadLog(logging.Handler):
    """Collects the mirror's "uploaded NAME to LABEL: BYTES bytes, CHUNKS chunks (SKIPPED already
    there) in SECONDS" log records (the CopyReport of each upload), by their arguments."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.uploads: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("uploaded %s to %s") and isinstance(record.args, tuple):
            name, _, copied, chunks, skipped, seconds = record.args
            self.uploads.append(
                {"name": name, "bytes": copied, "chunks": chunks, "skipped": skipped, "seconds": seconds}
            )


def bucket_bytes(client: Any, bucket: str, prefix: str) -> tuple[int, int]:
    """(bytes, objects) stored under ``prefix``."""
    total = count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            total += obj["Size"]
            count += 1
    return total, count


def delete_prefix(client: Any, bucket: str, prefix: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def write_raw(tensors: list[Any], path: Path) -> None:
    """The tensors' bytes back to back in one file, fsynced (the anchors' source)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t in tensors:
            view = memoryview(t.numpy()).cast("B")
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- part 1


UP_CKV, UP_BOTO, UP_S3FS = "ckptvault.save -> s3://", "boto3 upload_file", "s3fs put_file"
DOWN_CKV, DOWN_BOTO, DOWN_S3FS = "ckptvault.load(verify=True)", "boto3 download_file", "s3fs get_file"


def part_transfers(ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Upload and download of the checkpoint vs the tuned anchors (see the module docstring)."""
    import torch

    import ckptvault
    from _common import assert_same_tensors, rotated, timed, touch_pages

    state, bucket, admin, common = ctx["state"], ctx["bucket"], ctx["admin"], ctx["common"]
    s3fs = ctx["s3fs"]
    anchors: dict[str, Callable[[Job], float]] = {"boto3": boto3_run}
    if s3fs is not None:
        anchors["s3fs"] = s3fs
    settings: dict[tuple[str, str], tuple[int, int]] = {}
    tuning: dict[tuple[str, str], dict[tuple[int, int], float]] = {}
    dst = ctx["work"] / "download.bin"

    def anchor(client: str, op: str, key: str, chunk: int, conc: int) -> float:
        job = anchor_job(**common, op=op, key=key, chunk=chunk, concurrency=conc, dst=str(dst))
        elapsed = anchors[client](job)
        if op == "upload":
            size = admin.head_object(Bucket=bucket, Key=key)["ContentLength"]
            if size != ctx["nbytes"]:
                raise AssertionError(f"{client} upload: stored {size} bytes, not {ctx['nbytes']}")
        else:
            if not filecmp.cmp(ctx["raw"], dst, shallow=False):
                raise AssertionError(f"{client} download: the file differs from the source")
            dst.unlink()
        return elapsed

    grid = [(c * MIB, k) for c in args.chunks for k in args.concurrencies]
    for client in anchors:
        for op in ("upload", "download"):
            if args.no_tune:
                settings[(client, op)] = (64 * MIB, 8)
                continue
            log(f"tuning {client} {op} over {len(grid)} settings")
            tuning[(client, op)] = {s: anchor(client, op, f"tune/{client}", *s) for s in grid}
            settings[(client, op)] = min(tuning[(client, op)], key=tuning[(client, op)].__getitem__)
        if not args.no_tune:
            admin.delete_object(Bucket=bucket, Key=f"tune/{client}")

    # Untimed warm-up of ckptvault's path (imports, client, pools).
    warm = f"s3://{bucket}/warm/ckv"
    ckptvault.save(warm, {"model": {"x": torch.ones(1024)}})
    ckptvault.load(warm, map_location="cpu", verify=True)
    delete_prefix(admin, bucket, "warm/")

    up: dict[str, list[float]] = {UP_CKV: [], UP_BOTO: []}
    down: dict[str, list[float]] = {DOWN_CKV: [], DOWN_BOTO: []}
    if s3fs is not None:
        up[UP_S3FS], down[DOWN_S3FS] = [], []
    stored: list[int] = []
    for rep in range(args.reps):
        ckv_url = f"s3://{bucket}/ckv/rep{rep}"
        for name in rotated(list(up), rep):
            if name == UP_CKV:
                elapsed, _ = timed(lambda url=ckv_url: ckptvault.save(url, state))
                stored.append(bucket_bytes(admin, bucket, "ckv/")[0])  # data under ckv/.ckptvault-saves/
            else:
                client = "boto3" if name == UP_BOTO else "s3fs"
                elapsed = anchor(client, "upload", f"raw/{client}", *settings[(client, "upload")])
            up[name].append(elapsed)
            log(f"rep {rep + 1}/{args.reps} {name}: {elapsed:.3f} s")
        for name in rotated(list(down), rep):
            if name == DOWN_CKV:

                def load(url: str = ckv_url) -> Any:
                    got = ckptvault.load(url, map_location="cpu", verify=True)
                    touch_pages(got)  # already resident (not mapped): a check, nearly free
                    return got

                elapsed, loaded = timed(load)
                if rep == 0:
                    assert_same_tensors(state, loaded, "ckptvault.load from s3")
                del loaded
            else:
                client = "boto3" if name == DOWN_BOTO else "s3fs"
                elapsed = anchor(client, "download", f"raw/{client}", *settings[(client, "download")])
            down[name].append(elapsed)
            log(f"rep {rep + 1}/{args.reps} {name}: {elapsed:.3f} s")
        delete_prefix(admin, bucket, "ckv/")
        for client in anchors:
            if rep < args.reps - 1 or client != "boto3":  # boto3's object stays: part 2's anchor
                admin.delete_object(Bucket=bucket, Key=f"raw/{client}")
    return {"up": up, "down": down, "settings": settings, "tuning": tuning, "stored": stored}


def print_transfers(res: dict[str, Any], nbytes: int, reps: int) -> None:
    from _common import fmt_samples, md_table, median

    def label(name: str) -> str:
        client = "boto3" if name.startswith("boto3") else "s3fs" if name.startswith("s3fs") else None
        if client is None:
            return f"{name} (defaults)"
        op = "upload" if name in (UP_BOTO, UP_S3FS) else "download"
        chunk, conc = res["settings"][(client, op)]
        return f"{name} ({chunk // MIB} MiB x {conc})"

    for title, samples, ours in (
        ("1a. upload: state -> object store, durable on return", res["up"], UP_CKV),
        (
            "1b. download: object store -> memory (ckptvault, verified) / file (anchors)",
            res["down"],
            DOWN_CKV,
        ),
    ):
        ref = median(samples[ours])
        rows = []
        for name, values in samples.items():
            t = median(values)
            ratio = "-" if name == ours else f"{t / ref:.2f}"
            rows.append([label(name), f"{t:.3f}", f"{nbytes / MIB / t:.0f}", ratio, fmt_samples(values, 3)])
        print(f"\n## {title} ({reps} reps, medians)")
        print(md_table(["method", "median s", "MiB/s", "ckptvault/anchor (speed)", "samples s"], rows))
    if res["stored"]:
        extra = median(res["stored"]) / nbytes - 1
        print(
            f"\nckptvault's checkpoint holds {median(res['stored']) / MIB:.1f} MiB in the bucket "
            f"({extra:+.2%} vs the raw tensor bytes; MiB/s above are of the tensor bytes for all)"
        )
    if res["tuning"]:
        rows = []
        for (client, op), results in res["tuning"].items():
            for (chunk, conc), t in sorted(results.items()):
                kept = "kept" if (chunk, conc) == res["settings"][(client, op)] else ""
                rows.append(
                    [
                        f"{client} {op}",
                        f"{chunk // MIB} MiB x {conc}",
                        f"{t:.3f}",
                        f"{nbytes / MIB / t:.0f}",
                        kept,
                    ]
                )
        print("\n### anchors' tuning (one run per setting; the fastest kept above)")
        print(md_table(["anchor", "chunk x concurrency", "s", "MiB/s", ""], rows))


# --------------------------------------------------------------------------- part 2


LOCAL, TWO_TIER = "local only: manager.save", "two-tier: manager.save (mirror idle)"
BACK_TO_BACK = "two-tier: manager.save, back to back (upload in flight)"
RESTORE, RESTORE_BOTO = "restore from the mirror (empty local dir)", "boto3 download_file + fsync"
PULL = "copy_checkpoint(s3 -> empty local dir) + load(verify=True)"


def part_two_tier(ctx: dict[str, Any], args: argparse.Namespace, uploads: UploadLog) -> dict[str, Any]:
    from _common import assert_same_tensors, remove, rotated, timed
    from ckptvault import CheckpointManager, TrainState

    state, bucket, admin, work = ctx["state"], ctx["bucket"], ctx["admin"], ctx["work"]
    tensors = state["model"]
    mirror = f"s3://{bucket}/two_tier"
    opts: dict[str, Any] = {"validate": "checksum", "keep_last": 2}
    managers = {
        LOCAL: CheckpointManager(work / "local_only", **opts),
        TWO_TIER: CheckpointManager(work / "two_tier", mirror=mirror, mirror_keep_last=2, **opts),
    }
    states = {k: TrainState(model=TensorBag(tensors)) for k in managers}
    blocking: dict[str, list[float]] = {LOCAL: [], TWO_TIER: [], BACK_TO_BACK: []}
    to_remote: list[float] = []
    try:
        for i in range(args.saves):
            for key in rotated(list(managers), i):
                mgr, ts = managers[key], states[key]
                ts.step += 1
                elapsed, _ = timed(lambda m=mgr, s=ts: m.save(s))
                blocking[key].append(elapsed)
                line = f"save {i + 1}/{args.saves} {key}: {elapsed:.3f} s"
                if mgr.mirror is not None:
                    started = time.perf_counter()
                    if not mgr.mirror.flush(timeout=900):
                        raise RuntimeError(f"the mirror did not finish uploading: {mgr.mirror.last_error}")
                    to_remote.append(time.perf_counter() - started)
                    line += f", then {to_remote[-1]:.3f} s to the mirror"
                log(line)
        mgr, ts = managers[TWO_TIER], states[TWO_TIER]
        started = time.perf_counter()
        for i in range(args.saves):
            ts.step += 1
            elapsed, _ = timed(lambda: mgr.save(ts))
            blocking[BACK_TO_BACK].append(elapsed)
            log(f"back-to-back save {i + 1}/{args.saves}: {elapsed:.3f} s")
        loop_s = time.perf_counter() - started
        flushed_at = time.perf_counter()
        if not mgr.mirror.flush(timeout=1800):
            raise RuntimeError(f"the mirror did not finish uploading: {mgr.mirror.last_error}")
        drain_s = time.perf_counter() - flushed_at
        log(f"back to back: {loop_s:.1f} s of saves, then {drain_s:.1f} s until the mirror was idle")
    finally:
        for m in managers.values():
            m.close()
    newest_step = states[TWO_TIER].step
    mirrored = list(uploads.uploads)
    for key in managers:
        remove(work / ("local_only" if key == LOCAL else "two_tier"))

    # What restore does, without the mirror's uploads: a checkpoint written by ckptvault.save
    # straight to the bucket, pulled to an empty local dir (verified) and loaded from there.
    import ckptvault
    from ckptvault.engine.transfer import copy_checkpoint
    from ckptvault.storage.resolve import storage_for

    direct = f"s3://{bucket}/direct/ckpt"
    ckptvault.save(direct, state)
    src_storage, src_key = storage_for(direct)

    def pull(target: Path) -> Any:
        dst_storage, dst_key = storage_for(str(target))
        copy_checkpoint(src_storage, src_key, dst_storage, dst_key)
        return ckptvault.load(str(target), map_location="cpu", verify=True)

    restore: dict[str, list[float]] = {RESTORE: [], PULL: [], RESTORE_BOTO: []}
    construct: list[float] = []
    outcomes: list[dict[str, Any]] = []
    checked = False
    settings = ctx.get("boto3_download", (64 * MIB, 8))
    dst = work / "restore_anchor.bin"
    for rep in range(args.reps):
        for name in rotated(list(restore), rep):
            if name == PULL:
                target = work / f"pull_{rep}"
                elapsed, loaded = timed(lambda t=target: pull(t))
                if rep == 0:
                    assert_same_tensors(state, loaded, "copy_checkpoint s3 -> local, then load")
                del loaded
                remove(target)
            elif name == RESTORE:
                fresh = work / f"restore_{rep}"
                built, mgr = timed(lambda d=fresh: CheckpointManager(d, mirror=mirror, **opts))
                construct.append(built)
                ts = TrainState(model=TensorBag({}))
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        elapsed, info = timed(lambda m=mgr, s=ts: m.restore(s))
                    finally:
                        mgr.close()
                skipped = [str(w.message) for w in caught if "could not pull" in str(w.message)]
                outcomes.append({"step": ts.step if info is not None else None, "skipped": skipped})
                for text in skipped:
                    log(f"restore skipped a mirror checkpoint: {text}")
                if info is not None and ts.step == newest_step and not checked:
                    assert_same_tensors(
                        tensors, ts.parts["model"]["model"].tensors, "restore from the mirror"
                    )
                    checked = True
                remove(fresh)
            else:
                chunk, concurrency = settings
                common = {**ctx["common"], "chunk": chunk, "concurrency": concurrency}
                elapsed = boto3_run(
                    anchor_job(**common, op="download", key="raw/boto3", dst=str(dst), fsync=True)
                )
                if not filecmp.cmp(ctx["raw"], dst, shallow=False):
                    raise AssertionError("boto3 download_file: the file differs from the source")
                dst.unlink()
            restore[name].append(elapsed)
            log(f"rep {rep + 1}/{args.reps} {name}: {elapsed:.3f} s")
    remote_bytes = bucket_bytes(admin, bucket, "two_tier/")
    delete_prefix(admin, bucket, "two_tier/")
    delete_prefix(admin, bucket, "direct/")
    return {
        "blocking": blocking,
        "to_remote": to_remote,
        "back_to_back_loop_s": loop_s,
        "back_to_back_drain_s": drain_s,
        "restore": restore,
        "construct": construct,
        "outcomes": outcomes,
        "newest_step": newest_step,
        "uploads": mirrored,
        "remote_bytes": remote_bytes,
        "boto3_settings": settings,
    }


def print_two_tier(res: dict[str, Any], nbytes: int, saves: int, reps: int) -> None:
    from _common import fmt_samples, md_table, median

    ref = median(res["blocking"][LOCAL])
    rows = []
    for name, values in res["blocking"].items():
        t = median(values)
        rows.append([name, f"{t:.3f}", f"{t / ref:.2f}", fmt_samples(values, 3)])
    t = median(res["to_remote"])
    rows.append(
        ["(two-tier) local commit -> mirror idle (flush)", f"{t:.3f}", "", fmt_samples(res["to_remote"], 3)]
    )
    print(f"\n## 2a. two tiers: the training loop's blocking time per save ({saves} saves each, medians)")
    print(md_table(["what", "median s", "vs local only", "samples s"], rows))
    print(
        f"\nback to back: {saves} saves took {res['back_to_back_loop_s']:.1f} s in the loop, then "
        f"{res['back_to_back_drain_s']:.1f} s until the mirror was idle; upload rate while idle: "
        f"{nbytes / MIB / t:.0f} MiB/s of tensor bytes"
    )
    sizes = [u["bytes"] for u in res["uploads"]]
    if sizes:
        print(
            f"mirror uploads (CopyReport, from the log): {len(sizes)}, median {median(sizes) / MIB:.1f} MiB, "
            f"median {median([u['seconds'] for u in res['uploads']]):.2f} s inside copy_checkpoint"
        )
    anchor = median(res["restore"][RESTORE_BOTO])
    failed = [o for o in res["outcomes"] if o["step"] != res["newest_step"]]
    rows = []
    for name, values in res["restore"].items():
        t = median(values)
        if name == RESTORE_BOTO:
            label, ratio = f"{name} ({res['boto3_settings'][0] // MIB} MiB x {res['boto3_settings'][1]})", "-"
        else:
            label, ratio = name, f"{anchor / t:.2f}"
            if name == RESTORE and failed:
                label += f" -- FAILED {len(failed)}/{len(res['outcomes'])}, see below"
                ratio = "n/a"
        rows.append([label, f"{t:.3f}", f"{nbytes / MIB / t:.0f}", ratio, fmt_samples(values, 3)])
    c = median(res["construct"])
    rows.append(
        [
            "(info) CheckpointManager(empty dir, mirror=...)",
            f"{c:.3f}",
            "",
            "",
            fmt_samples(res["construct"], 3),
        ]
    )
    print(f"\n## 2b. restore on an empty local dir from the mirror ({reps} reps, medians)")
    print(md_table(["method", "median s", "MiB/s", "ckptvault/anchor (speed)", "samples s"], rows))
    got = [o["step"] for o in res["outcomes"]]
    skipped = sum(len(o["skipped"]) for o in res["outcomes"])
    print(
        f"restored steps: {got} (newest on the mirror: {res['newest_step']}); mirror checkpoints skipped "
        f"by restore as damaged: {skipped}"
    )
    for text in sorted({t for o in res["outcomes"] for t in o["skipped"]}):
        print(f"  SKIPPED: {text}")


# --------------------------------------------------------------------------- part 3


def part_incremental(ctx: dict[str, Any], args: argparse.Namespace, uploads: UploadLog) -> dict[str, Any]:
    import torch

    from _common import remove, timed
    from ckptvault import CheckpointManager, TrainState

    bucket, admin, work = ctx["bucket"], ctx["admin"], ctx["work"]
    tensors = {k: v.clone() for k, v in ctx["state"]["model"].items()}
    order = sorted(tensors)
    random.Random(args.seed + 7).shuffle(order)
    goal = args.changed * ctx["nbytes"]
    changed: list[str] = []
    done = 0
    for name in order:
        if done >= goal:
            break
        changed.append(name)
        done += tensors[name].numel() * 4
    results: list[dict[str, Any]] = []
    for rep in range(args.reps):
        prefix = f"incr{rep}"
        mgr = CheckpointManager(
            work / prefix,
            incremental=True,
            chunk_bytes=args.chunk_mib * MIB if args.chunk_mib else None,
            validate="checksum",
            keep_last=2,
            mirror=f"s3://{bucket}/{prefix}",
            mirror_keep_last=2,
        )
        ts = TrainState(model=TensorBag(tensors))
        row: dict[str, Any] = {}
        try:
            for which in ("first", "second"):
                if which == "second":
                    with torch.no_grad():
                        for name in changed:
                            tensors[name].add_(0.01)
                before = bucket_bytes(admin, bucket, prefix + "/")[0]
                seen = len(uploads.uploads)
                ts.step += 1
                row[f"{which}_save_s"], _ = timed(lambda m=mgr, s=ts: m.save(s))
                started = time.perf_counter()
                if not mgr.mirror.flush(timeout=900):
                    raise RuntimeError(f"the mirror did not finish uploading: {mgr.mirror.last_error}")
                row[f"{which}_upload_s"] = time.perf_counter() - started
                row[f"{which}_growth"] = bucket_bytes(admin, bucket, prefix + "/")[0] - before
                mine = uploads.uploads[seen:]
                row[f"{which}_copied"] = sum(u["bytes"] for u in mine) if mine else None
                row[f"{which}_skipped"] = sum(u["skipped"] for u in mine) if mine else None
                log(f"rep {rep + 1}/{args.reps} incremental {which}: {row}")
        finally:
            mgr.close()
        results.append(row)
        remove(work / prefix)
        delete_prefix(admin, bucket, prefix + "/")
    return {
        "rows": results,
        "changed_bytes": done,
        "changed_tensors": len(changed),
        "chunk_mib": args.chunk_mib,
    }


def print_incremental(res: dict[str, Any], nbytes: int, reps: int) -> None:
    from _common import md_table, median, verdict

    rows_in = res["rows"]

    def med(key: str) -> float:
        values = [r[key] for r in rows_in if r.get(key) is not None]
        return median(values)

    full_copied, second_copied = med("first_copied"), med("second_copied")
    full_growth, second_growth = med("first_growth"), med("second_growth")
    rows = [
        [
            "first save (all new)",
            f"{full_copied / MIB:.1f}",
            f"{full_growth / MIB:.1f}",
            "100%",
            f"{med('first_save_s'):.3f}",
            f"{med('first_upload_s'):.3f}",
        ],
        [
            f"second save ({res['changed_bytes'] / nbytes:.1%} of bytes changed)",
            f"{second_copied / MIB:.1f}",
            f"{second_growth / MIB:.1f}",
            f"{second_copied / full_copied:.1%} / {second_growth / full_growth:.1%}",
            f"{med('second_save_s'):.3f}",
            f"{med('second_upload_s'):.3f}",
        ],
    ]
    print(
        f"\n## 3. incremental over the mirror ({res['changed_tensors']} whole tensors changed, "
        f"chunk_bytes {res['chunk_mib'] or 'default'} MiB; "
        f"{reps} reps, medians)"
    )
    print(
        md_table(
            [
                "upload",
                "CopyReport MiB",
                "bucket growth MiB",
                "vs first (report / growth)",
                "save s (loop)",
                "commit -> mirror idle s",
            ],
            rows,
        )
    )
    worst = max(second_copied / full_copied, second_growth / full_growth)
    print(
        f"\ntarget: second upload <= {TARGET_INCREMENTAL:.0%} of a full one: {worst:.1%} "
        f"{verdict(worst <= TARGET_INCREMENTAL)}"
    )


# --------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--saves", type=int, default=5, help="saves per manager in part 2")
    p.add_argument("--changed", type=float, default=0.10, help="fraction of bytes changed in part 3")
    p.add_argument("--chunk-mib", type=int, default=None, help="part 3's chunk_bytes (default: ckptvault's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, default=Path("benchmarks/out/s3_checkpoint"))
    p.add_argument("--s3fs-python", default=None, help="a Python with s3fs installed (its own venv)")
    p.add_argument("--no-tune", action="store_true", help="anchors at 64 MiB x 8, no settings grid")
    p.add_argument("--chunks-mib", default="16,64", help="chunk sizes of the anchors' tuning grid")
    p.add_argument("--concurrency", default="8,16", help="concurrencies of the anchors' tuning grid")
    p.add_argument("--parts", default="1,2,3", help="which parts to run")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import boto3
    import obstore

    from _common import build_state, flatten, machine_info, make_spec
    from ckptvault.testing.s3server import MotoServer

    args.chunks = [int(c) for c in args.chunks_mib.split(",")]
    args.concurrencies = [int(k) for k in args.concurrency.split(",")]
    parts = {int(x) for x in args.parts.split(",") if x.strip()}

    s3fs: Callable[[dict[str, Any]], float] | None = None
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

    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    info = machine_info(args.dir)
    state = build_state(make_spec(args.size_mib * MIB, seed=args.seed), seed=args.seed)
    tensors = list(flatten(state).values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    raw = args.dir / "raw.bin"
    log(f"state: {len(tensors)} tensors, {nbytes / MIB:.1f} MiB; writing the anchors' source file")
    write_raw(tensors, raw)

    uploads = UploadLog()
    ckv_logger = logging.getLogger("ckptvault")
    ckv_logger.addHandler(uploads)
    ckv_logger.setLevel(logging.INFO)
    results: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        with MotoServer(log_path=args.dir / "moto.log") as server:
            os.environ.update(server.env())
            bucket = server.create_bucket("bench-ckpt")
            admin = boto3_client(server.endpoint)
            ctx: dict[str, Any] = {
                "state": state,
                "nbytes": nbytes,
                "bucket": bucket,
                "admin": admin,
                "work": args.dir,
                "raw": raw,
                "s3fs": s3fs,
                "common": {"endpoint": server.endpoint, "bucket": bucket, "src": str(raw)},
            }
            if 1 in parts:
                results["transfers"] = part_transfers(ctx, args)
                ctx["boto3_download"] = results["transfers"]["settings"][("boto3", "download")]
                log(f"part 1 done, {time.perf_counter() - started:.0f} s elapsed")
            if 2 in parts:
                if 1 not in parts:
                    boto3_run(anchor_job(**ctx["common"], op="upload", key="raw/boto3"))
                results["two_tier"] = part_two_tier(ctx, args, uploads)
                log(f"part 2 done, {time.perf_counter() - started:.0f} s elapsed")
            if 3 in parts:
                results["incremental"] = part_incremental(ctx, args, uploads)
                log(f"part 3 done, {time.perf_counter() - started:.0f} s elapsed")
    finally:
        ckv_logger.removeHandler(uploads)
        shutil.rmtree(args.dir, ignore_errors=True)
    total = time.perf_counter() - started

    import ckptvault

    print(
        f"# ckptvault checkpoints on an S3-compatible server: moto {package_version('moto')} on 127.0.0.1 "
        f"(one server, same run); state {nbytes / MIB:.0f} MiB in {len(tensors)} fp32 tensors; "
        f"{args.reps} reps, medians; {total:.0f} s in all"
    )
    print(
        f"# {info['cores_usable']} cores ({info['cores_logical']} logical), {info['ram_gib']} GiB RAM, "
        f"local files on {info['work_dir_fs']}; python {info['python']}, torch {info['torch']}, "
        f"ckptvault {getattr(ckptvault, '__version__', '?')}, obstore {obstore.__version__}, "
        f"boto3 {boto3.__version__}, moto {package_version('moto')}, {s3fs_note}"
    )
    if "transfers" in results:
        print_transfers(results["transfers"], nbytes, args.reps)
    if "two_tier" in results:
        print_two_tier(results["two_tier"], nbytes, args.saves, args.reps)
    if "incremental" in results:
        print_incremental(results["incremental"], nbytes, args.reps)
    print(
        "\nnote: moto (the server) runs on the same cores as the clients, on loopback, and keeps objects "
        "in memory; its CPU time counts against every contender. Real S3 differs."
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"bytes": nbytes, "reps": args.reps, "machine": info, "results": _jsonable(results)}
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {(k if isinstance(k, str) else "|".join(map(str, k))): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


if __name__ == "__main__":
    sys.exit(main())
