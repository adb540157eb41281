"""MLflowTracker against real MLflow: a tracking server on loopback (SQLite backend, proxied
artifacts) and the plain file store. The tracker's hooks are driven the way the manager and the
registry call them, on real checkpoints written by ``ckptvault.save``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.helpers import assert_exact

import ckptvault
from ckptvault.integrations import Tracker

mlflow = pytest.importorskip("mlflow")

from ckptvault.integrations.mlflow import (  # noqa: E402  (after the importorskip)
    MAX_PARAM_VALUE,
    MLflowTracker,
    _batches,
    clean_key,
    config_params,
)

SERVER_START_TIMEOUT_S = 180.0

CONFIG = {
    "optimizer": {"name": "adamw", "lr": 3e-4, "betas": [0.9, 0.999]},
    "model": {"width": 64, "depth": 2, "act/fn": "gelu"},
    "notes": "n" * (MAX_PARAM_VALUE + 500),  # over MLflow's limit: stored cut
    "many": {f"k{i:03d}": i for i in range(150)},  # more than one log_batch of parameters
    "flag": True,
    "nothing": None,
}


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow creates default stores (./mlflow.db, ./mlruns) in the working directory when it falls
    back to them: never in the repository."""
    monkeypatch.chdir(tmp_path)


# -- a real tracking server -------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on a free loopback port; its URL. SQLite holds runs and the registry;
    artifacts go through the server (``mlflow-artifacts:/``) into a local directory, as they would
    to a remote server."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    log = open(root / "server.log", "wb")  # noqa: SIM115  (closed at teardown)
    server = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited ({server.returncode}):\n{_tail(root / 'server.log')}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
            if time.monotonic() > deadline:
                log_tail = _tail(root / "server.log")
                pytest.fail(f"mlflow server did not answer in {SERVER_START_TIMEOUT_S:.0f} s:\n{log_tail}")
            time.sleep(0.25)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


# -- a ckptvault run ---------------------------------------------------------------------------------
def _state(seed: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(128, 64, generator=generator), "b": torch.randn(64, generator=generator)},
        "optimizer": {"lr": 3e-4, "step": seed},
    }


def _open_run(run_dir: Path) -> dict[str, Any]:
    """run.json as the manager writes it (provenance, config, git)."""
    manager = ckptvault.CheckpointManager(run_dir, config=CONFIG, data_version="data-v7", validate="checksum")
    try:
        return dict(manager.run)
    finally:
        manager.close()


def _commit(
    run_dir: Path, run: dict[str, Any], step: int, metrics: dict[str, float], *, incremental: bool = False
) -> tuple[ckptvault.CheckpointInfo, dict[str, Any]]:
    """A committed checkpoint with the metadata the manager writes."""
    state = _state(step)
    metadata = {
        "step": step,
        "epoch": 0,
        "scope": "full",
        "reason": "explicit",
        "committed_at": time.time(),
        "run_id": run["run_id"],
        "metrics": metrics,
    }
    kwargs: dict[str, Any] = {"incremental": True, "chunk_bytes": 16 * 1024} if incremental else {}
    info = ckptvault.save(run_dir / f"step_{step:08d}", state, metadata=metadata, **kwargs)
    return info, state


def _checkpoint(tracker: MLflowTracker, info: ckptvault.CheckpointInfo, metrics: dict[str, Any]) -> None:
    tracker.on_checkpoint(info.path, info, "full", info.step, metrics)


def _history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _aliases(client: Any, name: str) -> dict[str, str]:
    return dict(client.get_registered_model(name).aliases)


