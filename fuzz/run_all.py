#!/usr/bin/env python3
"""Runs every atheris harness for a fixed time and writes what happened as JSON (``make fuzz``).

The reliability document publishes these figures; they come from this file's output
(``docs/fuzz-run.json``), not from prose: per harness the executions libFuzzer reports
(``stat::number_of_executed_units``), the seconds, the corpus size, and whether it found anything
(a ``crash-``/``timeout-``/``oom-`` artifact or a non-zero exit). Each harness continues the corpus
a previous run left in ``--work`` (seeded from tests/corpus when empty).

Usage: ``python fuzz/run_all.py [--seconds 60] [--work fuzz-out] [--json docs/fuzz-run.json]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ("manifest", "header", "tree", "codec")


def run_one(target: str, seconds: int, work: Path) -> dict[str, object]:
    corpus = work / target
    corpus.mkdir(parents=True, exist_ok=True)
    prefix = work / f"{target}-"
    before = {p.name for p in work.iterdir()}
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            str(HERE / f"fuzz_{target}.py"),
            f"-max_total_time={seconds}",
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
            f"-artifact_prefix={prefix}",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 300,
    )
    elapsed = time.monotonic() - started
    found = re.findall(r"stat::number_of_executed_units:\s*(\d+)", done.stderr)
    artifacts = sorted(
        p.name
        for p in work.iterdir()
        if p.name not in before and re.match(rf"{target}-(crash|timeout|oom|leak)-", p.name)
    )
    return {
        "executions": int(found[-1]) if found else 0,
        "seconds": round(elapsed, 1),
        "corpus_inputs": sum(1 for _ in corpus.iterdir()),
        "exit_code": done.returncode,
        "findings": artifacts,
        "tail": done.stderr[-600:] if done.returncode else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--work", type=Path, default=Path("fuzz-out"))
    parser.add_argument("--json", type=Path, default=Path("docs/fuzz-run.json"))
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    results = {}
    for target in TARGETS:
        results[target] = run_one(target, args.seconds, args.work)
        print(
            f"{target}: {results[target]['executions']:,} executions, findings {results[target]['findings']}"
        )
    doc = {
        "seconds_per_harness": args.seconds,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "python": platform.python_version(),
        "harnesses": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if all(not r["findings"] and r["exit_code"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
