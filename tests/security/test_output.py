"""Class 7 of issue 13: what the CLI and the HTML report show is inert.

Every text a checkpoint, run, registry or catalog carries (names, paths, metadata, metric names,
tags, config, validation problems, error messages quoting them) reaches the terminal with its
control characters shown escaped (``\\x1b``, ``\\u202e``) and its rich markup shown literally; the
only escape sequences in the output are the colours the CLI itself chose. And one bad checkpoint
(odd ``created_at``, huge integers, lone surrogates, a manifest that cannot be read) is a row with
its error: it never aborts ``ls``, ``show``, ``find``, ``report``, ``plot`` or a registry listing.

The CLI runs as a user runs it (a subprocess), once as a pipe and once with colour forced
(``FORCE_COLOR=1``, ``TERM=xterm``: rich's terminal path, where markup would become escapes).
"""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptvault as cv

# Markup rich would interpret, a forged OSC 8 hyperlink, a screen clear, BEL, a carriage return that
# overwrites the line, a bidi override, a C1 CSI, an emoji code and HTML.
HOSTILE = (
    "[bold red]MARKUP[/] [link=file:///etc/passwd]click[/link] :warning: \x1b[2J"
    "\x1b]8;;http://evil.example/\x07forged\x1b]8;;\x07 bell\x07 cr\rOVER \u202eevil\u202c c1\x9b31m "
    "<img src=x onerror=alert(1)>"
)
LITERALS = (
    "[bold red]MARKUP[/]",
    "[link=file:///etc/passwd]click[/link]",
    ":warning:",
    r"\x1b[2J",
    r"\u202e",
)
# A directory name a checkpoint can have on POSIX (no '/').
HOSTILE_NAME = "ck_[bold red]M_\x1b[2J_\x07_\u202e_:warning:"
RAW_FORBIDDEN = ("\x07", "\r", "\u202e", "\u202c", "\x9b", "\x00", "\ufffd")
SGR = re.compile(r"\x1b\[[0-9;]*m")  # the colours the CLI chooses itself


def cli(*args: str | Path, colour: bool, cwd: Path | None = None) -> tuple[int, str]:
    """Runs ``ckptvault ARGS``; returns the exit code and stdout + stderr decoded as strict UTF-8."""
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TERM", "COLUMNS")}
    env["COLUMNS"] = "4000"  # no folding: literal text stays on one line
    if colour:
        env.update(FORCE_COLOR="1", TERM="xterm")
    else:
        env["TERM"] = "dumb"
    done = subprocess.run(
        [sys.executable, "-m", "ckptvault.cli.main", *map(str, args)],
        capture_output=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )
    out = done.stdout.decode("utf-8") + done.stderr.decode("utf-8")  # strict: no lone surrogates
    assert "Traceback" not in out, out
    return done.returncode, out


def assert_inert(output: str, *, colour: bool, literals: tuple[str, ...] = LITERALS) -> None:
    """No escape sequence but the CLI's own colours, no raw control/bidi character, markup literal."""
    text = SGR.sub("", output) if colour else output
    assert "\x1b" not in text, [text[max(0, i - 30) : i + 30] for i in _indexes(text, "\x1b")][:3]
    for char in RAW_FORBIDDEN:
        assert char not in output, f"raw {char!r} in output"
    for literal in literals:
        assert literal in text, f"{literal!r} not shown literally in:\n{text[:3000]}"


def _indexes(text: str, needle: str) -> list[int]:
    return [m.start() for m in re.finditer(re.escape(needle), text)]


def _edit_manifest(checkpoint: Path, change: Any) -> None:
    path = checkpoint / "manifest.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def _metadata_dict(doc: dict[str, Any], key: str) -> dict[str, Any]:
    """The encoded ``metadata[key]`` dict of a manifest (the tree encoding: {"t": "dict", "v": ...})."""
    value: dict[str, Any] = doc["metadata"]["v"][key]["v"]
    return value


