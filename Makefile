# Two commands on a fresh machine with python3 and pip: `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format install bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip

# torch first, pinned, so nothing later resolves a CUDA build from the index.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/posttrain demo

# Two pytest workers, one per core (pytest-xdist; a file's tests stay on one worker, so its module fixtures are
# built once), each torch single-threaded so the two do not fight over the cores.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

# The quick loop: everything but the learning tests and other slow ones (wheel build, demo). Not a CI substitute.
test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

# What CI checks before the tests: lint, formatting, types (files and rules in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check posttrain tests benchmarks
	$(BIN)/ruff format --check posttrain tests benchmarks
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix posttrain tests benchmarks
	$(BIN)/ruff format posttrain tests benchmarks

bench: $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	$(BIN)/python benchmarks/sft_vs_trl.py --size tiny

clean:
	rm -rf $(VENV) runs
