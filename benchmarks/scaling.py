"""Scaling curves: how each cost grows with the work (issue 18, item 5).

Four curves, each a few points on a log scale; every point is the median of a few repetitions (the
raw samples are kept in the JSON). For each series the table gives the fitted exponent (least-squares
slope of log time against log size over all points: 1 is linear, below 1 means fixed costs still
matter, above 1 is worse than linear), the slope between the two largest points (the exponent where
fixed costs no longer hide anything), and the marginal cost per unit between those two points.

1. ``size``: ``ckptvault.save`` (fsync and atomic publish included), ``ckptvault.load`` (verified,
   every 4 KiB page touched; page cache warm: the file was just written), ``load(verify=False)``, and
   lazy ``open`` + one 1 MiB tensor, against the state size (16 MiB -> 4 GiB, 200 fp32 tensors drawn
   by ``_common.make_spec`` plus the fixed 1 MiB ``probe`` tensor the lazy read fetches).
2. ``count``: the same save / load / lazy open + one tensor against the number of tensors (10 ->
   100,000), every tensor 8 KiB (2,048 fp32), so bytes grow with the count too.
3. ``runs``: one CheckpointManager run holding N checkpoints (10 -> 10,000):
   ``ckptvault ls RUN`` (the CLI in-process, its output discarded; table and ``--json``),
   ``CheckpointManager(run)`` + ``restore(state)`` (what a resumed job pays) and ``restore`` alone,
   the per-commit bookkeeping (``apply_retention`` with a policy that keeps everything, and the
   index rewrite, both private calls timed on an open manager), one ``manager.step`` that saves
   while N checkpoints are kept (public; includes the write and its fsyncs), and one save whose
   retention (``keep_last=1``) deletes the N older checkpoints (on a hard-linked copy of the run).
   Building 10,000 checkpoints with real saves costs O(N^2) (every save rewrites the whole index;
   see docs/scaling.md), so the run is grown like ``catalog.py`` grows its tree: the manager saves
   the first checkpoints for real, the others are clones of its newest one (data and sidecar files
   hard-linked, the manifest rewritten with its own step, time and loss; the checkpoint id stays
   the template's, which the data file's header names), and at
   every point the manager is reopened (it indexes the clones from their manifests), restores the
   newest clone and saves one real checkpoint on top, so the newest checkpoint is always real.
4. ``catalog``: ``Catalog.find`` on an open catalog (several queries of ``catalog.py``), open + sync
   with nothing changed, and open + sync + the acceptance query (what ``ckptvault find`` does, less
   interpreter start-up), against the checkpoints catalogued (1,000 -> 1,000,000). Points up to
   ``--catalog-real`` (100,000) index a real tree (``catalog.generate``: one real checkpoint per
   run, the rest manifest-only clones) through the catalog's own sync, whose rate is reported
   (manifests/s). Indexing 1,000,000 manifests that way takes longer than this benchmark's budget
   (~1,000 manifests/s here), so the larger points replicate the indexed rows inside SQLite
   (``INSERT ... SELECT`` into copies of every run under ``replica_<k>/``, fresh checkpoint ids,
   fresh random ``val_acc``/``loss``; config, tags and the other metrics copied): the tables and
   indexes are exactly what a sync would have written, only the manifests are missing. Replicated
   points are marked in the table; open + sync is not measured there (it costs per directory, and
   the replicas have none).

Fairness: one untimed warm-up per operation; gc collected before and paused during each timed call;
the order of the read series rotates every repetition; medians reported. The machine is shared and
noisy: treat exponents within ~0.1 of 1 as linear. Scratch data lives in a temp dir under ``--dir``
and is deleted after each curve.

Usage: ``python benchmarks/scaling.py [--quick] [--only size,count,runs,catalog] [--reps N]
[--dir DIR] [--json OUT] [--png OUT] [--fresh]``. Each invocation merges its curves into the JSON
(``benchmarks/out/scaling.json``, ``scaling-quick.json`` with ``--quick``) and redraws the table and
the PNG from all curves there, so the full set can be measured in several invocations.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    GIB,
    KIB,
    MIB,
    build_state,
    machine_info,
    make_spec,
    md_table,
    median,
    remove,
    rotated,
    timed,
    touch_pages,
)

CURVES = ("size", "count", "runs", "catalog")
LINEAR_SLACK = 0.15  # an exponent up to 1 + this is "linear" on this noisy machine

FULL_POINTS: dict[str, list[int]] = {
    "size": [16, 64, 256, 1024, 4096],  # MiB
    "count": [10, 100, 1_000, 10_000, 100_000],
    "runs": [10, 100, 1_000, 10_000],
    "catalog": [1_000, 10_000, 100_000, 300_000, 1_000_000],
}
QUICK_POINTS: dict[str, list[int]] = {
    "size": [4, 16, 64],
    "count": [10, 100, 1_000],
    "runs": [10, 30, 100],
    "catalog": [200, 1_000, 3_000],
}
CATALOG_PER_RUN = {"full": 1000, "quick": 100}
CATALOG_REAL = {"full": 100_000, "quick": 1_000}

PROBE_NUMEL = 256 * KIB  # the 1 MiB fp32 tensor the size curve's lazy read fetches
COUNT_NUMEL = 2048  # 8 KiB fp32 tensors in the count curve

X_LABELS = {
    "size": "state size (MiB)",
    "count": "tensors (8 KiB each)",
    "runs": "checkpoints in the run",
    "catalog": "checkpoints in the catalog",
}
UNITS = {"size": (GIB / MIB, "GiB"), "count": (1000, "1k tensors"), "runs": (1, "checkpoint")}


def log(msg: str) -> None:
    print(f"[scaling] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- fitting


def fit_exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x) (NaN with fewer than two usable points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else float("nan")


def top_slope(xs: list[float], ys: list[float]) -> float:
    """The exponent between the two largest points."""
    if len(xs) < 2 or ys[-1] <= 0 or ys[-2] <= 0:
        return float("nan")
    return math.log(ys[-1] / ys[-2]) / math.log(xs[-1] / xs[-2])


def marginal(xs: list[float], ys: list[float]) -> float:
    """Seconds per unit of x between the two largest points."""
    if len(xs) < 2:
        return float("nan")
    return (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])


class Curve:
    """Samples of several series over the points of one curve."""

    def __init__(self, name: str, points: list[int]) -> None:
        self.name = name
        self.points = points
        self.x: list[float] = []  # the measured size of each point (bytes for "size", in MiB)
        self.series: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self.point_info: list[dict[str, Any]] = []

    def add(self, key: str, label: str, index: int, samples: list[float]) -> None:
        s = self.series.setdefault(key, {"label": label, "samples": {}})
        s["samples"][str(index)] = samples

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "x_label": X_LABELS[self.name],
            "points": self.points,
            "x": self.x,
            "point_info": self.point_info,
            "notes": self.notes,
            "series": {},
        }
        for key, s in self.series.items():
            idx = sorted(int(i) for i in s["samples"])
            xs = [self.x[i] for i in idx]
            meds = [median(s["samples"][str(i)]) for i in idx]
            out["series"][key] = {
                "label": s["label"],
                "x": xs,
                "samples_s": [s["samples"][str(i)] for i in idx],
                "median_s": meds,
                "exponent": fit_exponent(xs, meds),
                "top_slope": top_slope(xs, meds),
                "marginal_s_per_x": marginal(xs, meds),
            }
        return out


def _rep_times(fn: Callable[[], Any], reps: int, warm: bool = True) -> list[float]:
    if warm:
        fn()
    return [timed(fn)[0] for _ in range(reps)]


def _cheap_samples(fn: Callable[[], Any], reps: int) -> list[float]:
    """Cheap calls are noisy on this shared machine: 7 samples when one takes < 0.5 s."""
    first = timed(fn)[0]  # warm-up, and the cost estimate
    return _rep_times(fn, 7 if first < 0.5 else reps, warm=False)


# --------------------------------------------------------------------------- 1. size


def curve_size(work: Path, points: list[int], reps: int) -> Curve:
    import ckptvault as cv

    curve = Curve("size", points)
    for i, mib in enumerate(points):
        spec = make_spec(mib * MIB, count=200, seed=0)
        state: dict[str, Any] = build_state(spec, seed=0)
        state["probe"] = torch.randn(PROBE_NUMEL, generator=torch.Generator().manual_seed(1))
        nbytes = spec.nbytes + 4 * PROBE_NUMEL
        curve.x.append(nbytes / MIB)
        path = work / f"size_{mib}"
        point_reps = reps if mib <= 1024 else max(2, reps - 2)
        log(f"size {mib} MiB: {point_reps} saves")

        def save(p: Path = path, st: dict[str, Any] = state) -> None:
            cv.save(p, st)

        remove(path)
        save()  # warm-up
        saves = []
        for _ in range(point_reps):
            remove(path)
            os.sync()
            saves.append(timed(save)[0])
        curve.add("save", "save (fsync, publish)", i, saves)
        del state, save  # (``save`` holds the state too): the loads below get its memory

        def load_touch(p: Path = path, verify: bool = True) -> float:
            return touch_pages(cv.load(p, verify=verify))

        def lazy(p: Path = path) -> float:
            with cv.open(p) as ck:
                return float(ck["probe"][0])

        fns: dict[str, Callable[[], Any]] = {
            "load": load_touch,
            "load_nv": lambda p=path: load_touch(p, verify=False),
        }
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for fn in fns.values():
            fn()
        for rep in range(point_reps):
            for key in rotated(list(fns), rep):
                samples[key].append(timed(fns[key])[0])
        curve.add("load", "load (verified, pages touched)", i, samples["load"])
        curve.add("load_nv", "load(verify=False), pages touched", i, samples["load_nv"])
        samples["lazy"] = _cheap_samples(lazy, point_reps)
        curve.add("lazy", "open + one 1 MiB tensor (verified)", i, samples["lazy"])
        remove(path)
        log(
            f"size {mib} MiB: save {median(saves):.3f} s, load {median(samples['load']):.3f} s, "
            f"lazy {median(samples['lazy']) * 1000:.2f} ms"
        )
    return curve


# --------------------------------------------------------------------------- 2. count


def curve_count(work: Path, points: list[int], reps: int) -> Curve:
    import ckptvault as cv

    curve = Curve("count", points)
    for i, count in enumerate(points):
        gen = torch.Generator().manual_seed(count)
        state = {
            "model": {f"layer_{j}.weight": torch.randn(COUNT_NUMEL, generator=gen) for j in range(count)}
        }
        name = f"layer_{count // 2}.weight"
        curve.x.append(float(count))
        curve.point_info.append({"count": count, "mib": count * COUNT_NUMEL * 4 / MIB})
        path = work / f"count_{count}"
        point_reps = reps if count <= 10_000 else max(2, reps - 2)

        def save(p: Path = path, st: dict[str, Any] = state) -> None:
            cv.save(p, st)

        remove(path)
        save()  # warm-up
        saves = []
        for _ in range(point_reps):
            remove(path)
            os.sync()
            saves.append(timed(save)[0])
        curve.add("save", "save (fsync, publish)", i, saves)
        del state, save  # (``save`` holds the state too): the loads below get its memory

        def load(p: Path = path) -> float:
            return touch_pages(cv.load(p))

        def lazy(p: Path = path, n: str = name) -> float:
            with cv.open(p) as ck:
                return float(ck["model"][n][0])

        fns: dict[str, Callable[[], Any]] = {"load": load}
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for fn in fns.values():
            fn()
        for rep in range(point_reps):
            for key in rotated(list(fns), rep):
                samples[key].append(timed(fns[key])[0])
        curve.add("load", "load (verified, pages touched)", i, samples["load"])
        samples["lazy"] = _cheap_samples(lazy, point_reps)
        curve.add("lazy", "open + one 8 KiB tensor (verified)", i, samples["lazy"])
        manifest = path / "manifest.json"
        curve.point_info[-1]["manifest_mib"] = manifest.stat().st_size / MIB if manifest.exists() else None
        remove(path)
        log(
            f"count {count:,}: save {median(saves):.3f} s, load {median(samples['load']):.3f} s, "
            f"lazy {median(samples['lazy']) * 1000:.2f} ms"
        )
    return curve


# --------------------------------------------------------------------------- 3. runs


def _clone_checkpoints(run: Path, template_name: str, first: int, last: int, seed: int) -> None:
    """Checkpoints ``first..last`` (inclusive) of ``run`` as clones of ``template_name``: data and
    sidecar hard-linked, the manifest rewritten with its own step, commit time and loss. The
    checkpoint id stays the template's: the data file's header names it, so a clone with another
    id would fail verification ("files from different checkpoints mixed")."""
    from ckptvault.manager import checkpoint_name

    rng = random.Random(seed)
    template_dir = run / template_name
    doc = json.loads((template_dir / "manifest.json").read_bytes())
    files = [p for p in template_dir.iterdir() if p.name != "manifest.json"]
    meta = doc["metadata"]["v"]
    tree = doc["tree"]["v"]
    base = time.time() - 3600.0
    created = datetime.fromtimestamp(base, tz=timezone.utc)
    for step in range(first, last + 1):
        directory = run / checkpoint_name("full", step)
        directory.mkdir()
        for f in files:
            os.link(f, directory / f.name)
        doc["step"] = step
        doc["created_at"] = (created + timedelta(seconds=step)).isoformat(timespec="microseconds")
        tree["step"] = step
        meta["step"] = step
        meta["committed_at"] = base + step
        if isinstance(meta.get("metrics"), dict) and isinstance(meta["metrics"].get("v"), dict):
            meta["metrics"]["v"]["loss"] = round(rng.random(), 6)
        (directory / "manifest.json").write_text(json.dumps(doc, separators=(",", ":")))


def _ls(run: Path, as_json: bool) -> None:
    from ckptvault.cli.main import app

    sink = io.StringIO()
    args = ["ls", str(run), *(["--json"] if as_json else [])]
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(io.StringIO()):
        try:
            app(args, standalone_mode=False)
        except SystemExit as exc:  # pragma: no cover - ls exits 0 when it could list
            if exc.code not in (0, None):
                raise


def _copy_run(run: Path, dst: Path) -> None:
    """A hard-linked copy of a closed run (``cp -al``), without its lease file."""
    subprocess.run(["cp", "-al", str(run), str(dst)], check=True)
    for lock in dst.glob(".ckptvault-run.lock*"):
        lock.unlink()


def curve_runs(work: Path, points: list[int], reps: int) -> Curve:
    import ckptvault as cv
    from ckptvault.manager import checkpoint_name

    curve = Curve("runs", points)
    run = work / "run"

    def new_state() -> Any:
        torch.manual_seed(0)
        return cv.TrainState(model=torch.nn.Linear(64, 64))

    warnings.filterwarnings("ignore", module="ckptvault")
    real_first = min(points[0], 10)
    with cv.CheckpointManager(run, every_n_steps=1) as manager:
        state = new_state()
        for k in range(real_first):
            manager.step(state, {"loss": 1.0 / (k + 1)})
    top = real_first  # the newest step in the run (always a real save)
    for i, n in enumerate(points):
        started = time.perf_counter()
        if n - 1 > top:
            _clone_checkpoints(run, checkpoint_name("full", top), top + 1, n - 1, seed=n)
            # reopen (indexes the clones), resume from the newest clone, save one real checkpoint
            with cv.CheckpointManager(run, every_n_steps=1) as manager:
                state = new_state()
                manager.restore(state)
                manager.step(state, {"loss": 0.5})
                top = state.step
        count = sum(1 for _ in run.glob("step_*"))
        curve.x.append(float(count))
        curve.point_info.append({"checkpoints": count, "grow_s": time.perf_counter() - started})
        log(f"runs {n:,}: run holds {count:,} checkpoints (grown in {time.perf_counter() - started:.1f} s)")

        # ls, table and --json (in-process)
        r = reps if n < 10_000 else min(reps, 2)  # ls and delete cost seconds there
        ls_fns: dict[str, Callable[[], Any]] = {
            "ls": lambda: _ls(run, False),
            "ls_json": lambda: _ls(run, True),
        }
        samples: dict[str, list[float]] = {k: [] for k in ls_fns}
        for fn in ls_fns.values() if n <= 1000 else ():  # (a warm-up at 10k: 20 s)
            fn()
        for rep in range(r):
            for key in rotated(list(ls_fns), rep):
                samples[key].append(timed(ls_fns[key])[0])
        curve.add("ls", "ckptvault ls RUN (in-process)", i, samples["ls"])
        curve.add("ls_json", "ckptvault ls RUN --json (in-process)", i, samples["ls_json"])

        # resume = construct + restore; restore alone
        def resume() -> Any:
            with cv.CheckpointManager(run) as m:
                return m.restore(new_state())

        resumes = _rep_times(resume, r)
        restores = []
        for _ in range(r):
            with cv.CheckpointManager(run) as m:
                st = new_state()
                restores.append(timed(lambda m=m, st=st: m.restore(st))[0])
        curve.add("resume", "CheckpointManager(run) + restore(state)", i, resumes)
        curve.add("restore", "manager.restore(state) alone", i, restores)

        # per-commit bookkeeping on an open manager (keep_last huge: configured, keeps everything)
        with cv.CheckpointManager(run, every_n_steps=1, keep_last=10**9) as m:
            book = m._book
            retention = _cheap_samples(lambda b=book: b.apply_retention("full"), reps)
            index = _cheap_samples(book.write_index, reps)
            st = new_state()
            m.restore(st)
            step_saves = _rep_times(lambda m=m, st=st: m.step(st, {"loss": 0.25}), reps, warm=True)
            top = st.step
        curve.add("retention", "retention decision, nothing deleted (apply_retention)", i, retention)
        curve.add("index", "index rewrite (write_index)", i, index)
        curve.add("step_save", "manager.step() that saves, N kept", i, step_saves)

        # a save whose retention deletes the N older checkpoints (each rep on a hard-linked copy)
        deletes = []
        for rep in range(1 if n >= 1000 else min(reps, 3)):
            copy = work / f"copy_{rep}"
            _copy_run(run, copy)
            with cv.CheckpointManager(copy, every_n_steps=1, keep_last=1) as m:
                st = new_state()
                m.restore(st)
                deletes.append(timed(lambda m=m, st=st: m.step(st, {"loss": 0.125}))[0])
                left = len(m.checkpoints())
            remove(copy)
            curve.point_info[-1]["left_after_delete"] = left
        curve.add("delete", "step() whose retention deletes the N older (keep_last=1)", i, deletes)
        log(
            f"runs {count:,}: ls {median(samples['ls']) * 1000:.1f} ms, "
            f"resume {median(resumes) * 1000:.1f} ms, "
            f"restore {median(restores) * 1000:.1f} ms, retention {median(retention) * 1000:.2f} ms, "
            f"index {median(index) * 1000:.2f} ms, step-save {median(step_saves) * 1000:.1f} ms, "
            f"delete-all {median(deletes):.2f} s"
        )
    remove(run)
    return curve


# --------------------------------------------------------------------------- 4. catalog

# key: (label, where, sort, limit); the run filter names a run of the first batch
FIND_QUERIES: dict[str, tuple[str, str, str, int | None]] = {
    "acceptance": ("find 'val_acc > 0.9 and step >= 1000' --sort -val_acc --limit 5",
                   "val_acc > 0.9 and step >= 1000", "-val_acc", 5),
    "config": ("find \"config.optimizer.name = 'adam' and config.lr < 0.01\" --sort -val_acc --limit 10",
               "config.optimizer.name = 'adam' and config.lr < 0.01", "-val_acc", 10),
    "run": ("find \"run = '<one run>'\" (its 1,000 rows)", "run = '{run}'", "", None),
    "sort_step": ("find '' --sort -step --limit 10", "", "-step", 10),
    "narrow": ("find 'loss < 0.0005 and tag.stage = \"main\"' --sort step (rows grow with N)",
               'loss < 0.0005 and tag.stage = "main"', "step", None),
    "git": ("find \"git ~ '0000003*'\" --limit 20", "git ~ '0000003*'", "", 20),
}  # fmt: skip


def _replicate(db_path: Path, copies: range, base_max_id: int) -> float:
    """Copies of every row of checkpoints ``1..base_max_id`` under ``replica_<k>/``; returns seconds."""
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA synchronous=NORMAL")
        start = time.perf_counter()
        for k in copies:
            prefix = f"replica_{k:03d}/"
            rnd = "round(abs(random()) / 9223372036854775807.0, 6)"
            db.execute("BEGIN")
            db.execute(
                "INSERT INTO runs (run_dir, run_id, config_json, git_commit, data_version) "
                "SELECT ? || run_dir, run_id, config_json, git_commit, data_version FROM runs "
                "WHERE run_dir NOT LIKE 'replica\\_%' ESCAPE '\\'",
                (prefix,),
            )
            db.execute(
                "INSERT INTO checkpoints (path, run_dir, name, checkpoint_id, step, epoch, scope, "
                "created_at, size_bytes, tensor_bytes, num_tensors, run_id, git_commit, config_json, "
                "validation_level, validation_passed, manifest_mtime_ns) "
                "SELECT ? || path, ? || run_dir, name, lower(hex(randomblob(16))), step, epoch, scope, "
                "created_at, size_bytes, tensor_bytes, num_tensors, run_id, git_commit, config_json, "
                "validation_level, validation_passed, manifest_mtime_ns FROM checkpoints "
                "WHERE id <= ? ORDER BY id",
                (prefix, prefix, base_max_id),
            )
            first_path = "(SELECT path FROM checkpoints WHERE id = 1)"
            new_first = db.execute(
                f"SELECT id FROM checkpoints WHERE path = ? || {first_path}", (prefix,)
            ).fetchone()[0]
            # ids were assigned in id order and the base ids are 1..base_max_id without gaps (checked)
            offset = new_first - 1
            db.execute(
                "INSERT INTO metrics (checkpoint, name, value) SELECT checkpoint + ?, name, "
                f"CASE WHEN name IN ('val_acc', 'loss') AND value IS NOT NULL THEN {rnd} ELSE value END "
                "FROM metrics WHERE checkpoint <= ?",
                (offset, base_max_id),
            )
            db.execute(
                "INSERT INTO config (checkpoint, key, value, num) SELECT checkpoint + ?, key, value, num "
                "FROM config WHERE checkpoint <= ?",
                (offset, base_max_id),
            )
            db.execute(
                "INSERT INTO tags (checkpoint, key, value) SELECT checkpoint + ?, key, value "
                "FROM tags WHERE checkpoint <= ?",
                (offset, base_max_id),
            )
            db.execute("COMMIT")
            log(f"replica {k}: {time.perf_counter() - start:.1f} s")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return time.perf_counter() - start
    finally:
        db.close()


def _find_samples(catalog: Any, reps: int, one_run: str) -> dict[str, tuple[list[float], int]]:
    wheres = {key: where.format(run=one_run) for key, (_, where, _, _) in FIND_QUERIES.items()}
    calls = {
        key: (lambda w=wheres[key], s=sort, n=limit: catalog.find(w, sort=s, limit=n))
        for key, (_, _, sort, limit) in FIND_QUERIES.items()
    }
    rows = {key: len(call()) for key, call in calls.items()}  # warm-up
    samples: dict[str, list[float]] = {k: [] for k in calls}
    for rep in range(reps):
        for key in rotated(list(calls), rep):
            samples[key].append(timed(calls[key])[0])
    return {k: (samples[k], rows[k]) for k in calls}


def curve_catalog(work: Path, points: list[int], reps: int, per_run: int, real_max: int) -> Curve:
    from catalog import generate  # benchmarks/catalog.py: the tree generator
    from ckptvault.catalog.store import Catalog

    curve = Curve("catalog", points)
    root = work / "root"
    root.mkdir()
    made = 0
    batch = 0
    db_path = root / ".ckptvault" / "catalog.sqlite"
    base_max_id = 0
    one_run = "batch_000/project_0/run_000"
    _, where, sort, limit = FIND_QUERIES["acceptance"]
    for i, n in enumerate(points):
        replicated = n > real_max
        info: dict[str, Any] = {"checkpoints": n, "replicated": replicated}
        if not replicated:
            runs = (n - made) // per_run
            if runs > 0:
                log(f"catalog {n:,}: generating {runs * per_run:,} checkpoints ({runs} runs)")
                _, gen_s = generate(root / f"batch_{batch:03d}", runs, per_run, seed=batch)
                batch += 1
                made += runs * per_run
                info["generate_s"] = gen_s
                time.sleep(2.5)  # out of the catalog's racy-mtime window
                added = runs * per_run
                sync_s, catalog = timed(lambda: Catalog(root))
                catalog.close()
                info["sync_new_s"] = sync_s
                info["sync_manifests_per_s"] = added / sync_s
                rate = added / sync_s
                log(f"catalog {n:,}: sync indexed {added:,} manifests in {sync_s:.1f} s ({rate:,.0f}/s)")
            opens = _rep_times(lambda: Catalog(root).close(), reps)
            curve.add("open_sync", "Catalog(root): open + sync, nothing changed", i, opens)

            def cli_like() -> int:
                with Catalog(root) as fresh:
                    return len(fresh.find(where, sort=sort, limit=limit))

            curve.add("open_find", "open + sync + acceptance find (ckptvault find, in-process)", i,
                      _rep_times(cli_like, reps))  # fmt: skip
            with Catalog(root, sync=False) as catalog:
                total = catalog.count()
            base_max_id = total
        else:
            with sqlite3.connect(db_path) as db:
                have, top_id = db.execute("SELECT count(*), max(id) FROM checkpoints").fetchone()
                if top_id != have:
                    raise AssertionError(f"checkpoint ids have gaps ({have} rows, max id {top_id})")
            copies_needed = math.ceil(n / base_max_id) - math.ceil(have / base_max_id)
            first = have // base_max_id
            log(f"catalog {n:,}: replicating {copies_needed} x {base_max_id:,} rows in SQLite")
            info["replicate_s"] = _replicate(db_path, range(first, first + copies_needed), base_max_id)
            with Catalog(root, sync=False) as catalog:
                total = catalog.count()
        info["catalog_mib"] = db_path.stat().st_size / MIB
        curve.x.append(float(total))
        with Catalog(root, sync=False) as catalog:
            found = _find_samples(catalog, reps, one_run)
        for key, (samples, rows) in found.items():
            curve.add(key, FIND_QUERIES[key][0], i, samples)
            info[f"rows_{key}"] = rows
        curve.point_info.append(info)
        log(
            f"catalog {total:,}{' (replicated)' if replicated else ''}: "
            + ", ".join(f"{k} {median(v[0]) * 1000:.1f} ms" for k, v in found.items())
        )
    remove(root)
    return curve


# --------------------------------------------------------------------------- report


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def _fmt_x(curve: str, x: float) -> str:
    if curve == "size":
        return f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:.0f} MiB"
    return f"{x:,.0f}"


def _per_unit(curve: str, seconds_per_x: float) -> str:
    if not math.isfinite(seconds_per_x):
        return "-"
    if curve == "size":
        return f"{seconds_per_x * 1024:.3f} s/GiB"
    if curve == "count":
        return f"{seconds_per_x * 1e6:.1f} us/tensor"
    if curve == "runs":
        return f"{seconds_per_x * 1e3:.3f} ms/checkpoint"
    return f"{seconds_per_x * 1e9:.1f} ns/row"


def verdict(exponent: float, top: float) -> str:
    worst = max(e for e in (exponent, top) if math.isfinite(e)) if math.isfinite(exponent) else float("nan")
    if not math.isfinite(worst):
        return "-"
    if exponent <= 1 + LINEAR_SLACK and top <= 1 + 2 * LINEAR_SLACK:
        return "linear or better"
    return "SUPERLINEAR"


def report(results: dict[str, Any]) -> str:
    out: list[str] = []
    summary: list[list[str]] = []
    for name in CURVES:
        curve = results["curves"].get(name)
        if curve is None:
            continue
        xs = curve["x"]
        replicated = [bool(p.get("replicated")) for p in curve.get("point_info", [])] or [False] * len(xs)
        heads = [_fmt_x(name, x) + (" (r)" if r else "") for x, r in zip(xs, replicated, strict=False)]
        out.append(f"\n## {name}: median time vs {curve['x_label']}\n")
        rows = []
        for s in curve["series"].values():
            cells = {round(x, 6): m for x, m in zip(s["x"], s["median_s"], strict=True)}
            rows.append(
                [
                    s["label"],
                    *[_fmt_time(cells.get(round(x, 6), float("nan"))) for x in xs],
                    f"{s['exponent']:.2f}",
                    f"{s['top_slope']:.2f}",
                    _per_unit(name, s["marginal_s_per_x"]),
                ]
            )
            summary.append(
                [name, s["label"], f"{s['exponent']:.2f}", f"{s['top_slope']:.2f}",
                 _per_unit(name, s["marginal_s_per_x"]), verdict(s["exponent"], s["top_slope"])]
            )  # fmt: skip
        out.append(md_table(["series", *heads, "exponent", "top slope", "marginal cost"], rows))
        if name == "catalog" and any(replicated):
            out.append("\n(r): rows replicated in SQLite from the indexed tree (see the docstring)")
        for note in curve.get("notes", []):
            out.append(f"\nnote: {note}")
        extra = _point_notes(name, curve)
        if extra:
            out.append("\n" + extra)
    out.append("\n## Summary (exponent: fit over all points; top slope: between the two largest)\n")
    out.append(md_table(["curve", "series", "exponent", "top slope", "marginal cost", "verdict"], summary))
    return "\n".join(out)


def _point_notes(name: str, curve: dict[str, Any]) -> str:
    info = curve.get("point_info", [])
    if name == "catalog":
        rates = [f"{p['sync_manifests_per_s']:,.0f}/s" for p in info if "sync_manifests_per_s" in p]
        reps = [f"{p['replicate_s']:.0f} s" for p in info if "replicate_s" in p]
        sizes = [f"{p['catalog_mib']:.0f}" for p in info if "catalog_mib" in p]
        parts = []
        if rates:
            parts.append(f"sync indexing rate of new manifests: {', '.join(rates)}")
        if reps:
            parts.append(f"SQLite replication: {', '.join(reps)}")
        if sizes:
            parts.append(f"catalog size (MiB): {', '.join(sizes)}")
        rows = [str(p.get("rows_narrow", "?")) for p in info]
        parts.append(f"'narrow' rows returned: {', '.join(rows)}")
        return "; ".join(parts)
    if name == "count":
        mans = [f"{p['manifest_mib']:.2f}" for p in info if p.get("manifest_mib") is not None]
        return f"manifest size (MiB): {', '.join(mans)}" if mans else ""
    if name == "runs":
        left = [str(p.get("left_after_delete", "?")) for p in info]
        return f"checkpoints left after the keep_last=1 save: {', '.join(left)}"
    return ""


def draw(results: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in CURVES if n in results["curves"]]
    if not names:
        return
    cols = 2 if len(names) > 1 else 1
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 5 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        curve = results["curves"][name]
        for s in curve["series"].values():
            xs, ys = s["x"], s["median_s"]
            if not xs:
                continue
            ax.plot(xs, ys, marker="o", label=f"{s['label']} (k={s['exponent']:.2f})")
        info = curve.get("point_info", [])
        rep_x = [x for x, p in zip(curve["x"], info, strict=False) if p.get("replicated")]
        for x in rep_x:
            ax.axvline(x, color="grey", linestyle=":", linewidth=0.8)
        # a slope-1 guide through the first point of the first series
        first = next(iter(curve["series"].values()))
        if first["x"]:
            x0, y0 = first["x"][0], first["median_s"][0]
            x1 = first["x"][-1]
            ax.plot(
                [x0, x1], [y0, y0 * x1 / x0], color="black", linestyle="--", linewidth=0.8, label="slope 1"
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(curve["x_label"] + (" (dotted: replicated rows)" if rep_x else ""))
        ax.set_ylabel("median seconds")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle("ckptvault scaling (log-log; k = fitted exponent)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    out_dir = Path(__file__).resolve().parent / "out"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="small points (a smoke run)")
    p.add_argument("--only", default=",".join(CURVES), help=f"comma-separated curves of {', '.join(CURVES)}")
    p.add_argument("--reps", type=int, default=None, help="repetitions per point (default 3, quick 2)")
    p.add_argument(
        "--points",
        action="append",
        default=[],
        help="override a curve's points: CURVE=a,b,c (e.g. count=10,100); repeatable",
    )
    p.add_argument(
        "--catalog-real", type=int, default=None, help="largest catalog point indexed from a real tree"
    )
    p.add_argument("--catalog-per-run", type=int, default=None, help="checkpoints per generated run")
    p.add_argument("--dir", type=Path, default=out_dir, help="parent of the scratch dir (not tmpfs)")
    p.add_argument("--json", type=Path, default=None, help="results (merged with earlier invocations)")
    p.add_argument("--png", type=Path, default=None, help="the figure")
    p.add_argument("--fresh", action="store_true", help="do not merge with the existing JSON")
    args = p.parse_args(argv)
    suffix = "-quick" if args.quick else ""
    args.json = args.json or out_dir / f"scaling{suffix}.json"
    args.png = args.png or out_dir / f"scaling{suffix}.png"
    args.reps = args.reps or (2 if args.quick else 3)
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(only) - set(CURVES))
    if unknown:
        p.error(f"unknown curve(s) {unknown}; choose from {CURVES}")
    args.only = only
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    points = dict(QUICK_POINTS if args.quick else FULL_POINTS)
    for spec in args.points:
        name, _, values = spec.partition("=")
        if name not in CURVES:
            raise SystemExit(f"--points: unknown curve {name!r}")
        points[name] = [int(v) for v in values.split(",")]
    args.dir.mkdir(parents=True, exist_ok=True)
    info = machine_info(args.dir)
    print("# ckptvault scaling curves\n")
    print(
        f"machine: {info['cores_usable']} usable cores, {info['ram_gib']} GiB RAM, {info['platform']}; "
        f"python {info['python']}, torch {info['torch']}, sqlite {sqlite3.sqlite_version}"
    )
    print(f"scratch filesystem: {info['work_dir_fs']} ({info['work_dir_free_gib']} GiB free)")
    print(f"mode {mode}, reps {args.reps}, curves measured now: {', '.join(args.only)}")

    results: dict[str, Any] = {"curves": {}, "runs": []}
    if args.json.exists() and not args.fresh:
        with contextlib.suppress(ValueError, OSError):
            old = json.loads(args.json.read_text(encoding="utf-8"))
            if old.get("mode") == mode:
                results = old
    results["mode"] = mode
    results["machine"] = info
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent, check=False).stdout.strip()  # fmt: skip
    invocation = {
        "command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "curves": args.only,
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
    }
    for name in args.only:
        work = Path(tempfile.mkdtemp(prefix=f"scaling_{name}_", dir=args.dir))
        started = time.perf_counter()
        try:
            if name == "size":
                curve = curve_size(work, points["size"], args.reps)
            elif name == "count":
                curve = curve_count(work, points["count"], args.reps)
            elif name == "runs":
                curve = curve_runs(work, points["runs"], args.reps)
            else:
                per_run = args.catalog_per_run or CATALOG_PER_RUN[mode]
                real = args.catalog_real or CATALOG_REAL[mode]
                curve = curve_catalog(work, points["catalog"], args.reps, per_run, real)
        finally:
            remove(work)
        data = curve.to_json()
        data["seconds"] = time.perf_counter() - started
        data["invocation"] = invocation
        results["curves"][name] = data
        log(f"{name} done in {data['seconds']:.0f} s")
    results["runs"] = [*results.get("runs", []), invocation][-20:]

    print(report(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    draw(results, args.png)
    print(f"\nresults: {args.json}\nfigure: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