def _check_run_start(client: Any, run_id: str, run: dict[str, Any]) -> None:
    data = client.get_run(run_id).data
    assert data.params["optimizer.name"] == "adamw"
    assert data.params["optimizer.lr"] == "0.0003"
    assert data.params["optimizer.betas"] == "[0.9,0.999]"
    assert data.params["model.act_fn"] == "gelu"  # "/" is not taken into keys
    assert data.params["flag"] == "True"
    assert data.params["nothing"] == "None"
    assert len(data.params["notes"]) == MAX_PARAM_VALUE and data.params["notes"].endswith("...")
    assert all(data.params[f"many.k{i:03d}"] == str(i) for i in range(150))
    assert len(data.params) == 159
    assert data.tags["ckptvault.run_id"] == run["run_id"]
    assert data.tags["ckptvault.version"] == ckptvault.__version__
    assert data.tags["ckptvault.data_version"] == "data-v7"
    if run.get("git"):
        assert data.tags["mlflow.source.git.commit"] == run["git"]["commit"]
        assert data.tags["ckptvault.git.commit"] == run["git"]["commit"]


# -- the tracking server ----------------------------------------------------------------------------
def test_server_params_metrics_and_loadable_artifacts(mlflow_server: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run = _open_run(run_dir)
    tracker = MLflowTracker(mlflow_server, experiment="ckptvault-artifacts")
    assert isinstance(tracker, Tracker)
    tracker.on_run_start(str(run_dir), run)
    assert tracker.run_id is not None
    client = tracker.client
    _check_run_start(client, tracker.run_id, run)

    states = {}
    for step, incremental in ((10, False), (20, False), (30, True)):
        metrics = {"loss": 1.0 / step, "val_acc": step / 100.0}
        info, states[step] = _commit(run_dir, run, step, metrics, incremental=incremental)
        _checkpoint(tracker, info, {**metrics, "note": "not a number"})

    assert _history(client, tracker.run_id, "loss") == [(10, 0.1), (20, 0.05), (30, 1.0 / 30)]
    assert _history(client, tracker.run_id, "val_acc") == [(10, 0.1), (20, 0.2), (30, 0.3)]
    assert "note" not in client.get_run(tracker.run_id).data.metrics
    listed = {a.path for a in client.list_artifacts(tracker.run_id, "checkpoints")}
    assert listed == {f"checkpoints/step_{s:08d}" for s in (10, 20, 30)}
    for step, state in states.items():
        name = f"step_{step:08d}"
        local = client.download_artifacts(tracker.run_id, f"checkpoints/{name}", str(tmp_path / "dl"))
        assert ckptvault.verify(local).ok
        assert_exact(state, ckptvault.load(local))
        tag = json.loads(client.get_run(tracker.run_id).data.tags[f"ckptvault.checkpoint.step_{step:08d}"])
        assert tag["path"] == str(run_dir / f"step_{step:08d}")
        assert tag["checkpoint_id"] == ckptvault.info(run_dir / f"step_{step:08d}").checkpoint_id
        assert tag["artifact"] == f"checkpoints/step_{step:08d}"
    # The incremental checkpoint referenced the run's chunk store: its artifact is a standalone copy.
    copy = ckptvault.info(tmp_path / "dl" / "step_00000030")
    assert copy.metadata["standalone_copy_of"]["checkpoint_id"] == tag["checkpoint_id"]
    assert not (tmp_path / "dl" / ".ckptvault-store").exists()

    tracker.close()
    tracker.close()  # idempotent
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    with pytest.raises(RuntimeError, match="closed"):
        _checkpoint(tracker, ckptvault.info(run_dir / "step_00000010"), {})

    # A resumed ckptvault run (same run_id) continues the same MLflow run.
    again = MLflowTracker(mlflow_server, experiment="ckptvault-artifacts", log_checkpoints=None)
    again.on_run_start(str(run_dir), _open_run(run_dir))
    assert again.run_id == tracker.run_id
    assert client.get_run(again.run_id).info.status == "RUNNING"
    info, _ = _commit(run_dir, run, 40, {"loss": 0.01})
    _checkpoint(again, info, {"loss": 0.01})
    assert _history(client, again.run_id, "loss")[-1] == (40, 0.01)
    logged = {a.path for a in client.list_artifacts(again.run_id, "checkpoints")}
    assert "checkpoints/step_00000040" not in logged  # log_checkpoints=None
    again.close()


def test_server_registry_versions_and_aliases(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    run = _open_run(run_dir)
    with MLflowTracker(mlflow_server, experiment="ckptvault-registry") as tracker:
        tracker.on_run_start(str(run_dir), run)
        client = tracker.client
        first, _ = _commit(run_dir, run, 100, {"loss": 0.5})
        second, second_state = _commit(run_dir, run, 200, {"loss": 0.25})
        _checkpoint(tracker, first, {"loss": 0.5})
        _checkpoint(tracker, second, {"loss": 0.25})

        tracker.on_register("tiny-net", 1, first.path, ["prod", "staging"])
        assert _aliases(client, "tiny-net") == {"prod": "1", "staging": "1"}
        tracker.on_register("tiny-net", 2, second.path, ["prod"])  # prod moves, staging stays
        assert _aliases(client, "tiny-net") == {"prod": "2", "staging": "1"}
        tracker.on_register("tiny-net", 2, second.path, ["prod"])  # again: no new model version
        with pytest.warns(UserWarning, match="'latest'"):
            tracker.on_register("tiny-net", 1, first.path, ["latest"])  # staging removed from v1
        assert _aliases(client, "tiny-net") == {"prod": "2"}

        versions = {mv.version: mv for mv in client.search_model_versions("name = 'tiny-net'")}
        assert sorted(versions) == ["1", "2"]
        for number, info in (("1", first), ("2", second)):
            tags = versions[number].tags
            assert tags["ckptvault.version"] == number
            assert tags["ckptvault.checkpoint_id"] == info.checkpoint_id
            assert tags["ckptvault.path"] == info.path
            assert versions[number].run_id == tracker.run_id
            assert versions[number].source.endswith(f"/artifacts/checkpoints/{Path(info.path).name}")

        # What a deployment does: fetch the model by alias and load it.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_server)
        local = mlflow.artifacts.download_artifacts("models:/tiny-net@prod", dst_path=str(tmp_path / "prod"))
        assert_exact(second_state, ckptvault.load(local))


def test_server_reference_mode_copies_nothing(mlflow_server: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run = _open_run(run_dir)
    tracker = MLflowTracker(mlflow_server, experiment="ckptvault-reference", log_checkpoints="reference")
    tracker.on_run_start(str(run_dir), run)
    info, _ = _commit(run_dir, run, 5, {"loss": 2.0})
    _checkpoint(tracker, info, {"loss": 2.0})
    assert tracker.run_id is not None
    assert tracker.client.list_artifacts(tracker.run_id) == []
    tag = json.loads(tracker.client.get_run(tracker.run_id).data.tags["ckptvault.checkpoint.step_00000005"])
    assert tag == {"path": info.path, "checkpoint_id": info.checkpoint_id, "step": 5, "scope": "full"}
    # An MLflow server takes a local path as a model version source only inside a run's artifacts.
    with pytest.raises(ValueError, match="local path only inside a run's artifacts"):
        tracker.on_register("ref-net", 1, info.path, ["prod"])
    tracker.close()


# -- the file store ----------------------------------------------------------------------------------
@pytest.fixture
def file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = (tmp_path / "mlruns").as_uri()
    # MLflow 3 keeps its file store in maintenance mode and refuses it without this opt-in.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    # MLflow 3.17's file-based model registry reads a model version through a new MlflowClient()
    # on the *global* tracking URI (its own TODO says so): without this it creates ./mlflow.db.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_file_store_reference_mode_and_registry(file_store: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run = _open_run(run_dir)
    tracker = MLflowTracker(file_store, experiment="files", run_name="first try", log_checkpoints="reference")
    tracker.on_run_start(str(run_dir), run)
    assert tracker.run_id is not None
    client = tracker.client
    _check_run_start(client, tracker.run_id, run)
    assert client.get_run(tracker.run_id).info.run_name == "first try"

    infos, states = [], []
    for step in (1, 2, 3):
        info, state = _commit(run_dir, run, step, {"loss": 4.0 - step})
        _checkpoint(tracker, info, {"loss": 4.0 - step, "lr": torch.tensor(0.1 * step)})
        infos.append(info)
        states.append(state)
    assert _history(client, tracker.run_id, "loss") == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert [v for _, v in _history(client, tracker.run_id, "lr")] == pytest.approx([0.1, 0.2, 0.3])
    assert client.list_artifacts(tracker.run_id) == []
    tags = client.get_run(tracker.run_id).data.tags
    for info in infos:
        tag = json.loads(tags[f"ckptvault.checkpoint.{Path(info.path).name}"])
        assert (tag["path"], tag["checkpoint_id"]) == (info.path, info.checkpoint_id)
        assert "artifact" not in tag

    tracker.on_register("file-net", 1, infos[0].path, ["prod", "canary"])
    tracker.on_register("file-net", 2, infos[2].path, ["prod"])
    assert _aliases(client, "file-net") == {"prod": "2", "canary": "1"}
    prod = client.get_model_version_by_alias("file-net", "prod")
    assert prod.source == Path(infos[2].path).as_uri()
    assert prod.run_id == tracker.run_id
    assert_exact(states[2], ckptvault.load(Path(prod.source.removeprefix("file://"))))
    tracker.on_register("file-net", 3, infos[1].path, ["prod", "canary"])  # both move to v3
    assert _aliases(client, "file-net") == {"prod": "3", "canary": "3"}
    assert len(client.search_model_versions("name = 'file-net'")) == 3
    tracker.close()
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_file_store_artifacts_and_registry_by_alias(
    file_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    run = _open_run(run_dir)
    tracker = MLflowTracker(file_store, experiment="files")
    tracker.on_run_start(str(run_dir), run)
    assert tracker.run_id is not None
    info, state = _commit(run_dir, run, 7, {"loss": 0.7}, incremental=True)
    _checkpoint(tracker, info, {"loss": 0.7})
    tracker.close()
    # Registered after the run ended, by another tracker on the same experiment (as the registry's
    # CLI would): the artifact the run logged is found by the run's tags and becomes the source.
    registrar = MLflowTracker(file_store, experiment="files")
    registrar.on_register("files-net", 1, info.path, ["prod"])
    prod = registrar.client.get_model_version_by_alias("files-net", "prod")
    assert prod.source.endswith("/artifacts/checkpoints/step_00000007")
    assert prod.run_id == tracker.run_id
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", file_store)
    local = mlflow.artifacts.download_artifacts("models:/files-net@prod", dst_path=str(tmp_path / "dl"))
    assert_exact(state, ckptvault.load(local))
    # A tracker that cannot see that run (another experiment) registers the path itself.
    elsewhere = MLflowTracker(file_store, experiment="elsewhere")
    elsewhere.on_register("files-net", 1, info.path, ["prod"])  # same version and checkpoint: reused
    assert len(elsewhere.client.search_model_versions("name = 'files-net'")) == 1
    elsewhere.on_register("other-net", 1, info.path, ["prod"])
    other = elsewhere.client.get_model_version_by_alias("other-net", "prod")
    assert (other.source, other.run_id) == (Path(info.path).as_uri(), None)


def test_log_checkpoints_none_logs_metrics_only(file_store: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run = _open_run(run_dir)
    tracker = MLflowTracker(file_store, log_checkpoints=None)  # MLflow's default experiment
    tracker.on_run_start(str(run_dir), run)
    assert tracker.run_id is not None
    info, _ = _commit(run_dir, run, 3, {"loss": 0.3})
    _checkpoint(tracker, info, {"loss": 0.3})
    data = tracker.client.get_run(tracker.run_id).data
    assert data.metrics == {"loss": 0.3}
    assert not [key for key in data.tags if key.startswith("ckptvault.checkpoint.")]
    assert tracker.client.list_artifacts(tracker.run_id) == []
    assert tracker.client.get_run(tracker.run_id).info.experiment_id == "0"
    tracker.close()


# -- pieces that need no store ---------------------------------------------------------------------
def test_config_params_keys_values_and_limits() -> None:
    params = config_params({"a": {"b": 1, "c": {"d": [1, "x"]}}, "a.b": 2, "e": {}, "bad key:é!": "v"})
    assert params == {"a.b": "1", "a.c.d": '[1,"x"]', "a.b_2": "2", "e": "{}", "bad key_é_": "v"}
    assert config_params(None) == {}
    assert config_params({"value": 3}) == {"value": "3"}
    assert clean_key("..up") == "_..up" and clean_key(".") == "_" and clean_key("") == "_"
    long_a, long_b = clean_key("x" * 300 + "a"), clean_key("x" * 300 + "b")
    assert len(long_a) == len(long_b) == 250 and long_a != long_b


def test_batches_respect_mlflow_limits() -> None:
    from mlflow.entities import Metric, Param, RunTag

    entities: list[Any] = [Param(f"p{i}", "v" * 5000) for i in range(250)]
    entities += [RunTag(f"t{i}", "t") for i in range(150)]
    entities += [Metric(f"m{i}", 1.0, 0, 0) for i in range(2500)]
    batches = list(_batches(entities))
    assert sum(len(b) for b in batches) == len(entities)
    for batch in batches:
        assert len(batch) <= 1000
        assert sum(isinstance(e, Param) for e in batch) <= 100
        assert sum(isinstance(e, RunTag) for e in batch) <= 100
        assert sum(len(e.key) + len(str(e.value)) for e in batch) < 1_000_000


def test_missing_mlflow_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` sees when it is absent
    with pytest.raises(ImportError, match=r"pip install 'ckptvault\[mlflow\]'"):
        MLflowTracker("file:///nowhere")


def test_bad_log_checkpoints_value() -> None:
    with pytest.raises(ValueError, match="log_checkpoints"):
        MLflowTracker(log_checkpoints="copy")  # type: ignore[arg-type]


def test_alias_names_mlflow_refuses() -> None:
    from ckptvault.integrations.mlflow import _alias_problem

    assert _alias_problem("prod") is None and _alias_problem("blue-green_2") is None
    for bad in ("latest", "Latest", "v3", "V12", "has space", "", "x" * 256):
        assert _alias_problem(bad) is not None, bad


def test_manager_and_registry_drive_mlflow_end_to_end(mlflow_server: str, tmp_path: Path) -> None:
    """The wiring, not just the tracker: CheckpointManager(trackers=[...]) logs the run, its metrics and
    each committed checkpoint (before retention deletes old ones), and the registry's aliases appear in
    MLflow's Model Registry with the same names."""
    from ckptvault.catalog.registry import Registry

    root = tmp_path / "root"
    tracker = MLflowTracker(mlflow_server, experiment="ckptvault-manager")
    model = torch.nn.Linear(3, 2)
    state = ckptvault.TrainState(model)
    with ckptvault.CheckpointManager(
        root / "run",
        every_n_steps=2,
        keep_last=1,
        validate="checksum",
        config={"lr": 0.1},
        trackers=[tracker],
    ) as manager:
        for _ in range(6):
            manager.step(state, {"loss": 1.0 / (state.step + 1)})
        names = [r.name for r in manager.checkpoints()]
    client = tracker.client
    run = client.get_run(tracker.run_id)
    assert run.data.params["lr"] == "0.1" and run.info.status == "FINISHED"
    assert [s for s, _ in _history(client, tracker.run_id, "loss")] == [2, 4, 6]
    logged = sorted(a.path for a in client.list_artifacts(tracker.run_id, "checkpoints"))
    assert logged == [
        f"checkpoints/step_0000000{s}" for s in (2, 4, 6)
    ]  # all three, though 2 of them are gone
    assert names == ["step_00000006"]

    registry = Registry(
        root, trackers=[MLflowTracker(mlflow_server, experiment="ckptvault-manager", resume=True)]
    )
    registry.register("linear", root / "run" / "step_00000006", alias="production")
    assert _aliases(client, "linear") == {"production": "1"}
