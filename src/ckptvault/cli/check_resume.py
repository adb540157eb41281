"""``ckptvault check-resume -- python train.py ARGS``: prove a training script resumes exactly.

The script is run with ``CKPTVAULT_RUN_DIR`` pointing at a fresh run directory each time (the
CheckpointManager reads it when given no directory): twice uninterrupted, then killed with SIGKILL
at random moments and restarted until it finishes. The newest full checkpoints are compared: every
tensor by digest (with the largest difference where they differ) and every other value exactly. The
script must save a full checkpoint when it finishes (``manager.save``).

The second uninterrupted run is what tells an inexact resume from a script that is not deterministic
at all: when the two uninterrupted runs already differ, no kill is made and the report says so,
naming the part that differs and its likely cause (an RNG the script never seeds, a
non-deterministic kernel) -- blaming resume for that would send the user to the wrong place.

With ``nproc=N`` the command is started N times as the ranks of one torch.distributed job
(``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` set, as torchrun would; the
script calls ``dist.init_process_group`` itself), and every kill takes down all ranks at once --
a real preemption ends the whole job, never one rank. The checkpoints are then sharded ones;
they compare the same way.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import api
from ..engine.inspect import diff_checkpoints
from ..engine.rundir import RunDirectory
from ..storage.resolve import storage_for
from ..training.state_compare import first_difference

RUN_DIR_ENV = "CKPTVAULT_RUN_DIR"


@dataclass(frozen=True)
class ResumeCheck:
    """``exact``: the resumed run ended bit-identical to the reference. ``deterministic``: two
    uninterrupted runs agreed (False: ``resumed`` is the second uninterrupted run, no kill was made,
    and ``cause`` says what to fix); None when that check was skipped."""

    exact: bool
    kills: int
    reference: str
    resumed: str
    first_difference: str | None
    deterministic: bool | None = None
    cause: str | None = None


# What a difference between two *uninterrupted* runs most likely means, by the state path's start.
_CAUSES: tuple[tuple[str, str], ...] = (
    ("rng.numpy", "numpy's global RNG is not seeded the same way in every run (np.random.seed)"),
    ("rng.python", "Python's random module is not seeded the same way in every run (random.seed)"),
    ("rng.torch", "torch's RNG is not seeded the same way in every run (torch.manual_seed)"),
    ("rng.cuda", "the CUDA RNGs are not seeded the same way in every run (torch.manual_seed)"),
    ("rng.loader", "the DataLoader's generator= is not seeded the same way in every run"),
    ("rng.generators", "a generator given in generators= is not seeded the same way in every run"),
    (
        "metrics_history",
        "the runs recorded different metrics or steps: something depends on time, on the machine's "
        "load or on an unordered listing",
    ),
)
_DEFAULT_CAUSE = (
    "values computed differently from run to run: an unseeded RNG, a non-deterministic kernel "
    "(torch.use_deterministic_algorithms(True); on CUDA also CUBLAS_WORKSPACE_CONFIG), or data "
    "read in a varying order"
)


def likely_cause(path: str) -> str:
    """The likely reason two uninterrupted runs differ at ``path`` (a dotted state path)."""
    for prefix, cause in _CAUSES:
        if path.startswith(prefix):
            return cause
    return _DEFAULT_CAUSE


def _differences(a: str, b: str) -> list[tuple[str, str]]:
    """(dotted path, description) of every difference between two checkpoints: tensors by digest
    first, then the first difference among the other values."""
    found: list[tuple[str, str]] = []
    for row in diff_checkpoints(storage_for(a)[0], a, b):
        if row.status != "identical":
            detail = (
                f" (max abs diff {row.max_abs:.6g}, max rel {row.max_rel:.6g})"
                if row.max_abs is not None
                else ""
            )
            found.append((row.path, f"tensor {row.path}: {row.status}{detail}"))
    other = first_difference(api.load(a), api.load(b), arrays=False)
    if other is not None:
        found.append((_dotted(other), other))
    return found


def _dotted(where: str) -> str:
    """``state['rng']['python'][1]: ...`` -> ``rng.python.1``."""
    head = where.split(":", 1)[0].removeprefix("state")
    parts = [p.strip("'\"") for p in head.replace("]", "").split("[") if p]
    return ".".join(parts)


def _root_cause(found: list[tuple[str, str]]) -> tuple[str, str]:
    """The difference to name first: an RNG (a cause) before the weights it made differ."""
    for prefix, _ in _CAUSES:
        for path, text in found:
            if path.startswith(prefix):
                return text, likely_cause(path)
    path, text = found[0]
    return text, likely_cause(path)


class _Job:
    """The command's processes: one, or ``nproc`` ranks of a torch.distributed job."""

    def __init__(self, command: list[str], env: dict[str, str], nproc: int | None) -> None:
        if nproc is None:
            self.procs = [subprocess.Popen(command, env=env)]
            return
        with socket.socket() as sock:  # a free port for this job's rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        ranks = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc)}
        ranks["LOCAL_WORLD_SIZE"] = str(nproc)
        self.procs = [
            subprocess.Popen(command, env={**env, **ranks, "RANK": str(r), "LOCAL_RANK": str(r)})
            for r in range(nproc)
        ]

    def poll(self) -> int | None:
        """None while any rank runs; then the first failing rank's exit code (0 if none). A rank
        that failed brings the others down: they would wait in their next collective."""
        codes = [p.poll() for p in self.procs]
        if any(c not in (None, 0) for c in codes):
            self.kill()
            return next(c for c in codes if c not in (None, 0))
        return None if None in codes else 0

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.poll()) is None:
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the training command ran longer than {timeout:.0f} s")
            time.sleep(0.02)
        return code

    def kill(self) -> None:
        """SIGKILL to every rank at once (then reaped)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()


def _run(command: list[str], run_dir: Path, timeout: float, nproc: int | None = None) -> float:
    started = time.monotonic()
    code = _Job(command, {**os.environ, RUN_DIR_ENV: str(run_dir)}, nproc).wait(timeout)
    if code != 0:
        raise RuntimeError(f"the training command failed with exit code {code}: {' '.join(command)}")
    return time.monotonic() - started


def _newest_full(run_dir: Path) -> str:
    candidates = [p for p in api.list_checkpoints(run_dir) if Path(p).name.startswith("step_")]
    if not candidates:
        raise RuntimeError(f"{run_dir}: the script left no full checkpoint (save one when training ends)")
    return max(candidates, key=lambda p: api.info(p).step)


def _newest_commit(run_dir: Path) -> float:
    """Commit time of the newest committed checkpoint in a run (0 when there is none or the run
    does not exist yet).

    The run under test is live: one listing gives each checkpoint with its commit time, so a
    checkpoint its retention deletes meanwhile is simply not listed (never a stat that fails)."""
    run = RunDirectory(run_dir)
    return max(
        (entry.modified for entry in run.storage.list(run.path) if entry.kind == "checkpoint"), default=0.0
    )


def _watch(
    command: list[str], run_dir: Path, timeout: float, nproc: int | None = None
) -> tuple[float, float]:
    """Runs the reference to the end; returns (seconds to its first checkpoint, total seconds)."""
    started = time.monotonic()
    child = _Job(command, {**os.environ, RUN_DIR_ENV: str(run_dir)}, nproc)
    first: float | None = None
    while (code := child.poll()) is None:
        if first is None and _newest_commit(run_dir) > 0:
            first = time.monotonic() - started
        if time.monotonic() - started > timeout:
            child.kill()
            raise RuntimeError(f"the training command ran longer than {timeout:.0f} s")
        time.sleep(0.02)
    total = time.monotonic() - started
    if code != 0:
        raise RuntimeError(f"the training command failed with exit code {code}: {' '.join(command)}")
    return (first if first is not None else total), total


def check_resume(
    command: list[str],
    *,
    kills: int = 5,
    seed: int = 0,
    workdir: str | None = None,
    timeout: float = 3600,
    nproc: int | None = None,
    determinism: bool = True,
) -> ResumeCheck:
    """Each kill lands only after the restarted script committed a new checkpoint (it is training,
    not still importing), at a random moment within a share of the reference's training time.
    ``nproc``: run the command as that many ranks (see the module docstring). ``determinism=False``
    skips the second uninterrupted run (one run's time less, but a non-deterministic script is then
    reported as an inexact resume)."""
    root = Path(workdir or tempfile.mkdtemp(prefix="ckptvault-check-resume-"))
    reference, resumed = root / "reference", root / "resumed"
    first, total = _watch(command, reference, timeout, nproc)
    deterministic: bool | None = None
    if determinism:
        again = root / "reference-again"
        _run(command, again, timeout, nproc)
        a, b = _newest_full(reference), _newest_full(again)
        found = _differences(a, b)
        if found:
            text, cause = _root_cause(found)
            return ResumeCheck(False, 0, a, b, text, deterministic=False, cause=cause)
        deterministic = True
    training = max(total - first, 0.05)
    rng = random.Random(seed)
    landed = 0
    env = {**os.environ, RUN_DIR_ENV: str(resumed)}
    for _ in range(kills):
        before = _newest_commit(resumed)
        child = _Job(command, env, nproc)
        deadline = time.monotonic() + total + 60
        while child.poll() is None and _newest_commit(resumed) <= before and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, training / max(kills, 1)))
        if child.poll() is not None:
            break  # it finished: the remaining kills have nothing to interrupt
        child.kill()
        landed += 1
    _run(command, resumed, timeout, nproc)
    a, b = _newest_full(reference), _newest_full(resumed)
    found = _differences(a, b)
    difference = found[0][1] if found else None
    return ResumeCheck(difference is None, landed, a, b, difference, deterministic=deterministic)
