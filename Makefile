# The two commands of the README: `make demo` and `make test`. Both bootstrap .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# torch first: `pip install torch==2.13.0` takes the CPU build on this machine's disk, so the project's
# torch>=2.4 is already satisfied and pip never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/labelrefinery demo --root demo_region

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two test processes (pytest-xdist), whole files each, so a module's fixtures are built once: the suite
# spends much of its time waiting on servers and worker processes, and CI has two cores. The slowest
# tests are listed at the end, to keep an eye on the suite's time.
TEST_WORKERS ?= 2
test: setup lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

bench: setup
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python benchmarks/bench_ingest.py

clean:
	rm -rf $(VENV) demo_region .labelrefinery
