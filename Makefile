# textgen: `make serve` installs everything and serves the demo model; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
# Empty: the locked CPU build (requirements/torch-cpu.lock, from CI machines' /opt/wheels).
# A pip requirement instead (TORCH=torch==2.11.0) installs that build, e.g. CUDA, unhashed.
TORCH ?=
MODEL_ID ?=
BIN := $(VENV)/bin
PYTEST_ARGS ?= -m "unit or e2e"
# genai-perf wants numpy 2, which the server's venv must not have (the Python-backend stub).
BENCH_VENV ?= .venv-bench
BENCH_URL ?= localhost:8001
BENCH_ARGS ?=

.PHONY: install serve test test-unit test-gpu demo-model bench-tools bench-serving bench-online \
	lock check-latest image clean

install: $(VENV)/.installed

# Installs come from the lock files (requirements/, `make lock`), exact versions and hashes, in a
# new venv; the project itself is installed editable without dependencies.
$(VENV)/.installed: pyproject.toml Makefile requirements/server.lock requirements/torch-cpu.lock
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-deps --require-hashes -r requirements/server.lock
ifeq ($(TORCH),)
	$(BIN)/pip install -q --no-deps --require-hashes -r requirements/torch-cpu.lock
else
	$(BIN)/pip install -q "$(TORCH)"
endif
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo-model: install
	$(BIN)/textgen demo-model

serve: install
	$(BIN)/textgen-launcher --model-id "$(or $(MODEL_ID),$$($(BIN)/textgen demo-model))"

# TEXTGEN_BENCH_VENV: the e2e smoke run of bench-serving must not skip here. PYTHONSAFEPATH: the
# repository root stays off sys.path (its folders must never shadow installed packages).
test: install bench-tools
	TEXTGEN_BENCH_VENV=$(BENCH_VENV) PYTHONSAFEPATH=1 $(BIN)/python -m pytest $(PYTEST_ARGS) tests

test-unit: install
	PYTHONSAFEPATH=1 $(BIN)/python -m pytest -m unit tests

# genai-perf in a venv of its own, without its unused extras (requirements/bench.in), and a
# perf_analyzer wrapper in its bin/ (the tritonclient wheel's binary; see bench_serving.py).
bench-tools: $(BENCH_VENV)/.installed

$(BENCH_VENV)/.installed: requirements/bench.lock $(VENV)/.installed
	rm -rf $(BENCH_VENV)
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --no-deps --require-hashes -r requirements/bench.lock
	$(BIN)/python bench/bench_serving.py --install-perf-analyzer $(BENCH_VENV)/bin
	touch $@

# genai-perf against a running server (make serve): TTFT, inter-token latency, output tokens/s.
bench-serving: bench-tools
	$(BIN)/python bench/bench_serving.py --url $(BENCH_URL) --genai-perf $(BENCH_VENV)/bin/genai-perf \
		--tokenizer "$(or $(MODEL_ID),$$($(BIN)/textgen demo-model))" $(BENCH_ARGS)

# Poisson arrivals at several request rates against a running server (make serve): throughput,
# TTFT / inter-token / end-to-end latency p50 and p99 per rate, a latency-throughput plot.
bench-online: install
	$(BIN)/python bench/bench_online.py --url $(BENCH_URL) $(BENCH_ARGS)

# The container image (deploy/Dockerfile, docs/deployment.md): IMAGE_TORCH=cpu or cuda, built with
# docker, or podman where no docker daemon answers. The locked CPU torch comes from TORCH_WHEELS
# when that directory exists (CI machines' /opt/wheels), else from PyTorch's CPU index; PIP_CERT,
# a CA bundle for a TLS-inspecting proxy, reaches pip as a build secret.
IMAGE_TORCH ?= cpu
IMAGE ?= textgen:$(IMAGE_TORCH)
CONTAINER_ENGINE ?= $(shell docker info > /dev/null 2>&1 && echo docker || \
	(command -v podman > /dev/null && echo podman) || echo docker)
TORCH_WHEELS ?= $(wildcard /opt/wheels)
CA_SECRET = --secret id=ca-bundle,src=$(PIP_CERT)
image:
	$(CONTAINER_ENGINE) build -f deploy/Dockerfile --build-arg TORCH=$(IMAGE_TORCH) \
		$(if $(TORCH_WHEELS),--build-context wheels=$(TORCH_WHEELS) --build-arg TORCH_INDEX=) \
		$(if $(PIP_CERT),$(CA_SECRET)) -t $(IMAGE) .

# Regenerates requirements/*.lock (exact versions and hashes) with a pinned uv, from
# pyproject.toml and requirements/*.in. Run it deliberately, then `make test` and commit the locks.
LOCK_VENV ?= .venv-lock
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q uv==0.13.9
	UV=$(abspath $(LOCK_VENV))/bin/uv requirements/lock.sh

# The next upstream break, before users meet it: the newest versions pyproject.toml allows (the
# CPU torch stays the locked one: the newest on PyPI is a multi-GB CUDA build) in a scratch venv,
# then the unit tests and one end-to-end server test. Needs the network; not part of CI.
LATEST_VENV ?= .venv-latest
check-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip
	$(LATEST_VENV)/bin/pip install -q --upgrade --upgrade-strategy eager -c requirements/torch-cpu.in -e ".[test]"
	$(LATEST_VENV)/bin/pip install -q --no-deps nvidia-pytriton==0.7.0
	$(LATEST_VENV)/bin/pip list --format=freeze > $(LATEST_VENV)/versions.txt
	@echo "newest versions: $(LATEST_VENV)/versions.txt"
	PYTHONSAFEPATH=1 $(LATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider -m unit tests
	PYTHONSAFEPATH=1 $(LATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		tests/e2e/test_tiny_server.py::test_grpc_greedy_parity_streaming_equals_non_streaming

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(LOCK_VENV) $(LATEST_VENV)