@pytest.fixture
def hostile_root(tmp_path: Path) -> Path:
    """A root with one run whose every displayed field is hostile, and a registry naming it."""
    root = tmp_path / "root"
    run = root / "run"
    metadata = {
        "metrics": {HOSTILE: 1.0, "loss": 0.5},
        "tags": {HOSTILE: HOSTILE},
        "config": {HOSTILE: HOSTILE},
        "run_id": HOSTILE,
        "note": HOSTILE,
    }
    cv.save(run / "step_00000010", {"model": {HOSTILE: torch.zeros(2)}}, metadata=metadata)
    cv.save(run / HOSTILE_NAME, {"model": {HOSTILE: torch.ones(2)}}, metadata=metadata)
    # What the library would refuse to write, written by hand: a hostile created_at and a failed
    # validation whose level and problems quote hostile text.
    _edit_manifest(run / HOSTILE_NAME, lambda d: d.__setitem__("created_at", "[red]x[/red]\x1b[2J\u202e"))
    checkpoint_id = cv.info(run / "step_00000010").checkpoint_id
    results = run / ".ckptvault-validation"
    results.mkdir()
    (results / "step_00000010.json").write_text(
        json.dumps({"checkpoint_id": checkpoint_id, "passed": False, "level": HOSTILE, "problems": [HOSTILE]})
    )
    (run / "run.json").write_text(json.dumps({"run_id": HOSTILE, "config": {HOSTILE: HOSTILE}}))
    registry = root / ".ckptvault" / "registry"
    registry.mkdir(parents=True)
    entry = {
        "name": HOSTILE,
        "aliases": {HOSTILE: 1},
        "history": [
            {"alias": HOSTILE, "from": None, "to": 1, "when": HOSTILE, "why": HOSTILE, "user": HOSTILE}
        ],
        "versions": [
            {
                "version": 1,
                "checkpoint": f"run/{HOSTILE_NAME}",
                "step": HOSTILE,
                "registered_at": HOSTILE,
                "user": HOSTILE,
                "host": HOSTILE,
            }
        ],
    }
    (registry / "model.json").write_text(json.dumps(entry))
    return root


@pytest.mark.parametrize("colour", [False, True], ids=["pipe", "forced-colour"])
def test_ls_and_show_are_inert(hostile_root: Path, colour: bool) -> None:
    run = hostile_root / "run"
    code, out = cli("ls", run, colour=colour)
    assert code == 0, out
    assert_inert(out, colour=colour)
    assert "FAILED" in out and "[red]x[/red]" in SGR.sub("", out)  # the hostile created_at, as text
    code, out = cli("show", run / "step_00000010", colour=colour)
    assert code == 0, out
    assert_inert(out, colour=colour)
    code, out = cli("show", run / HOSTILE_NAME, colour=colour)
    assert code == 0, out
    assert_inert(out, colour=colour)


@pytest.mark.parametrize("colour", [False, True], ids=["pipe", "forced-colour"])
def test_find_diff_verify_are_inert(hostile_root: Path, colour: bool) -> None:
    run = hostile_root / "run"
    code, out = cli("find", hostile_root, colour=colour)
    assert code == 0, out
    assert_inert(out, colour=colour, literals=("[bold red]MARKUP[/]", r"\x1b[2J", "[bold red]M_"))
    code, out = cli("diff", run / "step_00000010", run / HOSTILE_NAME, colour=colour)
    assert code == 0, out
    assert_inert(out, colour=colour)
    data = next(p for p in (run / HOSTILE_NAME).iterdir() if p.suffix == ".safetensors")
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    code, out = cli("verify", run / HOSTILE_NAME, colour=colour)
    assert code == 1, out
    assert_inert(out, colour=colour, literals=("[bold red]M_", r"\x1b[2J"))
    code, out = cli("validate", run / HOSTILE_NAME, "--level", "readback", colour=colour)
    assert code == 1, out
    assert_inert(out, colour=colour, literals=("[bold red]M_", r"\x1b[2J"))


