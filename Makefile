# Workbench: `make run` brings the whole embedded stack up; `make test` runs every check.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# JupyterHub's proxy, from npm (package-lock.json pins it and what it needs).
PROXY := node_modules/.bin/configurable-http-proxy

.PHONY: install run test lint typecheck benchmark clean

install: $(STAMP) $(PROXY)

# torch goes in first, pinned: pip then takes the CPU build from local disk, where an
# unpinned torch (asked for by transformers or mlflow) would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

$(PROXY): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $(PROXY)

run: install
	bash scripts/run.sh

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy workbench apps worker

test: install lint typecheck
	$(PY) manage.py check
	$(PY) manage.py makemigrations --check --dry-run
	$(VENV)/bin/pytest

benchmark: install
	$(PY) benchmarks/upload_throughput.py

clean:
	rm -rf var/ node_modules/ .pytest_cache .mypy_cache .ruff_cache
