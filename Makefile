# textgen: `make serve` installs everything and serves the demo model; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
# The CPU build on the CI machines; set TORCH=torch for a CUDA build elsewhere.
TORCH ?= torch==2.13.0
MODEL_ID ?=
BIN := $(VENV)/bin
PYTEST_ARGS ?= -m "unit or e2e"
# genai-perf wants numpy 2, which the server's venv must not have (the Python-backend stub).
BENCH_VENV ?= .venv-bench
BENCH_URL ?= localhost:8001
BENCH_ARGS ?=

.PHONY: install serve test test-unit test-gpu demo-model bench-tools bench-serving clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	# tritonserver itself: the binary inside the nvidia-pytriton wheel (its Python deps are not needed)
	$(BIN)/pip install -q --no-deps nvidia-pytriton==0.7.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo-model: install
	$(BIN)/textgen demo-model

serve: install
	$(BIN)/textgen-launcher --model-id "$(or $(MODEL_ID),$$($(BIN)/textgen demo-model))"

# TEXTGEN_BENCH_VENV: the e2e smoke run of bench-serving must not skip here.
test: install bench-tools
	TEXTGEN_BENCH_VENV=$(BENCH_VENV) $(BIN)/python -m pytest $(PYTEST_ARGS) tests

test-unit: install
	$(BIN)/python -m pytest -m unit tests

# genai-perf in a venv of its own, without its unused extras (bench/requirements-genai-perf.txt),
# and a perf_analyzer wrapper in its bin/ (the tritonclient wheel's binary; see bench_serving.py).
bench-tools: $(BENCH_VENV)/.installed

$(BENCH_VENV)/.installed: bench/requirements-genai-perf.txt $(VENV)/.installed
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q --no-deps genai-perf==0.0.16
	$(BENCH_VENV)/bin/pip install -q -r bench/requirements-genai-perf.txt
	$(BIN)/python bench/bench_serving.py --install-perf-analyzer $(BENCH_VENV)/bin
	touch $@

# genai-perf against a running server (make serve): TTFT, inter-token latency, output tokens/s.
bench-serving: bench-tools
	$(BIN)/python bench/bench_serving.py --url $(BENCH_URL) --genai-perf $(BENCH_VENV)/bin/genai-perf \
		--tokenizer "$(or $(MODEL_ID),$$($(BIN)/textgen demo-model))" $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV)
