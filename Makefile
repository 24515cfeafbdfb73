PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast install install-dev clean

# Two workers (pytest-xdist), a whole test file each, the longest files first (tests/conftest.py's FILE_SECONDS):
# most of the suite is XLA compiling on the CPU, and one worker leaves the second core half idle.
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The pins first, then the project itself (its compatible ranges are already met: nothing more comes in).
$(VENV)/.runtime: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q -e .
	touch $@

# torch first, from the CPU build, so that nothing pulls a CUDA build.
$(VENV)/.dev: requirements.txt requirements-dev.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q -e .
	touch $(VENV)/.runtime $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

demo: $(VENV)/.runtime
	$(BIN)/python -m t2i_flax.demo

test: $(VENV)/.dev
	$(PYTEST) tests

# The quick tier for iteration: everything but the files marked slow (end-to-end runs, faults, multi-host, aot, demo).
test-fast: $(VENV)/.dev
	$(PYTEST) -m "not slow" tests

clean:
	rm -rf $(VENV) demo_output
