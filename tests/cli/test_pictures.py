"""``ckptvault plot`` and ``ckptvault report``, run as a user runs them; the report is opened in a real
headless browser (Chromium) so its script's sorting and filtering are checked, not just its text."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import ckptvault as cv
from ckptvault.catalog.registry import Registry

pytest.importorskip("matplotlib", reason="plot/report need the plots extra: pip install 'ckptvault[plots]'")

# Run A: 6 steps, a checkpoint each, keep_last=2, step 2 pinned, step 3 registered (so also kept):
# kept 2, 3, 5, 6; deleted 1, 4. Step 5 is marked failed validation. Run B: 3 steps, all kept.
KEPT_A = ["step_00000002", "step_00000003", "step_00000005", "step_00000006"]
KEPT_B = ["step_00000001", "step_00000002", "step_00000003"]


def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "ckptvault.cli.main", *args], capture_output=True, text=True)
    if ok:
        assert done.returncode == 0, done.stderr + done.stdout
    return done


def _manager(run: Path, seed: int, **options: object) -> tuple[cv.CheckpointManager, cv.TrainState]:
    """A manager saving every step, monitoring val_loss, validating by checksum only (fast)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    state = cv.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    manager = cv.CheckpointManager(
        run,
        every_n_steps=1,
        monitor="val_loss",
        validate="checksum",
        config={"lr": 0.1, "seed": seed},
        **options,
    )
    return manager, state


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    registry = Registry(root)

    manager, state = _manager(root / "run-a", 0, keep_last=2)
    manager.pin(2)
    with manager:
        for step in range(1, 7):
            if step == 4:  # registered before retention could delete it: the registry pins it
                registry.register("classifier", root / "run-a" / "step_00000003", alias="production")
            manager.step(
                state, metrics={"loss": 1.0 / step, "val_loss": [0.9, 0.5, 0.3, 0.6, 0.2, 0.4][step - 1]}
            )
    manager, state = _manager(root / "run-b", 1)
    with manager:
        for step in range(1, 4):
            manager.step(state, metrics={"loss": 2.0 / step, "acc": 0.3 * step})

    # Step 5 of run A failed validation (the result names this very checkpoint by its id).
    failed = root / "run-a" / "step_00000005"
    results = root / "run-a" / ".ckptvault-validation"
    results.mkdir(exist_ok=True)
    (results / "step_00000005.json").write_text(
        json.dumps(
            {
                "checkpoint": str(failed),
                "level": "readback",
                "requested": "readback",
                "passed": False,
                "problems": ["digest mismatch in data-00000.safetensors"],
                "checkpoint_id": cv.info(failed).checkpoint_id,
                "finished_at": 2e9,
            }
        )
    )
    return root


def test_the_tree_is_what_the_tests_assume(tree: Path) -> None:
    names_a = sorted(p.name for p in (tree / "run-a").iterdir() if p.name.startswith("step_"))
    assert names_a == KEPT_A
    assert sorted(p.name for p in (tree / "run-b").iterdir() if p.name.startswith("step_")) == KEPT_B


def test_trajectory_marks_every_checkpoint_by_status(tree: Path) -> None:
    from ckptvault import reporting

    traj = reporting.trajectory(tree / "run-a")
    status = {m.name: m.statuses for m in traj.marks}
    assert sorted(status) == [f"step_0000000{i}" for i in range(1, 7)]
    assert reporting.DELETED in status["step_00000001"] and reporting.DELETED in status["step_00000004"]
    assert all(reporting.KEPT in status[n] for n in KEPT_A)
    assert reporting.PINNED in status["step_00000002"]
    assert {reporting.REGISTERED, reporting.PINNED} <= status["step_00000003"]
    assert reporting.FAILED in status["step_00000005"]
    # Best by val_loss among kept checkpoints that did not fail: 0.3 (step 3); step 5's 0.2 failed.
    assert [n for n, s in status.items() if reporting.BEST in s] == ["step_00000003"]
    assert traj.source == "metrics history of step_00000006"
    steps, values = traj.curves["val_loss"]
    assert steps == [1, 2, 3, 4, 5, 6] and values == [0.9, 0.5, 0.3, 0.6, 0.2, 0.4]


