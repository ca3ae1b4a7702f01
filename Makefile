# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# CPU build of torch first (the pyproject keeps a range): a plain `torch` requirement would pull
# a multi-GB CUDA build on a machine without a GPU.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test test-slow lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev,cockpit,lm-eval]"
	touch $@

setup: $(VENV)/.installed

# glibc's mmap threshold at 32 MiB for the demo: the run's own fixed 128 KiB threshold (allocator.py,
# chosen to keep RSS down on real models) maps and unmaps every activation buffer and made the demo
# 1.8x slower (612 s vs 338 s, 1.48 vs 1.95 GB peak RSS; BENCHMARKS.md "Scaling quality")
demo: setup
	MALLOC_MMAP_THRESHOLD_=33554432 $(VENV)/bin/scaler-wizard run --self-approve

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check src tests bench scripts

clean:
	rm -rf $(VENV) runs .pytest_cache
