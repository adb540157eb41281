"""The validation server behind full validation: one process per training process imports torch
once and forks a fresh child per validation. These tests prove the child is as isolated as a new
process (its prints, crashes and hangs stay its own findings) and that the server never makes a
validation fail or disappear: a dead server is replaced, an unsafe one is turned off in favour of
one-shot workers, and it exits with the process that started it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import ckptvault as cv
from ckptvault import validation

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[validation._Server]:
    """A server of this test's own (the process-wide one may be off or busy with other tests')."""
    monkeypatch.delenv(validation.PROCESS_ENV, raising=False)
    fresh = validation._Server()
    monkeypatch.setattr(validation, "_SERVER", fresh)
    yield fresh
    fresh.stop()


def misbehaving(path: Path, action: str = "", arg: str = "") -> Path:
    from tests.models_for_validation import Misbehaving

    torch.manual_seed(0)
    kwargs = {"width": 4, "action": action, "arg": arg, "home": os.getpid()}
    model = Misbehaving(**kwargs)  # type: ignore[arg-type]
    cv.save_model(path, model, kwargs=kwargs, probe=torch.randn(3, 4), validate="checksum")
    return path


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rpartition(")")[2].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_each_validation_runs_in_a_fresh_child_of_one_server(
    server: validation._Server, tmp_path: Path
) -> None:
    log = tmp_path / "pids.log"
    results = [validation.full(str(misbehaving(tmp_path / f"c{i}", "log_pid", str(log)))) for i in range(3)]
    assert [r.passed for r in results] == [True, True, True], [r.problems for r in results]
    assert all(any("rebuilt Misbehaving" in c for c in r.checks) for r in results)
    rows = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    assert len(rows) == 3
    assert len({pid for pid, _ in rows}) == 3  # a fresh process each time
    assert {parent for _, parent in rows} == {server.pid}  # ... forked by the one server
    assert os.getpid() not in {pid for pid, _ in rows}
    assert server.starts == 1


def test_what_the_model_prints_does_not_break_the_protocol(
    server: validation._Server, tmp_path: Path
) -> None:
    noisy = '{"problems": [], "checks": ["forged"]}\n{"tainted": "forged"}'
    first = validation.full(str(misbehaving(tmp_path / "a", "print", noisy)))
    second = validation.full(str(misbehaving(tmp_path / "b")))
    assert first.passed and second.passed, (first.problems, second.problems)
    assert "forged" not in first.checks
    assert not server.disabled and server.starts == 1


def test_a_crashing_child_is_a_finding_and_the_server_survives(
    server: validation._Server, tmp_path: Path
) -> None:
    crashed = validation.full(str(misbehaving(tmp_path / "a", "abort")))
    assert not crashed.passed
    assert "killed by signal 6" in crashed.problems[0] and "about to abort" in crashed.problems[0]
    pid = server.pid
    fine = validation.full(str(misbehaving(tmp_path / "b")))
    assert fine.passed, fine.problems
    assert server.pid == pid and server.starts == 1


def test_a_hung_child_is_killed_at_the_timeout(server: validation._Server, tmp_path: Path) -> None:
    path = str(misbehaving(tmp_path / "a", "sleep", "120"))
    validation.full(str(misbehaving(tmp_path / "warm")))  # the server's start is not part of the wait
    started = time.monotonic()
    hung = validation.full(path, timeout=3)
    assert time.monotonic() - started < 30
    assert not hung.passed and hung.problems == ("validation process ran over 3 s",)
    assert server.pid is not None and children_of(server.pid) == []  # killed and reaped
    assert validation.full(str(misbehaving(tmp_path / "b"))).passed
    assert server.starts == 1


def test_a_killed_server_is_replaced(server: validation._Server, tmp_path: Path) -> None:
    assert validation.full(str(misbehaving(tmp_path / "a"))).passed
    old = server.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    again = validation.full(str(misbehaving(tmp_path / "b")))  # answered by a one-shot worker
    assert again.passed, again.problems
    third = validation.full(str(misbehaving(tmp_path / "c")))
    assert third.passed and server.starts == 2 and server.pid not in (None, old)


def test_a_module_that_starts_a_thread_at_import_turns_the_server_off(
    server: validation._Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.models_thread_at_import import Threaded

    path = tmp_path / "t"
    cv.save_model(path, Threaded(4), kwargs={"width": 4}, probe=torch.randn(2, 4), validate="checksum")
    with caplog.at_level(logging.WARNING, logger="ckptvault"):
        result = validation.full(str(path))
    assert result.passed, result.problems  # by a one-shot worker
    assert "validation server off for this process" in caplog.text
    assert "started a thread" in server.disabled and server.pid is None
    assert validation.full(str(misbehaving(tmp_path / "b"))).passed
    assert server.starts == 1 and server.pid is None  # off for the rest of this process


def test_spawn_mode_and_a_bad_mode(
    server: validation._Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(validation.PROCESS_ENV, "spawn")
    assert validation.full(str(misbehaving(tmp_path / "a"))).passed
    assert server.starts == 0
    monkeypatch.setenv(validation.PROCESS_ENV, "threads")
    with pytest.raises(ValueError, match="CKPTVAULT_VALIDATION_PROCESS"):
        validation.full(str(misbehaving(tmp_path / "b")))


def test_a_full_manager_starts_the_server_at_its_first_probe_and_reuses_it(
    server: validation._Server, tmp_path: Path
) -> None:
    from tests.models_for_validation import trained_mlp

    model = trained_mlp([4, 8, 3])
    state = cv.TrainState(model, model_kwargs={"sizes": [4, 8, 3]}, probe=torch.randn(2, 4))
    with cv.CheckpointManager(tmp_path / "run", validate="full", every_n_steps=1) as manager:
        assert server.pid is None  # a run that never writes a probe never pays for a server
        manager.step(state)
        assert server.pid is not None  # started by the save that wrote the first probe
        for _ in range(2):
            manager.step(state)
        manager.wait_validation()
        assert [r.valid for r in manager.checkpoints()] == [True, True, True]
        assert all(manager.validation_result(r.name)["passed"] for r in manager.checkpoints())
    assert server.starts == 1


def test_the_server_exits_with_the_process_that_started_it(tmp_path: Path) -> None:
    path = misbehaving(tmp_path / "a")
    code = (
        "import os, signal, sys\n"
        "from ckptvault import validation\n"
        "import tests.models_for_validation\n"  # the program's own model module: trusted
        "assert validation.full(sys.argv[1]).passed\n"
        "print(validation._SERVER.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"  # no atexit, no cleanup: only the pipe closes
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(validation.PROCESS_ENV, None)
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    pid = int(done.stdout.split()[0])
    deadline = time.monotonic() + 30
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid)


def test_a_forked_child_does_not_share_the_parents_server(server: validation._Server, tmp_path: Path) -> None:
    assert validation.full(str(misbehaving(tmp_path / "a"))).passed
    parent_server = server.pid
    other = str(misbehaving(tmp_path / "b"))
    pid = os.fork()
    if pid == 0:  # a data-loader worker, say: it must not write into the parent's server pipe
        code = 1
        try:
            forgot = server.pid is None and server.starts == 0
            result = validation.full(other)  # starts a server of its own
            own = server.pid
            server.stop()
            code = 0 if forgot and result.passed and own not in (None, parent_server) else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert validation.full(other).passed  # the parent's server and pipes are untouched
    assert server.pid == parent_server and server.starts == 1


def test_ctrl_c_of_the_terminal_does_not_take_the_server_down(
    server: validation._Server, tmp_path: Path
) -> None:
    assert validation.full(str(misbehaving(tmp_path / "a"))).passed
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGINT)  # what the terminal sends to every process of the foreground group
    assert validation.full(str(misbehaving(tmp_path / "b"))).passed
    assert server.pid == pid and server.starts == 1