def test_plot_writes_a_deterministic_png(tree: Path, tmp_path: Path) -> None:
    from matplotlib.image import imread

    out = tmp_path / "curve.png"
    done = cli("plot", str(tree / "run-a"), "-o", str(out))
    assert "2 metrics, 6 checkpoints" in done.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(out)
    height, width = pixels.shape[:2]
    assert width == 900 and 400 <= height <= 800  # two strips, a title and a legend
    assert pixels.std() > 0.05  # something was drawn
    again = tmp_path / "again.png"
    cli("plot", str(tree / "run-a"), "-o", str(again))
    assert again.read_bytes() == out.read_bytes()

    one = tmp_path / "one.png"
    cli("plot", str(tree / "run-a"), "-o", str(one), "--metric", "val_loss")
    assert imread(one).shape[0] < height
    bad = cli("plot", str(tree / "run-a"), "-o", str(tmp_path / "x.png"), "--metric", "nope", ok=False)
    assert bad.returncode == 2 and "nope" in bad.stderr and "val_loss" in bad.stderr
    missing = cli("plot", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.png"), ok=False)
    assert missing.returncode == 1 and not (tmp_path / "x.png").exists()


def test_plot_falls_back_to_the_commit_events(tree: Path, tmp_path: Path) -> None:
    """Weights-only or history-less runs still get curves: from the events' metrics."""
    from ckptvault import reporting

    copy = tmp_path / "run"
    shutil.copytree(tree / "run-b", copy)
    for name in KEPT_B:  # no full checkpoint left to read a history from
        shutil.rmtree(copy / name)
    traj = reporting.trajectory(copy)
    assert traj.source == "commit events"
    assert traj.curves["acc"][0] == [1, 2, 3]
    assert all(reporting.DELETED in m.statuses for m in traj.marks)
    cli("plot", str(copy), "-o", str(tmp_path / "events.png"))


def test_plot_without_matplotlib_says_how_to_install(tree: Path, tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.argv[0] = 'ckptvault'\n"
        "from ckptvault.cli.main import main; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "plot", str(tree / "run-a"), "-o", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "pip install 'ckptvault[plots]'" in done.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.fixture(scope="module")
def report(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    cli("report", str(tree), "-o", str(out))
    return out


def test_report_is_one_self_contained_file(report: Path, tree: Path) -> None:
    text = report.read_text()
    assert "http://" not in text and "https://" not in text  # nothing fetched from anywhere
    assert "<script src" not in text and "<link" not in text
    assert text.count("data:image/png;base64,") == 3  # storage + one curve picture per run
    run_ids = {json.loads((tree / r / "run.json").read_text())["run_id"] for r in ("run-a", "run-b")}
    assert all(run_id in text for run_id in run_ids)
    assert "classifier@production" in text


class _Dom(HTMLParser):
    """The rows of the checkpoint table (with their ``hidden`` flag and cell texts) in a DOM dump."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[bool, list[str]]] = []
        self.texts: dict[str, str] = {}
        self._in_table = False
        self._cell: list[str] | None = None
        self._id: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "table":
            self._in_table = attributes.get("id") == "checkpoints"
        elif self._in_table and tag == "tr" and "data-path" in attributes:
            self.rows.append(("hidden" in attributes, []))
        elif self._in_table and tag == "td" and self.rows:
            self._cell = []
        if attributes.get("id") in ("shown", "summary"):
            self._id = attributes["id"]

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_table = False
        elif tag == "td" and self._cell is not None:
            self.rows[-1][1].append("".join(self._cell).strip())
            self._cell = None
        elif tag in ("span", "p"):
            self._id = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._id is not None:
            self.texts[self._id] = self.texts.get(self._id, "") + data


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium: .ci/run installs Debian's chromium (apt-get install chromium)")


def _dump_dom(page: Path, fragment: str = "") -> _Dom:
    """The DOM after the page's script ran, as the browser holds it."""
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [
                _chromium(),
                "--headless",
                "--no-sandbox",  # root in a container has no usable sandbox
                "--disable-gpu",
                f"--user-data-dir={profile}",
                "--dump-dom",
                page.as_uri() + fragment,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "HOME": profile},
        )
    assert done.returncode == 0 and "<html" in done.stdout, done.stderr[-2000:]
    dom = _Dom()
    dom.feed(done.stdout)
    return dom


def test_report_in_a_browser(report: Path, tree: Path) -> None:
    dom = _dump_dom(report)
    assert len(dom.rows) == len(KEPT_A) + len(KEPT_B)
    assert not any(hidden for hidden, _ in dom.rows)
    assert dom.texts["shown"] == "7 of 7 checkpoints shown"  # written by the script: it ran
    by_path = {cells[0]: cells for _, cells in dom.rows}
    header = ["checkpoint", "run", "step", "epoch", "scope", "created", "size", "validation", "status"]
    col = {name: i for i, name in enumerate([*header, "registry"])}
    assert by_path["run-a/step_00000005"][col["validation"]] == "FAILED"
    assert [p for p, c in by_path.items() if c[col["validation"]] == "FAILED"] == ["run-a/step_00000005"]
    assert by_path["run-a/step_00000003"][col["registry"]] == "classifier@production"
    assert "best" in by_path["run-a/step_00000003"][col["status"]]
    run_id = json.loads((tree / "run-a" / "run.json").read_text())["run_id"]
    assert by_path["run-a/step_00000002"][col["run"]] == run_id


def test_report_filter_and_sort_preset_from_the_fragment(report: Path) -> None:
    dom = _dump_dom(report, "#filter=step_00000002")
    visible = [cells[0] for hidden, cells in dom.rows if not hidden]
    assert visible == ["run-a/step_00000002", "run-b/step_00000002"]
    assert sum(hidden for hidden, _ in dom.rows) == 5
    assert dom.texts["shown"] == "2 of 7 checkpoints shown"

    dom = _dump_dom(report, "#filter=run-b&sort=-step")
    visible = [cells[0] for hidden, cells in dom.rows if not hidden]
    assert visible == ["run-b/step_00000003", "run-b/step_00000002", "run-b/step_00000001"]


EVIL = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def evil_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A report of a checkpoint whose name, metric names and tags are markup (and a metric name with
    a lone ``$``, which matplotlib would read as the start of a formula)."""
    base = tmp_path_factory.mktemp("evil")
    cv.save(
        base / "root" / "run" / f"ckpt{EVIL}",
        {"w": torch.zeros(2)},
        metadata={
            "step": 1,
            "metrics": {"<script>alert(1)</script>": 0.5, "loss": 1.0, "cost in $": 2.0},
            "tags": {"note": "<script>alert('tag')</script>", "<b>key": "x"},
        },
    )
    out = base / "report.html"
    cli("report", str(base / "root"), "-o", str(out))
    return out


def test_values_from_files_are_escaped(evil_report: Path) -> None:
    """Names, metric names and tags come from files anyone may write: none may become markup."""
    text = evil_report.read_text()
    assert "<script>alert" not in text and "<img src=x" not in text and "<b>key" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;script&gt;alert(&#x27;tag&#x27;)&lt;/script&gt;" in text
    assert "ckpt&lt;img src=x onerror=alert(1)&gt;" in text
    assert text.count("<script>") == 1  # the report's own script only


def test_escaped_values_show_as_text_in_a_browser(evil_report: Path) -> None:
    dom = _dump_dom(evil_report)
    assert len(dom.rows) == 1 and dom.rows[0][1][0] == f"run/ckpt{EVIL}"
    assert "note=<script>alert('tag')</script>" in dom.rows[0][1][-1]
