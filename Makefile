# From a fresh clone: `make demo` sets up .venv and runs the main job on the embedded model;
# `make test` sets up .venv and runs the tests. The set-up re-runs only when pyproject.toml changes.
# Any variable below can be overridden: `make test PYTEST_ARGS='-m "not local_server"'`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= test,local,semantic,report,hf,language

# llama.cpp's default native build turns on AMX where the CPU reports it, and on some virtual
# machines the server then dies on its first request: build llama-cpp-python for portable AVX2.
CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
export CMAKE_ARGS

# The semantic extra needs torch; from PyPI alone pip takes the multi-gigabyte CUDA build, so the
# CPU build comes first, from PyTorch's CPU index (an empty TORCH_INDEX uses only pip's own
# indexes). Only torch itself is looked up there; its dependencies come with the next step.
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

DEMO_INPUT ?= examples/multiinstruct-mini
DEMO_OUTPUT ?= runs/demo
PYTEST_ARGS ?=

SETUP := $(VENV)/.setup-done
DEV := $(VENV)/.dev-done

.PHONY: setup demo test lint format bench

setup: $(SETUP)

$(SETUP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install --no-deps $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) '$(TORCH)'
	$(BIN)/python -m pip install -e '.[$(EXTRAS)]'
	touch $@

# ruff and mypy, only for lint and format
$(DEV): $(SETUP)
	$(BIN)/python -m pip install -e '.[$(EXTRAS),dev]'
	touch $@

demo: $(SETUP)
	$(BIN)/instraug expand $(DEMO_INPUT) -o $(DEMO_OUTPUT)

test: $(SETUP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(DEV)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(SETUP)
	$(BIN)/python benchmarks/assemble.py
	$(BIN)/python benchmarks/throughput.py --embedded
	$(BIN)/python benchmarks/scale.py
	$(BIN)/python benchmarks/noop_rerun.py
