# Two commands for a fresh machine (see README.md):
#   make serve   install into .venv and serve (vLLM on an NVIDIA GPU, llama.cpp elsewhere)
#   make test    install the test tools into .venv and run the tests
#
# Settings come from the environment or .env (the environment wins):
#   GATEWAY_API_KEYS=... make serve

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# vLLM where nvidia-smi sees a GPU; the CPU engine (llama.cpp, built from source) elsewhere.
ENGINE_EXTRA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo vllm || echo cpu)

.PHONY: serve test lint bench key clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[$*]"
	touch $@

serve: $(VENV)/.installed-$(ENGINE_EXTRA)
	$(BIN)/lowvram serve

# The first run builds llama.cpp's server (about 8 minutes on 2 cores; cached after).
test: lint
	$(BIN)/lowvram build
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-cpu,dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(VENV)/.installed-cpu,dev
	$(BIN)/python -m bench.gateway_overhead

# Print a new API key once: make key NAME=my-app
key: $(VENV)/.installed-$(ENGINE_EXTRA)
	$(BIN)/lowvram keys create $(or $(NAME),my-app)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