@pytest.mark.parametrize("colour", [False, True], ids=["pipe", "forced-colour"])
def test_registry_listings_are_inert(hostile_root: Path, colour: bool) -> None:
    for command in (("ls",), ("show", "model"), ("history", "model")):
        code, out = cli("registry", *command, "--root", hostile_root, colour=colour)
        assert code == 0, (command, out)
        literals = ("[bold red]MARKUP[/]", r"\x1b[2J") if command != ("ls",) else (r"\x1b[2J",)
        assert_inert(out, colour=colour, literals=literals)


def test_error_messages_quoting_hostile_text_are_inert(tmp_path: Path) -> None:
    missing = tmp_path / HOSTILE_NAME
    missing.mkdir()
    for colour in (False, True):
        code, out = cli("show", missing, colour=colour)
        assert code == 1 and "error" in out, out
        assert_inert(out, colour=colour, literals=("[bold red]M_", r"\x1b[2J"))


def test_json_output_escapes_control_characters(hostile_root: Path) -> None:
    """--json is for scripts: parseable, ASCII-escaped (no raw ESC or bidi override), no colours."""
    run = hostile_root / "run"
    for args in (
        ("ls", run, "--json"),
        ("show", run / "step_00000010", "--json"),
        ("find", hostile_root, "--json"),
        ("registry", "ls", "--root", hostile_root, "--json"),
        ("registry", "show", "model", "--root", hostile_root, "--json"),
        ("registry", "history", "model", "--root", hostile_root, "--json"),
    ):
        code, out = cli(*args, colour=True)
        assert code == 0, (args, out)
        assert out.isascii() and "\x1b" not in out and "\x07" not in out, (args, out[:500])
        json.loads(out)
    rows = json.loads(cli("find", hostile_root, "--json", colour=True)[1])
    assert any(HOSTILE in r["metrics"] for r in rows)  # the exact text survives the escaping


def test_html_report_shows_control_characters_escaped(hostile_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    page_path = tmp_path / "report.html"
    code, out = cli("report", hostile_root, "-o", page_path, "--no-curves", colour=False)
    assert code == 0, out
    page = page_path.read_text(encoding="utf-8")
    for char in (*RAW_FORBIDDEN, "\x1b"):
        assert char not in page, f"raw {char!r} in the report"
    assert "<img src=x" not in page and page.count("<script") == 1
    assert r"\x1b[2J" in page and r"\u202e" in page
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page)
    assert csp is not None
    policy = html.unescape(csp.group(1))
    assert "default-src 'none'" in policy and "base-uri 'none'" in policy and "form-action 'none'" in policy


# -- one bad checkpoint among good ones ---------------------------------------------------------------


def _bad_date(c: Path) -> None:
    _edit_manifest(c, lambda d: d.__setitem__("created_at", "not a date"))


def _huge_metric(c: Path) -> None:
    huge = {"t": "int", "hex": hex(10**5000)}  # beyond str()'s 4,300 digits and any float
    _edit_manifest(c, lambda d: _metadata_dict(d, "metrics").__setitem__("loss", huge))


def _huge_step(c: Path) -> None:
    _edit_manifest(c, lambda d: d.__setitem__("step", 10**4000))


def _huge_size(c: Path) -> None:
    def change(doc: dict[str, Any]) -> None:
        for entry in doc["files"].values():
            entry["size"] = 10**4000

    _edit_manifest(c, change)


def _lone_surrogate(c: Path) -> None:
    _edit_manifest(c, lambda d: _metadata_dict(d, "metrics").__setitem__("\ud800x", 2.0))


def _undecodable_metadata(c: Path) -> None:
    _edit_manifest(c, lambda d: d.__setitem__("metadata", {"t": "no such tag", "v": 1}))


def _manifest_unreadable(c: Path) -> None:
    (c / "manifest.json").write_bytes(b"\xff\xfe{\x00 not a manifest \x80")


