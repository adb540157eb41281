# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench torture fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned: 2.13.0 (CPU) is the build dev machines and CI install.
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py --out demo-runs

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples fuzz
	$(BIN)/ruff format --check src tests benchmarks examples fuzz

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q --durations=25

test: lint typecheck pytest

# The whole reliability suite (about 25 minutes here); its figures go to docs/reliability.md.
torture: $(STAMP)
	CKPTVAULT_TORTURE=full CKPTVAULT_TORTURE_REPORT=docs/reliability-run.json \
		$(BIN)/pytest -q --timeout=1500 tests/torture
	$(BIN)/python tests/torture/render_report.py docs/reliability-run.json docs/reliability.md \
		--fuzz docs/fuzz-run.json

# Each atheris harness for a minute (fuzz/README.md: longer runs); figures into docs/reliability.md.
fuzz: $(STAMP)
	$(BIN)/pip install -q -e '.[dev,fuzz]'
	$(BIN)/python fuzz/run_all.py --seconds 60 --json docs/fuzz-run.json
	$(BIN)/python tests/torture/render_report.py docs/reliability-run.json docs/reliability.md \
		--fuzz docs/fuzz-run.json

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python benchmarks/save_load.py

clean:
	rm -rf $(VENV) demo-runs .mypy_cache .ruff_cache .pytest_cache
