# Two commands: `make run` serves models/ on 127.0.0.1:8000, `make test` runs every check.
# Both create .venv on first use and install with constraints.txt (torch==2.13.0, exact pins).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# PyPI's torch 2.13.0 for Linux x86-64 is the CUDA build (several GB with its nvidia-*
# packages). Name PyTorch's CPU index to get the 2.13.0+cpu build instead, which the pin
# admits (the Dockerfile takes the same build argument):
#   make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt \
          $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))

.PHONY: run test lint format bench clean fuzz soak proto

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
	$(BIN)/lint-imports --no-logo

test: lint browser
	$(BIN)/python -m pytest

# tests/test_playground.py drives Debian's Chromium: installed here when run as root (as CI
# is), else make stops and says what to install.
.PHONY: browser screenshots
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    timeout 600 apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
	    || { timeout 300 apt-get update -q >/dev/null && \
	         timeout 600 apt-get install -y -q chromium chromium-driver >/dev/null; }; \
	  else \
	    echo "make test needs Chromium and its driver: sudo apt-get install chromium chromium-driver" >&2; \
	    exit 1; \
	  fi; }

# The playground's screenshots in docs/ (tests/test_playground.py writes them).
screenshots: $(VENV)/.installed-dev browser
	PLAYGROUND_SCREENSHOTS=docs/figures $(BIN)/python -m pytest tests/test_playground.py

format: $(VENV)/.installed-dev
	$(BIN)/ruff check --fix service tests bench
	$(BIN)/ruff format service tests bench

# The gRPC messages from their .proto (run from the root, so the descriptor's file name is
# service/protocols/grpc/predict_v2.proto); tests/test_grpc.py fails if they drift.
proto: $(VENV)/.installed-dev
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. \
	    service/protocols/grpc/predict_v2.proto

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

# Long schema fuzzing and engine properties (make test runs a bounded number of examples).
fuzz: $(VENV)/.installed-dev
	FUZZ_EXAMPLES=300 PROPERTY_EXAMPLES=1000 $(BIN)/python -m pytest tests/test_fuzz.py tests/test_properties.py

# Minutes of mixed traffic from 64 loopback clients; figures in docs/reliability.md.
soak: $(VENV)/.installed-dev
	$(BIN)/python bench/soak.py --duration 300 --warmup 60

# Eval throughput with dynamic batching on against off at 1, 8 and 64 clients alone;
# `make bench` includes it in docs/benchmarks.md.
.PHONY: bench-throughput
bench-throughput: $(VENV)/.installed-dev
	$(BIN)/python bench/throughput.py


# Gal & Ghahramani's UCI protocol on the four shipped sets, 20 splits each (about an hour on
# one core); the tables of docs/uncertainty.md come from its output.
.PHONY: uci
uci: $(VENV)/.installed
	$(BIN)/dropout-service benchmark concrete energy wine-quality-red yacht \
		--json docs/uncertainty-uci-results.json

# The figures of docs/why-dropout-is-off.md, measured on the shipped model (under a minute).
$(VENV)/.installed-report: $(VENV)/.installed
	$(PIP) -e '.[report]'
	@touch $@

.PHONY: report
report: $(VENV)/.installed-report
	$(BIN)/dropout-service report --model concrete --out docs/figures

# Container and cluster checks (hadolint, the replayed image, kubernetes-validate): part of
# `make test`; `make check-container` runs them alone.
.PHONY: check-container

$(VENV)/.installed-deploy: $(VENV)/.installed-dev
	$(PIP) -e '.[dev,deploy]'
	@touch $@

test: $(VENV)/.installed-deploy

check-container: $(VENV)/.installed-deploy
	$(BIN)/python -m pytest tests/test_container.py tests/test_deploy.py

$(VENV)/.installed-bench: $(VENV)/.installed-dev
	$(PIP) -e '.[dev,bench,peers]'
	@touch $@

# LitServe, KServe and MLServer, each in its own virtual environment under .peers/ (pinned in
# bench/peers/requirements.txt, never service dependencies), against the service with wrk
# (bench/peers.py, about 12 minutes); writes its section of docs/benchmarks.md.
PEERS := litserve kserve mlserver
.PHONY: bench-peers
bench-peers: $(VENV)/.installed-bench $(foreach p,$(PEERS),.peers/$(p)/.installed)
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && timeout 300 apt-get install -y -q wrk >/dev/null 2>&1; } \
		|| { echo "bench-peers needs wrk: apt-get install wrk" >&2; exit 1; }
	$(BIN)/python bench/peers.py --write

.peers/%/.installed: bench/peers/requirements.txt
	$(PYTHON) -m venv .peers/$*
	.peers/$*/bin/python -m pip install -q --disable-pip-version-check \
		$(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL)) \
		torch==2.13.0 numpy safetensors "$$(grep '^$*==' bench/peers/requirements.txt)"
	@touch $@

# Regenerates docs/benchmarks.md and docs/benchmarks.png (BENCH_ARGS=--quick for short runs).
bench: $(VENV)/.installed-bench
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && timeout 300 apt-get install -y -q wrk >/dev/null 2>&1; } \
		|| echo "wrk not available: the HTTP load comes from an asyncio httpx client"
	$(BIN)/python bench/report.py $(BENCH_ARGS)
