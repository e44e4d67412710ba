# Two commands: `make run` serves models/ on 127.0.0.1:8000, `make test` runs every check.
# Both create .venv on first use and install with constraints.txt (CPU torch, exact pins).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: run test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e .
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	@touch $@

run: $(VENV)/.installed
	$(BIN)/dropout-service serve --host 127.0.0.1 --port 8000 --models models

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check service tests bench
	$(BIN)/ruff format --check service tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

format: $(VENV)/.installed-dev
	$(BIN)/ruff check --fix service tests bench
	$(BIN)/ruff format service tests bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

$(VENV)/.installed-bench: $(VENV)/.installed-dev
	$(PIP) -e '.[dev,bench,peers]'
	@touch $@

# Regenerates docs/benchmarks.md and docs/benchmarks.png (BENCH_ARGS=--quick for short runs).
bench: $(VENV)/.installed-bench
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && timeout 300 apt-get install -y -q wrk >/dev/null 2>&1; } \
		|| echo "wrk not available: the HTTP load comes from an asyncio httpx client"
	$(BIN)/python bench/report.py $(BENCH_ARGS)
