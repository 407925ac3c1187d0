# textgen: `make serve` installs everything and serves the demo model; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
# The CPU build on the CI machines; set TORCH=torch for a CUDA build elsewhere.
TORCH ?= torch==2.13.0
MODEL_ID ?=
BIN := $(VENV)/bin
PYTEST_ARGS ?= -m "unit or e2e"

.PHONY: install serve test test-unit test-gpu demo-model clean

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

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests

test-unit: install
	$(BIN)/python -m pytest -m unit tests

clean:
	rm -rf $(VENV)
