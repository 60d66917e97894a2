# segpipe: two commands for a newcomer (`make demo`, `make test`); the rest are for developers.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench bench-gpu clean

# Idempotent: (re)installs only when the venv is missing or pyproject.toml changed since the last install.
setup: $(STAMP)
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: setup
	$(BIN)/segpipe demo

test: setup
	$(BIN)/python -m pytest -q tests

# The quick subset while developing: everything but the multi-process/multi-minute tests.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: setup
	$(BIN)/ruff check segmodels pipelines tests bench
	$(BIN)/ruff format --check segmodels pipelines tests bench

# CPU benchmarks; the GPU ones (bench/gpu_*.py) run together through `make bench-gpu` on a GPU machine.
bench: setup
	@for b in bench/*.py; do case $$b in bench/gpu_*) continue;; esac; echo "== $$b"; $(BIN)/python $$b || exit 1; done

bench-gpu: setup
	bash bench/gpu_check.sh

clean:
	rm -rf .segpipe .pytest_cache .ruff_cache bench/out
