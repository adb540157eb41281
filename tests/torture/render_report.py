"""Renders the figures of a reliability run into docs/reliability.md (between the figure markers).

Usage: ``python tests/torture/render_report.py RUN.json docs/reliability.md``. ``RUN.json`` is what
``CKPTVAULT_TORTURE_REPORT`` made pytest write (``make torture`` does both steps), so every number in
the document's figure section is a count the suite itself made -- none is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"

AREAS = {
    "fault_loops": (
        "Injected faults (every operation of every write path)",
        "tests/torture/test_fault_loops.py",
    ),
    "crash_replay": ("Replayed power cuts (un-synced writes lost)", "tests/torture/test_crash_replay.py"),
    "kills": ("Real process kills (SIGKILL at each syscall, at random times)", "tests/torture/test_kills.py"),
    "errors": ("Real errors (ENOSPC, EIO on fsync, EXDEV on rename)", "tests/torture/test_real_errors.py"),
    "corpus": ("Hostile input corpus", "tests/torture/test_corpus.py"),
    "fuzz": ("Fuzzing (hypothesis, in the suite)", "tests/torture/test_fuzz.py"),
    "load": ("Concurrency and load", "tests/torture/test_load.py"),
    "soak": ("Soak", "tests/torture/test_load.py"),
}


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.2f}"


def render_fuzz(fuzz: dict[str, Any]) -> list[str]:
    """The atheris section: ``make fuzz`` (fuzz/run_all.py) writes docs/fuzz-run.json."""
    lines = [
        "### Longer fuzzing (atheris, coverage-guided)",
        "",
        f"Reproduce: `make fuzz` -- each harness {fuzz.get('seconds_per_harness', '?')} s on one core, "
        f"finished {fuzz.get('finished', '?')}, Python {fuzz.get('python', '?')}; source: "
        "`docs/fuzz-run.json`. Longer runs: `fuzz/README.md`.",
        "",
        "| harness | executions | seconds | corpus inputs | findings |",
        "|---|---:|---:|---:|---|",
    ]
    for target, r in fuzz.get("harnesses", {}).items():
        findings = ", ".join(r.get("findings", [])) or (
            "none" if not r.get("exit_code") else "exit " + str(r["exit_code"])
        )
        lines.append(
            f"| `{target}` | {_number(r.get('executions', 0))} | {_number(r.get('seconds', 0))} | "
            f"{_number(r.get('corpus_inputs', 0))} | {findings} |"
        )
    return [*lines, ""]


def render(doc: dict[str, Any], fuzz: dict[str, Any] | None = None) -> str:
    tests = doc.get("tests", {})
    outcomes: dict[str, int] = {}
    for entry in tests.values():
        outcomes[entry["outcome"]] = outcomes.get(entry["outcome"], 0) + 1
    machine = doc.get("machine", {})
    scale = doc.get("scale", "?")
    command = "make torture" if scale == "full" else "make test (the CI slice)"
    lines = [
        f"Run: `{command}` (scale **{scale}**), finished {doc.get('finished', '?')}, "
        f"{_number(doc.get('wall_s', 0))} s wall on {machine.get('cpus', '?')} CPUs, Python "
        f"{machine.get('python', '?')}; exit status {doc.get('exit_status', '?')}. Tests: "
        + ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items()))
        + ". Source of every number below: `docs/reliability-run.json` (written by that run).",
        "",
    ]
    figures: dict[str, float] = doc.get("figures", {})
    notes: dict[str, str] = doc.get("notes", {})
    seen: set[str] = set()
    for area, (title, where) in AREAS.items():
        keys = sorted(k for k in figures if k.split(".", 1)[0] == area)
        area_notes = sorted(k for k in notes if k.split(".", 1)[0] == area)
        if not keys and not area_notes:
            continue
        seen.update(keys)
        area_tests = {k: v for k, v in tests.items() if where.split("/")[-1] in k}
        failed = [k for k, v in area_tests.items() if v["outcome"] == "failed"]
        skipped = [k for k, v in area_tests.items() if v["outcome"] == "skipped"]
        seconds = sum(v["seconds"] for v in area_tests.values())
        lines += [f"### {title}", ""]
        lines += [
            f"Reproduce: `CKPTVAULT_TORTURE=full .venv/bin/pytest {where}` -- {len(area_tests)} tests, "
            f"{len(failed)} failed, {len(skipped)} skipped, {_number(round(seconds, 1))} s.",
            "",
            "| figure | value |",
            "|---|---:|",
        ]
        lines += [f"| `{k.split('.', 1)[1]}` | {_number(figures[k])} |" for k in keys]
        lines.append("")
        for k in area_notes:
            lines.append(f"- `{k.split('.', 1)[1]}`: {notes[k]}")
        for k in skipped:
            lines.append(f"- skipped `{k}`: {area_tests[k].get('reason', '')}")
        if area_notes or skipped:
            lines.append("")
    if fuzz:
        lines += render_fuzz(fuzz)
    rest = sorted(set(figures) - seen)
    if rest:
        lines += ["### Other figures", "", "| figure | value |", "|---|---:|"]
        lines += [f"| `{k}` | {_number(figures[k])} |" for k in rest]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("document", type=Path)
    parser.add_argument("--fuzz", type=Path, default=None, help="docs/fuzz-run.json (if it exists)")
    args = parser.parse_args(argv)
    doc = json.loads(args.run.read_text())
    fuzz = json.loads(args.fuzz.read_text()) if args.fuzz and args.fuzz.exists() else None
    text = args.document.read_text()
    if BEGIN not in text or END not in text:
        print(f"{args.document}: no {BEGIN} ... {END} section", file=sys.stderr)
        return 1
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    new = pattern.sub(lambda _m: f"{BEGIN}\n{render(doc, fuzz)}\n{END}", text)
    args.document.write_text(new)
    print(f"{args.document}: figures of {args.run} ({len(doc.get('figures', {}))} figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