def _non_utf8_sidecar(c: Path) -> None:
    for sidecar in c.glob("*.meta.json"):
        sidecar.write_bytes(b"\xff\xfe{not json\x80")


BAD = {
    "bad-date": _bad_date,
    "huge-metric": _huge_metric,
    "huge-step": _huge_step,
    "huge-size": _huge_size,
    "lone-surrogate": _lone_surrogate,
    "undecodable-metadata": _undecodable_metadata,
    "manifest-unreadable": _manifest_unreadable,
    "non-utf8-sidecar": _non_utf8_sidecar,
}


@pytest.fixture
def run_with_bad(tmp_path: Path) -> Path:
    """Two good checkpoints and, between them, one bad checkpoint of each kind."""
    run = tmp_path / "root" / "run"
    for name in ("good_a", *BAD, "good_z"):
        cv.save(run / name, {"w": torch.zeros(2)}, metadata={"metrics": {"loss": 0.5}})
    for name, spoil in BAD.items():
        spoil(run / name)
    (run / ".ckptvault-events.jsonl").write_bytes(b'{"event": "commit"}\n\xff\xfe not UTF-8\n')
    return run


def test_bad_checkpoints_never_abort_the_listings(run_with_bad: Path) -> None:
    """``ls`` lists every checkpoint (a bad one as a row, with its error when it cannot be read);
    ``find`` lists the good ones; ``show`` of a bad one shows it or says why in one line (exit 1)."""
    run = run_with_bad
    code, out = cli("ls", run, colour=True)
    assert code == 0, out
    assert_inert(out, colour=True, literals=("good_a", "good_z", *BAD))
    assert "unreadable" in out  # the manifest that cannot be read, with its error
    code, out = cli("ls", run, "--json", colour=False)
    assert code == 0, out
    rows = {Path(r["path"]).name: r for r in json.loads(out)}
    assert set(rows) == {"good_a", "good_z", *BAD}
    assert "error" in rows["manifest-unreadable"] and "error" in rows["undecodable-metadata"]
    code, out = cli("find", run.parent, colour=True)
    assert code == 0, out
    assert_inert(out, colour=True, literals=("good_a", "good_z"))
    code, out = cli("find", run.parent, "--json", colour=False)
    assert code == 0 and {Path(r["path"]).name for r in json.loads(out)} >= {"good_a", "good_z"}, out
    for name in BAD:
        code, out = cli("show", run / name, colour=True)
        assert code in (0, 1) and (code == 0 or out.count("\n") <= 3), (name, out)
        assert_inert(out, colour=True, literals=())
        code, out = cli("show", run / name, "--json", colour=False)
        assert code in (0, 1), (name, out)
        if code == 0:
            json.loads(out)


