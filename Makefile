# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv if missing and install the project into it. The first run compiles
# llama.cpp (llama-cpp-python has no wheel on PyPI): about five minutes on two cores; pip
# caches the wheel, so later runs take seconds.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
# pip's notes about local index folders that do not exist on this machine are noise
QUIET_PIP := grep -v "is ignored: it is neither a file nor a directory" || true
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench install clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel 2>&1 | { $(QUIET_PIP); }
	@echo "Installing codemoat and its dependencies (the first run compiles llama.cpp: ~5 minutes on 2 cores)..."
	$(PY) -m pip install -q -e '.[train,test]' 2>&1 | { $(QUIET_PIP); }
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash demo/run.sh

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]' 2>&1 | { $(QUIET_PIP); }
	$(PY) bench/serve.py

clean:
	rm -rf $(VENV) .pytest_cache