def test_bad_checkpoints_never_abort_report_or_plot(run_with_bad: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = run_with_bad
    page = tmp_path / "report.html"
    code, out = cli("report", run.parent, "-o", page, colour=False)
    assert code == 0, out
    text = page.read_text(encoding="utf-8")
    assert "good_a" in text and "good_z" in text
    code, out = cli("plot", run, "-o", tmp_path / "run.png", colour=False)
    assert code == 0, out
    assert (tmp_path / "run.png").read_bytes().startswith(b"\x89PNG")


def test_library_warnings_and_log_records_reach_stderr_inert() -> None:
    """While a command runs, the library may warn or log text quoting paths and file content (a
    skipped checkpoint, a corrected index): the CLI shows those inert as well."""
    script = (
        "import logging, sys, warnings\n"
        "from ckptvault.cli.inert import install_inert_diagnostics\n"
        "install_inert_diagnostics()\n"
        "text = sys.argv[1]\n"
        "warnings.warn(text, stacklevel=1)\n"
        "logging.getLogger('ckptvault.manager').warning('skipped %s', text)\n"
        "logging.getLogger('ckptvault.manager').info('not shown %s', text)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, HOSTILE], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    err = done.stderr.decode("utf-8")
    assert_inert(err, colour=False)
    assert err.count(r"\x1b[2J") == 2 and "skipped" in err and "not shown" not in err


def test_type_confused_catalog_rows_are_shown_inert(tmp_path: Path) -> None:
    """The catalog is a file anyone could have edited, and SQLite keeps text in an INTEGER column:
    ``find`` and the report show such values escaped instead of failing or pasting them as HTML."""
    pytest.importorskip("matplotlib")
    import sqlite3

    root = tmp_path / "root"
    for step in (1, 2):
        cv.save(root / "run" / f"step_{step}", {"w": torch.zeros(2)}, metadata={"metrics": {"loss": 0.5}})
    past = time.time() - 600  # not "just written": the catalog trusts its rows for these
    for path in [root, *root.rglob("*")]:
        os.utime(path, (past, past))
    assert cli("find", root, colour=False)[0] == 0  # builds the catalog
    injected = '"><meta http-equiv=refresh content="0;url=http://evil.example/">'
    db = sqlite3.connect(root / ".ckptvault" / "catalog.sqlite")
    with db:
        db.execute(
            "UPDATE checkpoints SET step = ?, size_bytes = 'big', created_at = 5, epoch = ?, "
            "validation_level = ? WHERE name = 'step_1'",
            (injected, injected, injected),
        )
        last = "(SELECT max(id) FROM checkpoints)"
        db.execute(f"UPDATE metrics SET value = ? WHERE checkpoint = {last}", (injected,))
    db.close()
    code, out = cli("find", root, colour=True)
    assert code == 0 and "step_1" in out and "step_2" in out, out
    assert_inert(out, colour=True, literals=("<meta http-equiv=refresh",))
    code, out = cli("find", root, "--json", colour=False)
    assert code == 0 and len(json.loads(out)) == 2, out
    page = tmp_path / "report.html"
    code, out = cli("report", root, "-o", page, colour=False)
    assert code == 0, out
    text = page.read_text(encoding="utf-8")
    assert "<meta http-equiv=refresh" not in text and "&lt;meta http-equiv=refresh" in text


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain [text]", "plain [text]"),
        ("\x1b[2J", r"\x1b[2J"),
        ("a\rb\nc\td\x07\x00\x7f\x9b", r"a\rb\nc\td\x07\x00\x7f\x9b"),
        ("\u202eexe.txt\u202c \u2066x\u2069", r"\u202eexe.txt\u202c \u2066x\u2069"),
        ("\u200bz\ufeff\u00ad", r"\u200bz\ufeff\xad"),
        ("line\u2028sep \ud800 \U000e0041", r"line\u2028sep \ud800 \U000e0041"),
        ("ünïcode 名前 🙂", "ünïcode 名前 🙂"),  # printable text stays as it is
    ],
)
def test_visible_spells_out_every_acting_character(raw: str, shown: str) -> None:
    from ckptvault.visible import visible

    assert visible(raw) == shown


def test_numbers_and_json_of_any_size() -> None:
    from ckptvault.cli.inert import inert, json_text
    from ckptvault.visible import number_text, size_text, visible

    assert number_text(10**5000) == "1.00000e+5000" and number_text(-(10**80)) == "-1.00000e+80"
    assert number_text(2**64) == str(2**64) and number_text(0.1234567) == "0.123457"
    assert size_text(10**4000) == "1.00000e+4000 B" and size_text(2200) == "2.1 KiB"
    assert visible({"k\x1b": [10**5000, ("t",)]}) == r"{'k\x1b': [1.00000e+5000, ('t',)]}"
    assert inert("[bold]x[/bold]") == r"\[bold]x\[/bold]"
    doc = json.loads(json_text({"\x1b\u202e": 10**5000, ("a", 1): None, 7: 2**70}))
    assert doc == {"\x1b\u202e": "1.00000e+5000", "('a', 1)": None, "7": 2**70}
    assert json_text("\x1b\u202e\ud800").isascii()
